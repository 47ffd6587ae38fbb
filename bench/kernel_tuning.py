"""What the kernel tuners share (bench/tune_decode_attention.py, bench/measure_small_batch_gemv.py,
bench/measure_skinny_gemm.py): timing one kernel launch as a decode step runs it, the weight shapes of a decode step,
and writing a measured launch table (and its JSON) into the module that reads it.

Timing on CUDA: up to ``GRAPH_CALLS`` calls captured in one CUDA graph (no host launch cost, which would dominate a
call of a few microseconds), each call on the next of enough input copies that together exceed twice the L2 cache
(every call reads its inputs from HBM, as each layer of a step does); ``triton.testing.do_bench`` over graph
replays, median, divided by the calls. Wall time on a CPU (Triton's interpreter).
"""

import argparse
import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from models.export import write_json
from models.kernels.decode_attention import processors
from tools.cli import load_config, parse_size

CPU_TIMED_CALLS = 2  # the interpreter is slow: a warm-up call and two timed ones
GRAPH_CALLS = 64  # at most this many kernel calls per captured graph on CUDA (the graph's launch amortised)...
GRAPH_MS = 2.0  # ...or fewer, as long as the graph runs this long: a large shape's calls take milliseconds each


def input_copies(inputs_bytes: int, l2_bytes: int) -> int:
    """How many copies of a call's inputs make a rotation that no L2 cache of ``l2_bytes`` holds: their bytes exceed
    twice the L2, so a call never finds its KV still cached from its last turn.

    >>> input_copies(2 * 2**20, 50 * 2**20), input_copies(4 * 2**30, 50 * 2**20)
    (51, 1)
    """
    return 2 * l2_bytes // max(inputs_bytes, 1) + 1


