"""The prefill on a GPU: batch-1 sequential prefill without recompiles, sequential vs iterative against the "auto"
choice, large-batch token steps against their roofline, and where the iterative prefill's time goes. One part per
call, each under 9 minutes:

    python -m bench.measure_prefill batch1 --output_dir bench/results/prefill            # ~3 min
    python -m bench.measure_prefill paths_tinyllama_small --output_dir bench/results/prefill   # ~4 min
    python -m bench.measure_prefill paths_tinyllama_large --output_dir bench/results/prefill   # ~5 min
    python -m bench.measure_prefill paths_33b_b1 --output_dir bench/results/prefill     # ~5 min
    python -m bench.measure_prefill paths_33b_b32 --output_dir bench/results/prefill    # ~7 min
    python -m bench.measure_prefill paths_33b_b256 --output_dir bench/results/prefill   # ~6 min
    python -m bench.measure_prefill steps --output_dir bench/results/prefill            # ~5 min
    python -m bench.measure_prefill profile_iterative --output_dir bench/results/prefill   # ~3 min
    python -m bench.measure_prefill all --smoke --output_dir /tmp/prefill_smoke         # CPU: every part, tiny configs

- ``batch1``: ``test_latency.py`` at batch 1 with the sequential prefill of a 2048-token prompt, under
  ``TORCH_LOGS=recompiles``: no ``token_step`` recompilation in the log, and ``prefill_s`` against
  ``prompt_len x 1.5 x compiled_step_ms`` (the batch-1 captured decode step of the same run).
- ``paths_*``: ``test_latency.py --prefill iterative,sequential`` at the tinyllama and LLaMA-33B shapes, batches 1,
  32 and >= 256: which path was faster, against what ``auto`` chooses (the cost model's estimates are in each run).
- ``steps``: in this process, the captured token step at batches 1024 and 4096 at three fill levels (64 steps each,
  timed after a warm-up, no new graph allowed) against its roofline (``models.roofline.token_step_cost``), with the
  fused projections, then a profile of a few steps at the lowest and the middle fill level of the largest batch
  (top kernels, GPU busy and idle time).
- ``profile_iterative``: in this process, the iterative prefill (one forward into a ``DynamicCache``, as
  ``prefill_in_chunks`` runs it) at the tinyllama shape, batch 1 / prompt 2048, batch 8 / 128 and batch 32 / 2048,
  timed after a warm-up against its roofline (``models.roofline.iterative_prefill_cost``), in ms per full layer run
  too; the same forwards with the strict mask run as a shifted causal attention (``LCKV_FLASH_ATTN=1``: no dense
  mask) and a Llama of the same shape's parallel prefill; one strict layer's attention at batch 1 / 2048 as the
  model calls it, under each SDPA backend forced and as the shifted causal attention, with the kernels (or CPU ops)
  the model's call runs; and a profile of the batch-1 / 2048 forward (top CUDA kernels and CPU ops with their total
  time, GPU busy vs wall, number of kernels, host syncs).

Every GPU call runs under ``--memory_cap 79GiB`` (the memory an 80 GB H100 gives CUDA, on a larger card); the GPU's
bandwidth and matrix rate come from ``models.roofline.GPUS``. Each part writes ``<part>.json`` (its checks) and one
folder per run.
``--smoke`` runs the same steps on the CPU with tiny configs, the token step compiled by dynamo's eager backend
(``sequential_prefill.CPU_COMPILE_BACKEND``), so recompilations show up as on a GPU.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.cache_utils import DynamicCache

from models import sequential_prefill
from models.config_loading import llama_twin
from models.export import write_json
from models.kernels.attention import sdpa_causal_attention, strict_causal_attention
from models.kernels.flags import FLASH_ATTN
from models.masks import lckv_masks
from models.roofline import full_layer_runs, iterative_prefill_cost, model_shape, parallel_prefill_cost, token_step_cost
from tools import latency
from tools.cli import ArgumentParser, check_output_dir, run_cli
from tools.measure import load_config_for_length, profiler_activities, synchronize

REPO = Path(__file__).resolve().parents[1]
TINYLLAMA, LLAMA33B, TINY = "configs/tinyllama_opt.json", "configs/llama33b_opt.json", "configs/test_tiny_opt.json"
CAP = ["--memory_cap", "79GiB"]  # 80e9 bytes would be 74.5 GiB, less than an 80 GB card holds
BATCH1_BOUND = 1.5  # the batch-1 prefill may cost this many captured decode steps per prompt token
STEP_BOUND = 1.5  # a large-batch token step may cost this many times its roofline
# The smoke run's test_latency: the token step compiled on the CPU, so that TORCH_LOGS=recompiles has something to say.
SMOKE_LAUNCH = (
    "import sys; from models import sequential_prefill; sequential_prefill.CPU_COMPILE_BACKEND = 'eager'; "
    "import test_latency; test_latency.main(sys.argv[1:])"
)


@dataclass(frozen=True)
class LatencyRun:
    """One ``test_latency.py`` call: its arguments (without --output_dir) and its time limit."""

    name: str
    argv: tuple[str, ...]
    limit_s: int


@dataclass(frozen=True)
class StepsRun:
    """The in-process token-step timing: a config, batches, fill levels, steps per level."""

    config: str
    batches: tuple[int, ...]
    fills: tuple[int, ...]
    steps: int
    profile_steps: int
    cache_len: int
    device: str


@dataclass(frozen=True)
class IterativeRun:
    """The in-process iterative prefill: a config, its ``(batch, prompt)`` shapes, timed forwards per shape, and the
    shape whose strict attention is timed per backend and whose forward is profiled."""

    config: str
    shapes: tuple[tuple[int, int], ...]
    repeats: int
    profiled: tuple[int, int]
    device: str


def parts(smoke: bool) -> dict[str, list]:
    """Each part's runs; ``smoke``: the same runs on the CPU at tiny sizes."""

    def latency(name, config, prompt, gen, batches, prefill, limit, extra=()):
        if smoke:
            config, prompt, gen, batches = (
                TINY,
                min(prompt, 150),
                min(gen, 8),
                ",".join(str(min(int(b), 3)) for b in batches.split(",")),
            )
        argv = [
            "--configs",
            config,
            "--compile",
            "--prefill",
            prefill,
            "--batches",
            batches,
            "--prompt_len",
            str(prompt),
            "--gen_len",
            str(gen),
            "--steps",
            str(min(gen, 16) // 2),
            *extra,
        ]
        return LatencyRun(name, tuple(argv + (["--device", "cpu"] if smoke else CAP)), limit)

    paths = "iterative,sequential"
    steps = (
        StepsRun(TINY, (2, 3), (2, 70), 64, 4, 160, "cpu")
        if smoke
        else StepsRun(TINYLLAMA, (1024, 4096), (64, 1024, 1900), 64, 8, 2048 + 64 + 8, "cuda")
    )
    return {
        "batch1": [latency("batch1_sequential", TINYLLAMA, 2048, 32, "1", "sequential", 500)],
        "paths_tinyllama_small": [
            latency("tinyllama_b1_b32", TINYLLAMA, 2048, 4, "1,32", paths, 520, ["--prefill_chunk", "64"])
        ],
        "paths_tinyllama_large": [
            latency("tinyllama_b256_b512", TINYLLAMA, 2048, 4, "256,512", paths, 520, ["--prefill_chunk", "64"])
        ],
        "paths_33b_b1": [latency("llama33b_b1", LLAMA33B, 2048, 4, "1", paths, 520)],
        "paths_33b_b32": [latency("llama33b_b32", LLAMA33B, 2048, 4, "32", paths, 520, ["--prefill_chunk", "8"])],
        "paths_33b_b256": [
            latency("llama33b_p256_b256", LLAMA33B, 256, 4, "256", paths, 520, ["--prefill_chunk", "32"])
        ],
        "steps": [steps],
        "profile_iterative": [
            IterativeRun(TINY, ((1, 96), (3, 24), (2, 96)), 1, (1, 96), "cpu")
            if smoke
            else IterativeRun(TINYLLAMA, ((1, 2048), (8, 128), (32, 2048)), 3, (1, 2048), "cuda")
        ],
    }


def recompilations(log: str, function: str | None = None) -> list[str]:
    """The ``TORCH_LOGS=recompiles`` lines of ``log`` (of ``function`` only when given)."""
    lines = [line for line in log.splitlines() if "Recompiling function" in line]
    return [line for line in lines if function is None or f"function {function} " in line]


def batch1_report(latency: dict, log: str) -> dict:
    """The batch-1 sequential prefill against ``prompt_len x BATCH1_BOUND x compiled_step_ms``, and its
    recompilations."""
    prompt = latency["setting"]["prompt_len"]
    (model,) = latency["models"].values()
    (run,) = model["runs"]
    step_ms = run.get("compiled_step_ms")
    bound = prompt * BATCH1_BOUND * step_ms / 1e3 if step_ms else None
    return {
        "prefill_s": run["prefill_s"],
        "compiled_step_ms": step_ms,
        "bound_s": bound,
        "prefill_per_token_in_steps": run["prefill_s"] * 1e3 / (prompt * step_ms) if step_ms else None,
        "within_bound": run["prefill_s"] <= bound if bound else None,
        "token_step_recompilations": len(recompilations(log, "token_step")),
        "recompilations": len(recompilations(log)),
    }


def paths_report(latency: dict) -> list[dict]:
    """Per batch: the measured prefill of each path, the faster one, what auto chose from the cost model's
    estimates, and each path's measured time over its estimate (the cost model's calibration)."""
    runs = {}
    for name, model in latency["models"].items():
        for run in model["runs"]:
            if not run.get("oom"):
                runs.setdefault(run["batch"], {})[name.rsplit(":", 1)[-1]] = run
    rows = []
    for batch, by_path in sorted(runs.items()):
        measured = {path: run["prefill_s"] for path, run in by_path.items()}
        estimates = next(iter(by_path.values())).get("prefill_cost_model_s")
        auto = min(estimates, key=estimates.get) if estimates else "iterative"
        faster = min(measured, key=measured.get) if len(measured) == 2 else None
        rows.append(
            {
                "batch": batch,
                "measured_prefill_s": measured,
                "cost_model_s": estimates,
                "faster": faster,
                "auto": auto,
                "auto_is_faster": auto == faster if faster else None,
                "measured_over_estimate": {p: measured[p] / estimates[p] for p in measured} if estimates else None,
            }
        )
    return rows


def step_report(measured_ms: float, shape, batch: int, filled: float, hardware, value_bytes: int) -> dict:
    """A token step's measured ms against its roofline (the max of its matrix work and its reads)."""
    cost = token_step_cost(shape, batch, filled, value_bytes)
    roofline_ms = 1e3 * cost.seconds(hardware)
    return {
        "batch": batch,
        "filled": filled,
        "step_ms": measured_ms,
        "roofline_ms": roofline_ms,
        "compute_ms": 1e3 * cost.flops / hardware.peak_flops,
        "memory_ms": 1e3 * cost.bytes / hardware.hbm_bandwidth,
        "vs_roofline": measured_ms / roofline_ms,
        "within_bound": measured_ms <= STEP_BOUND * roofline_ms,
    }


def run_latency(run: LatencyRun, out_dir: Path, smoke: bool) -> dict:
    """``test_latency.py`` in a child process under ``TORCH_LOGS=recompiles``; its JSON and log."""
    run_dir = out_dir / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    launch = [sys.executable, "-c", SMOKE_LAUNCH] if smoke else [sys.executable, "test_latency.py"]
    env = os.environ | {"TORCH_LOGS": "recompiles", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    with open(run_dir / "log", "w") as log:
        try:
            code = subprocess.run(
                [*launch, *run.argv, "--output_dir", str(run_dir)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=run.limit_s,
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    text = (run_dir / "log").read_text()
    result = run_dir / "latency.json"
    return {
        "returncode": code,
        "log": text,
        "latency": json.loads(result.read_text()) if result.exists() and code == 0 else None,
    }


def latency_setup(argv: list[str]) -> tuple:
    """test_latency's flags for an in-process measurement: the parsed args (memory cap applied), the hardware its
    rooflines use, the dtype."""
    args = latency.parse_args(argv)
    hardware = latency.roofline_hardware(args)
    latency.apply_memory_cap(args)
    return args, hardware, latency.resolve_dtype(args)


def time_steps(spec: StepsRun, out_dir: Path) -> list[dict]:
    """The captured token step at each batch and fill level, timed over ``spec.steps`` steps after a warm-up that
    compiles it (a new graph during the timed steps is a recompilation), against its roofline; then profiles at the
    lowest and the middle fill level of the largest batch."""
    from bench.profile_decode import STEP_MARK, step_summary

    argv = [
        "--configs",
        spec.config,
        "--prompt_len",
        str(spec.cache_len - 8),
        "--gen_len",
        "8",
        "--cache",
        "static",
        "--device",
        spec.device,
        "--fused_projections",  # as the end-to-end runs of bench/e2e_throughput.sh with EXTRA_FLAGS
        *([] if spec.device == "cpu" else CAP),
    ]
    args, hardware, dtype = latency_setup(argv)
    model = latency.build_model(load_config_for_length(spec.config, spec.cache_len), args, dtype)
    shape = model_shape(model.config)

    def warm_cache(batch: int, fill: int, tokens: int):
        """A cache filled to ``fill`` after 3 token steps (the step compiled, captured, replayed on this cache), and
        ``tokens`` more prompt tokens."""
        cache = latency.filled_cache(model, args, batch, fill)
        ids = torch.randint(3, model.config.vocab_size, (batch, tokens + 3), device=model.device)
        sequential_prefill.prefill_cache(model, ids[:, :3], cache)
        synchronize(model.device)
        return cache, ids[:, 3:]

    rows = []
    for batch in spec.batches:
        for fill in spec.fills:
            cache, ids = warm_cache(batch, fill, spec.steps)
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            sequential_prefill.prefill_cache(model, ids, cache)
            synchronize(model.device)
            step_ms = 1e3 * (time.perf_counter() - start) / spec.steps
            row = step_report(step_ms, shape, batch, fill + 3 + (spec.steps + 1) / 2, hardware, dtype.itemsize)
            rows.append(row | {"new_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs})
            del cache, ids
    batch = spec.batches[-1]
    for fill in (spec.fills[0], spec.fills[len(spec.fills) // 2]):  # matmul-bound near the start, KV-bound later
        cache, ids = warm_cache(batch, fill, spec.profile_steps)
        with torch.profiler.profile(activities=profiler_activities(model.device)) as profiler:
            with torch.profiler.record_function(STEP_MARK):
                sequential_prefill.prefill_cache(model, ids, cache)
            synchronize(model.device)
        summary = step_summary(profiler.events(), spec.profile_steps, top=20)
        rows.append({"profile": {"batch": batch, "filled": fill} | summary})
        del cache, ids
    return rows


# The SDPA backends one strict attention is timed under (forced one at a time; one that cannot run records why).
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def prefill_forward(model, ids: torch.Tensor) -> None:
    """One prefill forward of ``ids`` ``(B, T)`` into a fresh ``DynamicCache``, only the last logits kept (as
    ``prefill_in_chunks`` runs it), no gradients."""
    with torch.no_grad():
        model(ids, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)


def time_prefill(model, ids: torch.Tensor, repeats: int) -> list[float]:
    """Seconds of ``repeats`` synchronised prefill forwards after one warm-up forward of the same shape."""
    prefill_forward(model, ids)
    seconds = []
    for _ in range(repeats):
        synchronize(model.device)
        start = time.perf_counter()
        prefill_forward(model, ids)
        synchronize(model.device)
        seconds.append(time.perf_counter() - start)
    return seconds


def prefill_report(
    seconds: list[float], shape, batch: int, prompt: int, hardware, value_bytes: int, iterative: bool
) -> dict:
    """The best of the timed forwards against the roofline of the path (iterative, or a Llama's one pass), and per full
    layer run (``models.roofline.full_layer_runs``)."""
    cost = (iterative_prefill_cost if iterative else parallel_prefill_cost)(shape, batch, prompt, value_bytes)
    roofline_s, best, runs = cost.seconds(hardware), min(seconds), full_layer_runs(shape, prompt)
    return {
        "batch": batch,
        "prompt": prompt,
        "prefill_s": best,
        "all_s": seconds,
        "roofline_s": roofline_s,
        "vs_roofline": best / roofline_s,
        "layer_runs": runs,
        "ms_per_layer_run": 1e3 * best / runs,
        "roofline_ms_per_layer_run": 1e3 * roofline_s / runs,
    }


def strict_attention_bench(model, batch: int, prompt: int) -> dict:
    """One strict layer's attention at ``batch`` x ``prompt`` as the model calls it (the configured attention, the
    dense strict mask of ``lckv_masks``): ms per call as it runs, under each SDPA backend forced, and as the shifted
    causal attention; and the kernels (CPU ops without CUDA) the model's call runs."""
    from bench.profile_decode import time_ms

    config, device, dtype = model.config, model.device, model.dtype
    strict_layer = next(i for i, kind in enumerate(model.model.mask_kinds) if kind == "strict")
    module = model.model.layers[strict_layer].self_attn
    query = torch.randn(batch, config.num_attention_heads, prompt, config.head_dim, device=device, dtype=dtype)
    key, value = (
        torch.randn(batch, config.num_key_value_heads, prompt, config.head_dim, device=device, dtype=dtype)
        for _ in range(2)
    )
    embeds = torch.zeros(batch, prompt, 1, device=device, dtype=dtype)
    positions = torch.arange(prompt, device=device)[None]
    selection = model.model.kernel_selection
    mask = lckv_masks(config, embeds, None, DynamicCache(config=config), positions, 0, model.model.mask_sizing)[
        "strict"
    ]
    attention = selection.attention_interface(config._attn_implementation)

    def as_model_calls():
        with torch.no_grad():
            return attention(module, query, key, value, mask, dropout=0.0, scaling=module.scaling)

    row = {
        "batch": batch,
        "prompt": prompt,
        "mask": {"shape": list(mask.shape), "dtype": str(mask.dtype)},
        "as_model_calls_ms": time_ms(as_model_calls),
    }
    for name, backend in SDPA_BACKENDS.items():
        try:
            with sdpa_kernel([backend]):
                row[f"{name}_ms"] = time_ms(as_model_calls)
        except RuntimeError as error:
            row[f"{name}_ms"] = f"cannot run: {str(error).splitlines()[0][:200]}"
    row["shifted_causal_ms"] = time_ms(
        lambda: strict_causal_attention(sdpa_causal_attention, module, query, key, value, 0.0, module.scaling)
    )
    with torch.profiler.profile(activities=profiler_activities(device)) as profiler:
        as_model_calls()
        synchronize(device)
    wanted = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    row["as_model_calls_runs"] = sorted({e.name[:120] for e in profiler.events() if e.device_type == wanted})
    return row


def profile_prefill(model, ids: torch.Tensor, top: int = 25) -> dict:
    """One prefill forward under the profiler (after a warm-up): ``bench.profile_decode.step_summary`` of it as one
    step."""
    from bench.profile_decode import STEP_MARK, step_summary

    prefill_forward(model, ids)
    synchronize(model.device)
    with torch.profiler.profile(activities=profiler_activities(model.device)) as profiler:
        with torch.profiler.record_function(STEP_MARK):
            prefill_forward(model, ids)
        synchronize(model.device)
    return {"batch": ids.shape[0], "prompt": ids.shape[1]} | step_summary(profiler.events(), 1, top)


def time_iterative(spec: IterativeRun) -> dict:
    """The iterative prefill per shape (flags as set, then with the strict mask as a shifted causal attention), a Llama
    of the same shape, the strict attention per backend and a profile of the ``spec.profiled`` forward."""

    longest = max(prompt for _, prompt in spec.shapes)
    argv = [
        "--configs",
        spec.config,
        "--prompt_len",
        str(longest),
        "--gen_len",
        "1",
        "--device",
        spec.device,
        *([] if spec.device == "cpu" else CAP),
    ]
    args, hardware, dtype = latency_setup(argv)
    config = load_config_for_length(spec.config, longest + 1)
    config.prefill = "iterative"
    model = latency.build_model(config, args, dtype)
    shape, value_bytes = model_shape(model.config), dtype.itemsize
    inputs = {s: torch.randint(3, config.vocab_size, s, device=model.device) for s in spec.shapes}

    def rows(model, iterative: bool) -> list[dict]:
        shape = model_shape(model.config, as_llama=not iterative)
        return [
            prefill_report(time_prefill(model, inputs[s], spec.repeats), shape, *s, hardware, value_bytes, iterative)
            for s in spec.shapes
        ]

    report = {
        "device": str(model.device),
        "dtype": str(dtype),
        "attn_implementation": config._attn_implementation,
        "hardware": hardware.name,
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "flags_as_set": rows(model, True),
    }
    report["strict_attention"] = strict_attention_bench(model, *spec.profiled)
    report["profile"] = profile_prefill(model, inputs[spec.profiled])
    del model
    with mock.patch.dict(os.environ, {FLASH_ATTN: "1"}):  # a model's kernels are chosen when it is built
        shifted = latency.build_model(config, args, dtype)  # the same weights (build_model seeds them)
    # None where the flag cannot take effect (no CUDA): then these rows run the dense strict mask again.
    report["shifted_causal_kernel"] = getattr(shifted.model.kernel_selection.causal_attention, "__name__", None)
    report["shifted_causal_strict"] = rows(shifted, True)
    del shifted
    llama = latency.build_model(llama_twin(config), args, dtype)
    report["llama_same_shape"] = rows(llama, False)
    del llama
    report["shape"] = {"layer_runs_per_forward": {f"{b}x{t}": full_layer_runs(shape, t) for b, t in spec.shapes}}
    return report


def measure_part(part: str, runs: list, out_dir: Path, smoke: bool) -> dict:
    """Run one part and write ``<part>.json``: each run's checks (or why it has none)."""
    report = {"part": part, "smoke": smoke, "runs": {}}
    for run in runs:
        if isinstance(run, StepsRun):
            rows = time_steps(run, out_dir)
            report["runs"]["steps"] = rows
            continue
        if isinstance(run, IterativeRun):
            report["runs"]["iterative"] = time_iterative(run)
            continue
        result = run_latency(run, out_dir, smoke)
        entry = {"returncode": result["returncode"], "log": str(out_dir / run.name / "log")}
        if result["latency"] is not None:
            entry |= (
                batch1_report(result["latency"], result["log"])
                if part == "batch1"
                else {"paths": paths_report(result["latency"])}
            )
        report["runs"][run.name] = entry
    write_json(out_dir / f"{part}.json", report)
    print(json.dumps(report, indent=2))
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "part", choices=[*parts(smoke=False), "all"], help="which measurement (one GPU call each); all: every part"
    )
    p.add_argument("--smoke", action="store_true", help="the same steps on the CPU with tiny configs")
    p.add_argument("--output_dir", default="bench/results/prefill", help="where <part>.json and each run's folder go")
    args = p.parse_args(argv)
    check_output_dir("--output_dir", args.output_dir)
    if not args.smoke and not torch.cuda.is_available():
        p.error("part: needs a CUDA GPU; allowed on this machine is --smoke")
    return args


def measure(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        sequential_prefill.CPU_COMPILE_BACKEND = "eager"
    plan = parts(args.smoke)
    chosen = plan if args.part == "all" else {args.part: plan[args.part]}
    return {part: measure_part(part, runs, out_dir, args.smoke) for part, runs in chosen.items()}


def main(argv: list[str] | None = None) -> dict:
    """The command line; bad input ends the process with one line on stderr and exit status 2."""
    return run_cli(measure, argv, prog="bench.measure_prefill")


if __name__ == "__main__":
    main()
