"""Time the split-KV decode kernel alone for candidate launch configurations and print the table that picks them.

    python -m bench.tune_decode_attention --output_dir bench/results/tune_decode_attention_h200   # GPU, ~3 min
    python -m bench.tune_decode_attention --dry_run --processors 132                             # counts only
    TRITON_INTERPRET=1 python -m bench.tune_decode_attention --smoke --output_dir /tmp/tune       # CPU smoke run

Shapes: the decode attention of TinyLlama (4 KV heads, 8 query heads each, head dim 64), Llama-2-7B (32, 1, 128) and
LLaMA-33B (52, 1, 128) at batches 1, 32, 128, 512 (and 2048 for TinyLlama), over a static cache of ``--slots`` slots
filled up to ``--filled`` (a causal mask row), ``--dtype`` values. The op ``lckv::split_kv_decode`` is called as the
decode step calls it, with each candidate's launch (``models/kernels/decode_launch.py``: KV tile ``block_n``,
``num_warps``, ``num_stages``, and ``waves``, the programs per SM that set the number of splits).

Search per shape: stage 1 tries every tile x warps x stages of the grid at the default waves; stage 2 tries every
waves value for the ``--top`` fastest of stage 1 (only where waves change the number of splits). Candidates whose
launch repeats one already timed are not timed twice; one that needs more shared memory than the GPU has is recorded
as ``out_of_resources``; one whose output differs from the default config's is recorded as ``mismatch`` and never
chosen. Timing as the decode step runs the kernel (bench/kernel_tuning.py): calls captured in one CUDA graph, each on
the next of enough input copies to exceed twice the L2 cache (every call reads its KV from HBM); wall time on a CPU.
Bandwidth: filled K + V bytes plus q and out bytes over the time, as a fraction of the GPU's HBM bandwidth
(``models.roofline``; ``--hbm_bandwidth`` overrides it).

Writes ``tune_decode_attention.json`` (every candidate's time) after each shape, so a run cut short keeps what it
measured, and ``launch_table.txt``: the ``TUNED`` assignment for ``models/kernels/decode_launch.py``, the best config
per shape where it beats the default by ``--min_gain``, over the current table's rows for the shapes it did not
measure (``--from_scratch``: this run's shapes alone). ``--apply`` writes it into ``decode_launch.py``.
"""

import argparse
import itertools
import json
import platform
import time
from collections.abc import Iterable
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

import torch

import models  # noqa: F401  (loads the decode kernel where it can run)
from bench.kernel_tuning import apply_table, input_copies, time_ms
from models.export import write_json
from models.kernels import decode_attention, decode_launch
from models.kernels.decode_launch import (
    DEFAULT,
    TUNED,
    WAVES,
    KernelConfig,
    LaunchConfig,
    TableRows,
    check_kernel_config,
    resolve_launch,
)
from models.roofline import device_hardware
from tools.cli import ArgumentParser, UsageError, check_output_dir, check_range, parse_int_list, parse_size, run_cli


class Attention(NamedTuple):
    """A model's decode attention shape: KV heads, query heads per KV head, head dim."""

    kv_heads: int
    group: int
    head_dim: int