def time_ms(calls: list[Callable[[], object]], device: str, warmup_ms: float, rep_ms: float) -> float:
    """Median milliseconds per call of ``calls`` (the same launch on rotating inputs, compiled already). On CUDA:
    after one eager round, up to ``GRAPH_CALLS`` calls (at least one round, fewer where the eager round says the graph
    would run past ``GRAPH_MS``), cycling through ``calls``, captured in one CUDA graph, then do_bench over replays.
    On a CPU: wall time of ``CPU_TIMED_CALLS`` calls after one."""
    if torch.device(device).type == "cuda":
        import triton.testing

        start = time.perf_counter()
        for call in calls:
            call()
        torch.cuda.synchronize(device)
        eager_ms = (time.perf_counter() - start) * 1e3 / len(calls)  # launch cost included: an upper bound
        graph_calls = max(len(calls), min(GRAPH_CALLS, math.ceil(GRAPH_MS / eager_ms)))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for index in range(graph_calls):
                calls[index % len(calls)]()
        replay_ms = triton.testing.do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        del graph
        return replay_ms / graph_calls
    call = calls[0]
    call()
    times = []
    for _ in range(CPU_TIMED_CALLS):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def weight_shapes(config) -> list[tuple[str, int, int]]:
    """``(name, N, K)`` of a Llama-shaped config's linear layers, and of its fused Q/K/V and gate/up products
    (``models/fused_projections.py``), one entry per distinct shape (first name kept)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden, inter = config.hidden_size, config.intermediate_size
    queries, keys = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    named = [
        ("q_proj", queries, hidden),
        ("k_proj/v_proj", keys, hidden),
        ("o_proj", hidden, queries),
        ("gate_proj/up_proj", inter, hidden),
        ("down_proj", hidden, inter),
        ("lm_head", config.vocab_size, hidden),
        ("qkv_proj (fused)", queries + 2 * keys, hidden),
        ("gate_up_proj (fused)", 2 * inter, hidden),
    ]
    seen, shapes = set(), []
    for name, n, k in named:
        if (n, k) not in seen:
            seen.add((n, k))
            shapes.append((name, n, k))
    return shapes


SMOKE_CONFIGS = ["configs/test_tiny_opt.json"]


def add_shape_arguments(p: argparse.ArgumentParser, output_dir: str, warmup_ms: float, rep_ms: float) -> None:
    """The flags of the linear-layer tuners (bench/measure_small_batch_gemv.py, bench/measure_skinny_gemm.py): the
    configs whose weight shapes are measured, the bandwidth of the fractions, the timing, ``--smoke`` and the JSON's
    folder (``output_dir`` and the timing's defaults per tuner)."""
    p.add_argument(
        "--configs",
        nargs="+",
        default=["configs/tinyllama.json", "configs/llama2_7b.json"],
        help="model config .json files whose weight shapes are measured",
    )
    p.add_argument(
        "--hbm_bandwidth", default="4.8TB", help="memory bandwidth per second for the fractions (H200: 4.8TB)"
    )
    p.add_argument("--warmup_ms", type=float, default=warmup_ms, help="do_bench warm-up per timing (CUDA)")
    p.add_argument("--rep_ms", type=float, default=rep_ms, help="do_bench repetition time per timing (CUDA)")
    p.add_argument("--smoke", action="store_true", help="CPU through Triton's interpreter, a tiny config")
    p.add_argument("--output_dir", default=output_dir, help="folder of the JSON")


def check_shape_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--smoke``'s tiny config (unless ``--configs`` is given) and the bandwidth in bytes per second."""
    if args.smoke and args.configs == p.get_default("configs"):
        args.configs = SMOKE_CONFIGS
    args.bandwidth = parse_size("--hbm_bandwidth", args.hbm_bandwidth)


@dataclass
class WeightTimer:
    """Times products with one weight shape as a decode step runs them: ``x`` ``(rows, K)`` against enough copies of a
    weight ``(N, K)`` that each call reads its weight from HBM (``input_copies``), by ``time_ms``."""

    x: torch.Tensor
    weights: list[torch.Tensor]
    warmup_ms: float
    rep_ms: float
    bandwidth: float  # bytes per second, for ``fraction``

    @classmethod
    def build(cls, n: int, k: int, rows: int, device: torch.device, dtype: torch.dtype, args) -> "WeightTimer":
        """Random inputs on ``device``, the weight scaled so outputs are about 1; ``args``' timing and bandwidth."""
        weight_bytes = n * k * dtype.itemsize
        l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
        copies = input_copies(weight_bytes, l2) if l2 else 1
        weights = [torch.randn(n, k, device=device, dtype=dtype) / k**0.5 for _ in range(copies)]
        x = torch.randn(rows, k, device=device, dtype=dtype)
        return cls(x, weights, args.warmup_ms, args.rep_ms, args.bandwidth)

    @property
    def weight_bytes(self) -> int:
        return self.weights[0].numel() * self.weights[0].element_size()

    def ms(self, product: Callable[[torch.Tensor], object]) -> float:
        """Median milliseconds of ``product(weight)`` (a call reading ``self.x``), over the rotating weights."""
        calls = [lambda w=w: product(w) for w in self.weights]
        return time_ms(calls, self.x.device.type, self.warmup_ms, self.rep_ms)

    def fraction(self, ms: float) -> float:
        """The weight's bytes per ``ms`` as a fraction of the bandwidth."""
        return self.weight_bytes / (ms / 1e3) / self.bandwidth


def tuning_device(smoke: bool) -> tuple[torch.device, torch.dtype]:
    """Where a tuner measures: bf16 on the GPU, float32 on the CPU (``--smoke``, or no GPU: Triton's interpreter)."""
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def measure_config_shapes(
    configs: list[str], row_counts: list[int], measure: Callable[[int, int, int], dict], line: Callable[[dict], str]
) -> list[dict]:
    """``{"layer": name, **measure(N, K, rows)}`` for every distinct weight shape of ``configs`` (``weight_shapes``)
    at every row count, each printed as one line: the shape and cuBLAS's time, then ``line(row)``."""
    shapes = {(n, k): name for path in configs for name, n, k in weight_shapes(load_config("--configs", path))}
    rows = []
    for ((n, k), name), count in tqdm(list(itertools.product(shapes.items(), row_counts)), desc="shapes"):
        row = {"layer": name} | measure(n, k, count)
        tqdm.write(
            f"{name:22s} N={n:6d} K={k:6d} M={count}: cuBLAS {row['cublas_ms'] * 1e3:7.1f} us "
            f"({row['cublas_bandwidth_fraction']:.2f}), {line(row)}"
        )
        rows.append(row)
    return rows


def write_tuning(
    args, device: torch.device, dtype: torch.dtype, rows: list[dict], table: dict, literal, name: str, module: Path
) -> dict:
    """The tuner's JSON ``<args.output_dir>/<name>.json`` (setting, measured rows, table), the table's source printed
    (``literal(table, comment)``), and with ``args.apply`` written into ``module``; returns the JSON's content."""
    setting = {
        "configs": args.configs,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "hbm_bandwidth": args.hbm_bandwidth,
        "multiprocessors": processors(device),
    }
    source = literal(
        table, f"{setting['device']} ({setting['multiprocessors']} SMs), {dtype}, min_gain {args.min_gain}"
    )
    out = {"setting": setting, "shapes": rows, "table": {repr(key): launch._asdict() for key, launch in table.items()}}
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    write_json(path, out)
    print(f"written: {path}")
    print(source)
    if args.apply:
        apply_table(module, source)
    return out


def launch_table_literal(table: dict[tuple[int, ...], tuple], comment: str, key_type: str, launch_type: type) -> str:
    """Python source of a ``TUNED`` table of ``launch_type`` NamedTuples (``gemv_launch.py``,
    ``skinny_gemm_launch.py``) as ruff formats it: ``comment`` above, keys of type ``key_type``, launches by
    position, so that a row stays under 120 columns."""
    name = launch_type.__name__
    head = f"# {comment}\nTUNED: dict[{key_type}, {name}] = {{"
    if not table:
        return head + "}\n"
    rows = (f"    {key!r}: {name}{tuple(launch)!r}," for key, launch in table.items())
    return "\n".join([head, *rows, "}"]) + "\n"


def replace_table(source: str, literal: str) -> str:
    """A module's source (``decode_launch.py``, ``gemv_launch.py``, ``skinny_gemm_launch.py``) with its ``TUNED``
    assignment and the comment line right above it (which run measured it) replaced by ``literal`` (a table
    literal's output)."""
    lines = source.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("TUNED:")), None)
    if start is None or start == 0 or not lines[start - 1].startswith("# "):
        raise ValueError("no comment line followed by a `TUNED:` assignment")
    if lines[start].rstrip().endswith("{}"):  # an empty table on one line
        end = start
    else:
        end = next((i for i in range(start, len(lines)) if lines[i].rstrip("\n") == "}"), None)
    if end is None:
        raise ValueError("the `TUNED` assignment has no closing `}` line")
    return "".join(lines[: start - 1]) + literal + "".join(lines[end + 1 :])


def apply_table(path: Path, literal: str) -> None:
    """``replace_table`` in the file ``path``, through a temporary file: the module is never half written."""
    staged = path.with_name(path.name + ".partial")
    staged.write_text(replace_table(path.read_text(), literal))
    os.replace(staged, path)
    print(f"written into {path}")
