"""The prefill on a GPU: batch-1 sequential prefill without recompiles, sequential vs iterative against the "auto"
choice, and large-batch token steps against their roofline. One part per call, each under 9 minutes:

    python -m bench.measure_prefill batch1 --output_dir bench/results/prefill            # ~3 min
    python -m bench.measure_prefill paths_tinyllama_small --output_dir bench/results/prefill   # ~4 min
    python -m bench.measure_prefill paths_tinyllama_large --output_dir bench/results/prefill   # ~5 min
    python -m bench.measure_prefill paths_33b_b1 --output_dir bench/results/prefill     # ~5 min
    python -m bench.measure_prefill paths_33b_b32 --output_dir bench/results/prefill    # ~7 min
    python -m bench.measure_prefill paths_33b_b256 --output_dir bench/results/prefill   # ~6 min
    python -m bench.measure_prefill steps --output_dir bench/results/prefill            # ~5 min
    python -m bench.measure_prefill all --smoke --output_dir /tmp/prefill_smoke         # CPU: every part, tiny configs

- ``batch1``: ``test_latency.py`` at batch 1 with the sequential prefill of a 2048-token prompt, under
  ``TORCH_LOGS=recompiles``: no ``token_step`` recompilation in the log, and ``prefill_s`` against
  ``prompt_len x 1.5 x compiled_step_ms`` (the batch-1 captured decode step of the same run).
- ``paths_*``: ``test_latency.py --prefill iterative,sequential`` at the tinyllama and LLaMA-33B shapes, batches 1,
  32 and >= 256: which path was faster, against what ``auto`` chooses (the cost model's estimates are in each run).
- ``steps``: in this process, the captured token step at batches 1024 and 4096 at three fill levels (64 steps each,
  timed after a warm-up, no new graph allowed) against its roofline (``models.roofline.token_step_cost``), then a
  profile of a few steps (top kernels, GPU busy and idle time).

Every GPU call runs under ``--memory_cap 80GB`` (the 80 GB regime on a larger card); the GPU's bandwidth and matrix
rate come from ``models.roofline.GPUS``. Each part writes ``<part>.json`` (its checks) and one folder per run.
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

import torch

from models import sequential_prefill
from models.cli import ArgumentParser, check_output_dir, run_cli
from models.roofline import model_shape, token_step_cost

REPO = Path(__file__).resolve().parents[1]
TINYLLAMA, LLAMA33B, TINY = "configs/tinyllama_opt.json", "configs/llama33b_opt.json", "configs/test_tiny_opt.json"
CAP = ["--memory_cap", "80GB"]
BATCH1_BOUND = 1.5  # the batch-1 prefill may cost this many captured decode steps per prompt token
STEP_BOUND = 1.5  # a large-batch token step may cost this many times its roofline
# The smoke run's test_latency: the token step compiled on the CPU, so that TORCH_LOGS=recompiles has something to say.
SMOKE_LAUNCH = ("import sys; from models import sequential_prefill; sequential_prefill.CPU_COMPILE_BACKEND = 'eager'; "
                "import test_latency; test_latency.main(sys.argv[1:])")


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


def parts(smoke: bool) -> dict[str, list]:
    """Each part's runs; ``smoke``: the same runs on the CPU at tiny sizes."""
    def latency(name, config, prompt, gen, batches, prefill, limit, extra=()):
        if smoke:
            config, prompt, gen, batches = TINY, min(prompt, 150), min(gen, 8), ",".join(str(min(int(b), 3)) for b in batches.split(","))
        argv = ["--configs", config, "--compile", "--prefill", prefill, "--batches", batches, "--prompt_len", str(prompt),
                "--gen_len", str(gen), "--steps", str(min(gen, 16) // 2), *extra]
        return LatencyRun(name, tuple(argv + (["--device", "cpu"] if smoke else CAP)), limit)

    paths = "iterative,sequential"
    steps = (StepsRun(TINY, (2, 3), (2, 70), 64, 4, 160, "cpu") if smoke
             else StepsRun(TINYLLAMA, (1024, 4096), (64, 1024, 1900), 64, 8, 2048 + 64 + 8, "cuda"))
    return {
        "batch1": [latency("batch1_sequential", TINYLLAMA, 2048, 32, "1", "sequential", 500)],
        "paths_tinyllama_small": [latency("tinyllama_b1_b32", TINYLLAMA, 2048, 4, "1,32", paths, 520, ["--prefill_chunk", "64"])],
        "paths_tinyllama_large": [latency("tinyllama_b256_b512", TINYLLAMA, 2048, 4, "256,512", paths, 520, ["--prefill_chunk", "64"])],
        "paths_33b_b1": [latency("llama33b_b1", LLAMA33B, 2048, 4, "1", paths, 520)],
        "paths_33b_b32": [latency("llama33b_b32", LLAMA33B, 2048, 4, "32", paths, 520, ["--prefill_chunk", "8"])],
        "paths_33b_b256": [latency("llama33b_p256_b256", LLAMA33B, 256, 4, "256", paths, 520, ["--prefill_chunk", "32"])],
        "steps": [steps],
    }


def recompilations(log: str, function: str | None = None) -> list[str]:
    """The ``TORCH_LOGS=recompiles`` lines of ``log`` (of ``function`` only when given)."""
    lines = [line for line in log.splitlines() if "Recompiling function" in line]
    return [line for line in lines if function is None or f"function {function} " in line]


def batch1_report(latency: dict, log: str) -> dict:
    """The batch-1 sequential prefill against ``prompt_len x BATCH1_BOUND x compiled_step_ms``, and its recompilations."""
    prompt = latency["setting"]["prompt_len"]
    (model,) = latency["models"].values()
    (run,) = model["runs"]
    step_ms = run.get("compiled_step_ms")
    bound = prompt * BATCH1_BOUND * step_ms / 1e3 if step_ms else None
    return {
        "prefill_s": run["prefill_s"], "compiled_step_ms": step_ms, "bound_s": bound,
        "prefill_per_token_in_steps": run["prefill_s"] * 1e3 / (prompt * step_ms) if step_ms else None,
        "within_bound": run["prefill_s"] <= bound if bound else None,
        "token_step_recompilations": len(recompilations(log, "token_step")), "recompilations": len(recompilations(log)),
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
        rows.append({
            "batch": batch, "measured_prefill_s": measured, "cost_model_s": estimates, "faster": faster, "auto": auto,
            "auto_is_faster": auto == faster if faster else None,
            "measured_over_estimate": {p: measured[p] / estimates[p] for p in measured} if estimates else None,
        })
    return rows


def step_report(measured_ms: float, shape, batch: int, filled: float, hardware, value_bytes: int) -> dict:
    """A token step's measured ms against its roofline (the max of its matrix work and its reads)."""
    cost = token_step_cost(shape, batch, filled, value_bytes)
    roofline_ms = 1e3 * cost.seconds(hardware)
    return {"batch": batch, "filled": filled, "step_ms": measured_ms, "roofline_ms": roofline_ms,
            "compute_ms": 1e3 * cost.flops / hardware.peak_flops, "memory_ms": 1e3 * cost.bytes / hardware.hbm_bandwidth,
            "vs_roofline": measured_ms / roofline_ms, "within_bound": measured_ms <= STEP_BOUND * roofline_ms}


def run_latency(run: LatencyRun, out_dir: Path, smoke: bool) -> dict:
    """``test_latency.py`` in a child process under ``TORCH_LOGS=recompiles``; its JSON and log."""
    run_dir = out_dir / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    launch = [sys.executable, "-c", SMOKE_LAUNCH] if smoke else [sys.executable, "test_latency.py"]
    env = os.environ | {"TORCH_LOGS": "recompiles", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    with open(run_dir / "log", "w") as log:
        try:
            code = subprocess.run([*launch, *run.argv, "--output_dir", str(run_dir)], cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=run.limit_s).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    text = (run_dir / "log").read_text()
    result = run_dir / "latency.json"
    return {"returncode": code, "log": text, "latency": json.loads(result.read_text()) if result.exists() and code == 0 else None}


def time_steps(spec: StepsRun, out_dir: Path) -> list[dict]:
    """The captured token step at each batch and fill level, timed over ``spec.steps`` steps after a warm-up that
    compiles it (a new graph during the timed steps is a recompilation), against its roofline; then a profile."""
    import test_latency
    from bench.profile_decode import STEP_MARK, step_summary

    argv = ["--configs", spec.config, "--prompt_len", str(spec.cache_len - 8), "--gen_len", "8", "--cache", "static",
            "--device", spec.device, *([] if spec.device == "cpu" else CAP)]
    args = test_latency.parse_args(argv)
    hardware = test_latency.roofline_hardware(args)
    test_latency.apply_memory_cap(args)
    dtype = test_latency.resolve_dtype(args)
    model = test_latency.build_model(test_latency.load_config(spec.config, spec.cache_len), args, dtype)
    shape, cuda = model_shape(model.config), spec.device == "cuda"

    def warm_cache(batch: int, fill: int, tokens: int):
        """A cache filled to ``fill`` after 3 token steps (the step compiled, captured, replayed on this cache), and
        ``tokens`` more prompt tokens."""
        cache = test_latency.filled_cache(model, args, batch, fill)
        ids = torch.randint(3, model.config.vocab_size, (batch, tokens + 3), device=model.device)
        sequential_prefill.prefill_cache(model, ids[:, :3], cache)
        if cuda:
            torch.cuda.synchronize()
        return cache, ids[:, 3:]

    rows = []
    for batch in spec.batches:
        for fill in spec.fills:
            cache, ids = warm_cache(batch, fill, spec.steps)
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            sequential_prefill.prefill_cache(model, ids, cache)
            if cuda:
                torch.cuda.synchronize()
            step_ms = 1e3 * (time.perf_counter() - start) / spec.steps
            row = step_report(step_ms, shape, batch, fill + 3 + (spec.steps + 1) / 2, hardware, dtype.itemsize)
            rows.append(row | {"new_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs})
            del cache, ids
    batch, fill = spec.batches[-1], spec.fills[len(spec.fills) // 2]
    cache, ids = warm_cache(batch, fill, spec.profile_steps)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profiler:
        with torch.profiler.record_function(STEP_MARK):
            sequential_prefill.prefill_cache(model, ids, cache)
        if cuda:
            torch.cuda.synchronize()
    rows.append({"profile": {"batch": batch, "filled": fill} | step_summary(profiler.events(), spec.profile_steps, top=20)})
    return rows


def measure_part(part: str, runs: list, out_dir: Path, smoke: bool) -> dict:
    """Run one part and write ``<part>.json``: each run's checks (or why it has none)."""
    report = {"part": part, "smoke": smoke, "runs": {}}
    for run in runs:
        if isinstance(run, StepsRun):
            rows = time_steps(run, out_dir)
            report["runs"]["steps"] = rows
            continue
        result = run_latency(run, out_dir, smoke)
        entry = {"returncode": result["returncode"], "log": str(out_dir / run.name / "log")}
        if result["latency"] is not None:
            entry |= batch1_report(result["latency"], result["log"]) if part == "batch1" else {"paths": paths_report(result["latency"])}
        report["runs"][run.name] = entry
    (out_dir / f"{part}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=[*parts(smoke=False), "all"], help="which measurement (one GPU call each); all: every part")
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