MODELS = {
    "tinyllama": Attention(kv_heads=4, group=8, head_dim=64),
    "llama2-7b": Attention(kv_heads=32, group=1, head_dim=128),
    "llama-33b": Attention(kv_heads=52, group=1, head_dim=128),
}
BATCHES = {"tinyllama": (1, 32, 128, 512, 2048), "llama2-7b": (1, 32, 128, 512), "llama-33b": (1, 32, 128, 512)}
BLOCK_NS, NUM_WARPS, NUM_STAGES, WAVES_CHOICES = (32, 64, 128), (2, 4, 8), (2, 3, 4), (1, 2, 4)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# a candidate's output against the default config's: both accumulate in fp32, they differ by the output's rounding
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # rtol = atol
# --smoke: a tiny GQA shape with 3 tiles per row (the last partial), two tiles, two waves, fp32 on the interpreter
SMOKE = dict(
    models={"smoke": Attention(kv_heads=2, group=2, head_dim=16)},
    batches=(1, 3),
    slots=160,
    filled=130,
    block_ns=(64, 32),
    num_warps=(4,),
    num_stages=(2,),
    waves=(2, 4),
    top=1,
    dtype="float32",
)
DECODE_LAUNCH = Path(decode_launch.__file__)  # where --apply writes the table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--output_dir",
        default="bench/results/tune_decode_attention",
        help="where tune_decode_attention.json, launch_table.txt and (with matplotlib) the plot go",
    )
    p.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated attention shapes, of {', '.join(MODELS)}"
    )
    p.add_argument(
        "--batches",
        default=None,
        help="comma-separated batches for every model (default: 1,32,128,512, and 2048 for tinyllama)",
    )
    p.add_argument("--slots", type=int, default=4096, help="static cache slots (sets the number of splits)")
    p.add_argument("--filled", type=int, default=2048, help="filled slots per row: the span the kernel reads")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="query, cache and output dtype")
    p.add_argument("--block_n", default=",".join(map(str, BLOCK_NS)), help="candidate KV tiles (powers of two >= 16)")
    p.add_argument("--num_warps", default=",".join(map(str, NUM_WARPS)), help="candidate warps (powers of two)")
    p.add_argument("--num_stages", default=",".join(map(str, NUM_STAGES)), help="candidate pipeline stages")
    p.add_argument(
        "--waves",
        default=",".join(map(str, WAVES_CHOICES)),
        help="candidate programs per SM (the number of splits), tried for the --top configs of stage 1",
    )
    p.add_argument("--top", type=int, default=3, help="stage-1 configs whose waves stage 2 varies")
    p.add_argument(
        "--min_gain",
        type=float,
        default=0.03,
        help="the table takes a config only if it is this much faster than the default (0.03: 3%%)",
    )
    p.add_argument(
        "--warmup_ms", type=float, default=10, help="do_bench's warm-up time per candidate (CUDA graph replays)"
    )
    p.add_argument("--rep_ms", type=float, default=40, help="do_bench's timed repetitions per candidate (time)")
    p.add_argument(
        "--time_budget_s",
        type=float,
        default=200,
        help="start no candidate after this many seconds (the rest are recorded as skipped)",
    )
    p.add_argument(
        "--hbm_bandwidth", default=None, help="HBM bytes/s for the fraction, e.g. 4.8TB (default: the GPU's)"
    )
    p.add_argument(
        "--processors",
        type=int,
        default=None,
        help="SM count the splits are computed for, e.g. 132 for an H200 in --dry_run (default: the "
        "device's; 4 on the interpreter)",
    )
    p.add_argument(
        "--from_scratch",
        action="store_true",
        help="build the table from this run's shapes alone (default: the current TUNED table of decode_launch.py "
        "with the rows of this run's shapes replaced, so a run over a few batches refines it)",
    )
    p.add_argument(
        "--apply",
        action="store_true",
        help="also write the table into models/kernels/decode_launch.py (its TUNED assignment) at the end",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dry_run", action="store_true", help="print the shapes and candidate counts, time nothing")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="CPU, Triton's interpreter (TRITON_INTERPRET=1 set before Python starts), a tiny fp32 shape and "
        "two candidates: the same code path in seconds; overrides --models/--batches/--slots/"
        "--filled/--dtype/the grid/--top/--device",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
        args.model_shapes = SMOKE["models"]
        args.batch_list = {name: SMOKE["batches"] for name in args.model_shapes}
        args.slots, args.filled, args.top, args.dtype = SMOKE["slots"], SMOKE["filled"], SMOKE["top"], SMOKE["dtype"]
        args.grid = [SMOKE[key] for key in ("block_ns", "num_warps", "num_stages", "waves")]
    else:
        names = [name for name in args.models.split(",") if name]
        for name in names:
            if name not in MODELS:
                raise UsageError(f"--models: {name!r}; allowed are {', '.join(MODELS)}")
        args.model_shapes = {name: MODELS[name] for name in names}
        batches = None if args.batches is None else tuple(parse_int_list("--batches", args.batches))
        args.batch_list = {name: batches or BATCHES[name] for name in names}
        args.grid = [
            tuple(parse_int_list(f"--{flag}", getattr(args, flag)))
            for flag in ("block_n", "num_warps", "num_stages", "waves")
        ]
        for config in kernel_grid(*args.grid):
            try:
                check_kernel_config(config)
            except ValueError as error:
                raise UsageError(f"--{error}") from None
    check_range("--slots", args.slots, minimum=1)
    check_range("--filled", args.filled, minimum=1, maximum=args.slots)
    for flag in ("top", "processors"):
        check_range(f"--{flag}", getattr(args, flag), minimum=1)
    for flag in ("warmup_ms", "rep_ms", "time_budget_s"):
        check_range(f"--{flag}", getattr(args, flag), minimum=0, exclusive_min=True)
    check_range("--min_gain", args.min_gain, minimum=0)
    args.hbm_bytes_per_s = None if args.hbm_bandwidth is None else parse_size("--hbm_bandwidth", args.hbm_bandwidth)
    if not args.dry_run:
        device_type = torch.device(args.device).type
        kernel = decode_attention.load_split_kv_kernel()
        if kernel is None or device_type not in kernel.devices:
            hint = "set TRITON_INTERPRET=1 before starting Python" if device_type == "cpu" else "install triton"
            raise UsageError(f"--device: {args.device}: the split-KV kernel cannot run there ({hint})")
        check_output_dir("--output_dir", args.output_dir)
    return args


def kernel_grid(
    block_ns: Iterable[int], num_warps: Iterable[int], num_stages: Iterable[int], waves: Iterable[int]
) -> list[KernelConfig]:
    """The default (the reference output and the time to beat, measured whatever the grid), then every combination."""
    grid = (KernelConfig(*combo) for combo in itertools.product(block_ns, num_warps, num_stages, waves))
    return list(dict.fromkeys([DEFAULT, *grid]))


def useful_bytes(shape: Attention, batch: int, filled: int, value_bytes: int) -> int:
    """Bytes a decode attention must move: the filled keys and values, the query and the output."""
    kv = 2 * batch * shape.kv_heads * filled * shape.head_dim
    q_out = 2 * batch * shape.kv_heads * shape.group * shape.head_dim
    return (kv + q_out) * value_bytes


def decode_inputs(shape: Attention, batch: int, slots: int, filled: int, dtype: torch.dtype, device: str) -> tuple:
    """``(q, k, v, mask rows, lengths)`` as the decode step hands them to the op: ``(B, Hq, 1, D)`` queries,
    ``(B, Hkv, S, D)`` keys / values random in the filled slots (the rest is never read), ``(B, S)`` bool mask,
    ``(B,)`` int32 lengths."""
    generator = torch.Generator(device=device).manual_seed(0)
    heads = shape.kv_heads * shape.group
    query = torch.randn(batch, heads, 1, shape.head_dim, device=device, dtype=dtype, generator=generator)
    key, value = (
        torch.zeros(batch, shape.kv_heads, slots, shape.head_dim, device=device, dtype=dtype) for _ in range(2)
    )
    for cache in (key, value):
        cache[:, :, :filled].normal_(generator=generator)
    mask = torch.zeros(batch, slots, device=device, dtype=torch.bool)
    mask[:, :filled] = True
    lengths = torch.full((batch,), filled, device=device, dtype=torch.int32)
    return query, key, value, mask, lengths


def out_of_resources_errors() -> tuple[type[BaseException], ...]:
    """Triton's error for a config that needs more shared memory or registers than the GPU has."""
    from triton.runtime.errors import OutOfResources

    return (OutOfResources,)


class Bench:
    """One shape's inputs and its measured launches (a launch is timed once, whichever config asked for it)."""

    def __init__(self, args: argparse.Namespace, shape: Attention, batch: int, processors: int, deadline: float):
        self.args, self.shape, self.batch, self.processors, self.deadline = args, shape, batch, processors, deadline
        self.dtype = DTYPES[args.dtype]
        self.bytes = useful_bytes(shape, batch, args.filled, self.dtype.itemsize)
        device = torch.device(args.device)
        first = decode_inputs(shape, batch, args.slots, args.filled, self.dtype, args.device)
        copies = (
            input_copies(self.bytes, torch.cuda.get_device_properties(device).L2_cache_size)
            if device.type == "cuda"
            else 1
        )
        self.inputs = [first] + [tuple(t.clone() for t in first) for _ in range(copies - 1)]
        self.reference: torch.Tensor | None = None
        self.timed: dict[LaunchConfig, dict] = {}
        self.kernel = decode_attention.load_split_kv_kernel().run  # parse_args checked that it runs on the device

    def launch(self, config: KernelConfig) -> LaunchConfig:
        return resolve_launch(config, self.batch, self.shape.kv_heads, self.args.slots, self.processors)

    def run(self, launch: LaunchConfig, copy: int = 0) -> torch.Tensor:
        """The op on input copy ``copy`` (all copies hold the same values)."""
        query, key, value, mask, lengths = self.inputs[copy]
        return self.kernel(query, key, value, mask, lengths, self.shape.head_dim**-0.5, *launch)

    def measure(self, config: KernelConfig) -> dict:
        """``config``'s row: its launch, status (ok, mismatch, out_of_resources, skipped) and, when it ran, the time."""
        launch = self.launch(config)
        if launch not in self.timed:
            self.timed[launch] = self._time(launch)
        return {"config": config._asdict(), "launch": launch._asdict(), **self.timed[launch]}

    def retime(self, config: KernelConfig) -> dict:
        """``config``'s row timed once more, its time the faster of the two (``us_timings`` keeps both): the default
        is a shape's first launch, timed before the GPU has run anything of that shape (on an H200 its first timing at
        TinyLlama batch 128 was 173 us, 2x the best candidate, while 22 such calls would exceed the whole decode
        step)."""
        first = self.measure(config)
        if first["status"] != "ok":
            return first
        again = self._time(LaunchConfig(**first["launch"]))  # "skipped" past the deadline, like any launch
        if again["status"] != "ok":
            return first
        faster = again if again["us"] < first["us"] else first
        timing = {k: faster[k] for k in ("us", "GBps", "hbm_fraction") if k in faster}
        return first | timing | {"us_timings": [first["us"], again["us"]]}

    def _time(self, launch: LaunchConfig) -> dict:
        if time.monotonic() > self.deadline:
            return {"status": "skipped (time budget)"}
        start = time.monotonic()
        try:
            out = self.run(launch)
        except out_of_resources_errors() as error:
            return {"status": "out_of_resources", "error": " ".join(str(error).split())[:200]}
        first_call_s = time.monotonic() - start  # compilation included
        if self.reference is None:
            self.reference = out
        tolerance = TOLERANCE[self.dtype]
        difference = (out.float() - self.reference.float()).abs()
        if not bool((difference <= tolerance + tolerance * self.reference.float().abs()).all()):
            return {"status": "mismatch", "max_abs_diff": difference.max().item(), "first_call_s": first_call_s}
        calls = [partial(self.run, launch, copy) for copy in range(len(self.inputs))]
        ms = time_ms(calls, self.args.device, self.args.warmup_ms, self.args.rep_ms)
        row = {"status": "ok", "us": ms * 1e3, "GBps": self.bytes / ms / 1e6, "first_call_s": first_call_s}
        if self.args.hbm_bytes_per_s is not None:
            row["hbm_fraction"] = self.bytes / (ms / 1e3) / self.args.hbm_bytes_per_s
        return row


def ok_rows(rows: list[dict]) -> list[dict]:
    """Measured rows, fastest first."""
    return sorted((row for row in rows if row["status"] == "ok"), key=lambda row: row["us"])


def tune_shape(bench: Bench, grid: list[tuple[int, ...]], top: int) -> dict:
    """Stage 1 (tile x warps x stages at the default waves), then every waves value for the ``top`` fastest."""
    block_ns, num_warps, num_stages, waves = grid
    rows = [bench.measure(config) for config in kernel_grid(block_ns, num_warps, num_stages, (WAVES,))]
    leaders = [KernelConfig(**row["config"]) for row in ok_rows(rows)[:top]]
    rows += [bench.measure(leader._replace(waves=w)) for leader in leaders for w in waves if w != leader.waves]
    rows[0] = bench.retime(DEFAULT)
    ranked = ok_rows(rows)
    default = rows[0]
    return {
        "batch": bench.batch,
        **bench.shape._asdict(),
        "kv_rows": bench.batch * bench.shape.kv_heads,
        "useful_bytes": bench.bytes,
        "default": default,
        "best": ranked[0] if ranked else None,
        "speedup": default["us"] / ranked[0]["us"] if default["status"] == "ok" else None,
        "candidates": rows,
    }


def chosen_config(result: dict, min_gain: float) -> KernelConfig:
    """The best config where it beats the default by ``min_gain``, else the default (noise changes nothing)."""
    if result["speedup"] is None or result["speedup"] < 1 + min_gain:
        return DEFAULT
    return KernelConfig(**result["best"]["config"])


def table_rows(
    results: list[dict],
    value_bytes: int,
    min_gain: float,
    current: dict[tuple[int, int, int], TableRows] | None = None,
) -> dict[tuple[int, int, int], TableRows]:
    """``decode_launch.TUNED`` from measured shapes: per ``(G, D, value_bytes)`` the chosen config from each
    shape's KV rows on, ascending, over the rows of ``current`` (a measured shape replaces the row at its KV row count,
    the rows of shapes not measured are kept); a row equal to the one before it is dropped, a key that is all default
    too."""
    points = {key: dict(rows) for key, rows in (current or {}).items()}  # key -> {first KV row count: config}
    measured: set[tuple[tuple[int, int, int], int]] = set()
    for result in sorted(results, key=lambda r: r["kv_rows"]):
        key = (result["group"], result["head_dim"], value_bytes)
        if (key, result["kv_rows"]) in measured:
            continue  # two models with one KV row count: the first measured stays
        measured.add((key, result["kv_rows"]))
        points.setdefault(key, {})[result["kv_rows"]] = chosen_config(result, min_gain)
    table = {}
    for key, by_first in points.items():
        rows: list[tuple[int, KernelConfig]] = []
        for first, config in sorted(by_first.items()):
            if not rows or rows[-1][1] != config:
                rows.append((first, config))
        if any(config != DEFAULT for _, config in rows):
            table[key] = tuple(rows)
    return table


def table_literal(table: dict[tuple[int, int, int], TableRows], comment: str) -> str:
    """Python source of the ``TUNED`` assignment in ``models/kernels/decode_launch.py``."""
    lines = [f"# {comment}", "TUNED: dict[tuple[int, int, int], TableRows] = {"]
    for key, rows in table.items():
        lines.append(f"    {key!r}: (")
        lines += [f"        ({first}, {config!r})," for first, config in rows]
        lines.append("    ),")
    return "\n".join([*lines, "}"]) + "\n"


def write_outputs(out_dir: Path, report: dict, table: str) -> None:
    """The JSON (rewritten after every shape) and the table source."""
    write_json(out_dir / "tune_decode_attention.json", report)
    (out_dir / "launch_table.txt").write_text(table)


def plot(results: list[dict], path: Path) -> None:
    """Per model, the default's and the best config's HBM fraction against batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == name and r["speedup"] is not None]
        for which, style in (("default", "--"), ("best", "-")):
            ax.plot(
                [r["batch"] for r in rows],
                [r[which]["hbm_fraction"] for r in rows],
                style,
                marker="o",
                label=f"{name} {which}",
            )
    ax.set(xscale="log", xlabel="batch", ylabel="fraction of HBM bandwidth", title="split-KV decode attention")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def planned_shapes(args: argparse.Namespace) -> list[tuple[str, Attention, int]]:
    """(model, shape, batch), the largest batches first: the shapes that matter most (the KV-bound decode) are
    measured before a time budget can cut the run short, and they share one compilation per config (1 split)."""
    shapes = [(name, shape, batch) for name, shape in args.model_shapes.items() for batch in args.batch_list[name]]
    return sorted(shapes, key=lambda planned: -planned[2])


def dry_run(args: argparse.Namespace, processors: int) -> dict:
    """Shapes and the stage-1 launches (timed) / distinct compilations they need; stage 2 adds at most
    ``top x (len(waves) - 1)`` launches per shape."""
    stage1 = kernel_grid(args.grid[0], args.grid[1], args.grid[2], (WAVES,))
    launches, compiles = 0, set()
    shapes = planned_shapes(args)
    for _, shape, batch in shapes:
        distinct = {resolve_launch(c, batch, shape.kv_heads, args.slots, processors) for c in stage1}
        launches += len(distinct)
        # Triton compiles once per launch (splits and tile are constexprs), head dim and G == 1 (a specialised int)
        compiles |= {(launch, shape.group == 1, shape.head_dim) for launch in distinct}
    plan = {
        "shapes": [f"{name} batch {batch}" for name, _, batch in shapes],
        "stage1_launches": launches,
        "stage1_compilations": len(compiles),
        "stage2_launches_at_most": len(shapes) * args.top * (len(args.grid[3]) - 1),
        "processors": processors,
    }
    print(json.dumps(plan))
    return plan


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    processors = args.processors or decode_attention.processors(device)
    if args.dry_run:
        return dry_run(args, processors)
    hardware = device_hardware(device)
    if args.hbm_bytes_per_s is None and hardware is not None:
        args.hbm_bytes_per_s = hardware.hbm_bandwidth
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {
        "device": name,
        "hardware": hardware.name if hardware else None,
        "hbm_bytes_per_s": args.hbm_bytes_per_s,
        "processors": processors,
        "torch": torch.__version__,
        "triton": version("triton"),
        "settings": {
            key: getattr(args, key)
            for key in ("slots", "filled", "dtype", "top", "min_gain", "warmup_ms", "rep_ms", "time_budget_s", "grid")
        },
        "shapes": [],
    }
    deadline = time.monotonic() + args.time_budget_s
    value_bytes = DTYPES[args.dtype].itemsize
    # one line (replace_table swaps it); the rows of the shapes a run did not measure come from the table before
    kept = "" if args.from_scratch else ", over the table before"
    comment = f"{name} ({processors} SMs), {args.dtype}, min_gain {args.min_gain}{kept}"
    for model, shape, batch in planned_shapes(args):
        bench = Bench(args, shape, batch, processors, deadline)
        result = {"model": model, **tune_shape(bench, args.grid, args.top)}
        del bench
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["shapes"].append(result)
        print(summary_line(result), flush=True)
        table = table_rows(report["shapes"], value_bytes, args.min_gain, None if args.from_scratch else TUNED)
        report["table"] = {
            repr(key): [[first, config._asdict()] for first, config in rows] for key, rows in table.items()
        }
        write_outputs(out_dir, report, table_literal(table, comment))
    literal = (out_dir / "launch_table.txt").read_text()
    print(literal)
    if args.apply:
        apply_table(DECODE_LAUNCH, literal)
    if args.hbm_bytes_per_s is not None:
        try:
            plot(report["shapes"], out_dir / "tune_decode_attention.png")
        except ImportError:
            print("matplotlib is not installed: no plot")
    return report


def summary_line(result: dict) -> str:
    """One shape: the default's and the best config's time and HBM fraction."""

    def describe(row: dict | None) -> str:
        if row is None or row["status"] != "ok":
            return "not measured" if row is None else row["status"]
        fraction = f" {row['hbm_fraction']:.0%} HBM" if "hbm_fraction" in row else ""
        launch = row["launch"]
        return (
            f"{row['us']:.1f} us{fraction} (tile {launch['block_n']}, {launch['num_warps']} warps, "
            f"{launch['num_stages']} stages, {launch['num_splits']} splits)"
        )

    speedup = f"{result['speedup']:.2f}x" if result["speedup"] else "-"
    return (
        f"{result['model']} batch {result['batch']}: default {describe(result['default'])}; "
        f"best {describe(result['best'])}; {speedup}"
    )


if __name__ == "__main__":
    run_cli(main)
