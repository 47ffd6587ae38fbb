"""Where a compiled decode step's time goes: torch.profiler over generate's decode steps, plus the attention alone
(and, with ``--prefill_steps``, an LCKV model's sequential-prefill token steps).

    python -m bench.profile_decode --output_dir bench/results/profile_decode            # GPU: tinyllama(_opt), bf16
    python -m bench.profile_decode --device cpu --configs configs/test_tiny_opt.json \\
        --prompt_len 16 --gen_len 8 --steps 3 --attention_batches 1 --output_dir /tmp/p  # CPU smoke run
    torchrun --nproc_per_node 2 -m bench.profile_decode --configs configs/llama65b.json \\
        --batch 12 ...                                                                   # tensor parallel

Per model: random bf16 weights, built as test_latency.py builds them (``build_random_model``: generate's captured
decoding loop; under ``torchrun`` sharded over the processes, figures per process, rank 0 writes), a static cache of
``prompt_len + gen_len`` slots prefilled with ``prompt_len - 1`` tokens (outside the profile), then ``generate``
(greedy, compiled decode step on CUDA) of ``--steps`` tokens, once
to compile and capture, once under the profiler. Reported per decode step: generate's wall time, the compiled call
alone (CUDA events), the GPU busy time (union of kernel intervals) and the GPU idle time inside the decode window,
host-sync calls (``cudaStreamSynchronize``, ``.item()``...), CUDA graph launches, the top GPU kernels and CPU ops;
and what TorchDynamo and inductor made of the decode step: the graphs compiled (2 for one clean step: the forward
and the token selection), graph breaks, and CUDA graphs skipped (run with ``TORCH_LOGS=cudagraphs`` for the reason).
The attention bench times one layer's decode attention (``sdpa_split_kv`` vs ``sdpa_packed_gqa``) on a half-filled
cache against its filled-KV bytes. ``--prefill_steps N``: for an LCKV model also ``N`` token steps of the sequential
prefill (``prefill_cache`` from an empty cache, after an untimed run that compiles and captures its step), summarised
per step as the decode steps are (``prefill`` in the model's entry): the steps at the start of a long prompt, whose
attention reads little, show what else a step costs. Writes ``profile.json`` and a ``trace_<model>.json`` (chrome
trace) per model.
"""

import argparse
import time
from functools import partial
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch.profiler import profile, record_function
from transformers import CompileConfig, StaticCache

import models  # noqa: F401  (registers opt-llama and the attention backends)
from models import PACKED_SDPA, SPLIT_KV
from models.chunked_prefill import prefill_in_chunks, set_cached_length
from models.export import write_json
from models.kernels.attention import packed_sdpa_attention
from models.kernels.decode_attention import load_split_kv_kernel, split_kv_sdpa_attention
from models.sequential_prefill import prefill_cache
from models.tensor_parallel import is_main_process, world_size
from tools.cli import DECODE_KERNEL_OPTIONS, add_decode_kernel_options, run_cli, set_decode_kernel_options
from tools.measure import (
    CompiledStepTimer,
    build_random_model,
    load_config_for_length,
    profiler_activities,
    synchronize,
)

# Host calls that wait for the GPU (or copy a scalar back): each one empties the queue between steps.
SYNC_NAMES = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "aten::_local_scalar_dense",
    "aten::item",
    "cudaMemcpy",
)
GRAPH_LAUNCH = "cudaGraphLaunch"
STEP_MARK = "decode_step"
PREFILL_MARK = "prefill_steps"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configs", nargs="+", default=["configs/tinyllama.json", "configs/tinyllama_opt.json"])
    p.add_argument("--attn_implementation", default=SPLIT_KV, help=f"{SPLIT_KV} (default), {PACKED_SDPA}, sdpa, ...")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--prompt_len", type=int, default=2048)
    p.add_argument("--gen_len", type=int, default=2048, help="sizes the static cache (prompt_len + gen_len slots)")
    p.add_argument("--steps", type=int, default=16, help="decode steps profiled")
    p.add_argument("--attention_batches", default="1,128,512", help="comma-separated batches of the attention bench")
    p.add_argument("--top", type=int, default=15, help="rows of the kernel and CPU-op tables")
    p.add_argument(
        "--prefill_steps",
        type=int,
        default=0,
        help="LCKV models: also profile this many token steps of the sequential prefill from an empty cache "
        "(0: none; at most prompt_len + gen_len)",
    )
    add_decode_kernel_options(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output_dir", default="bench/results/profile_decode")
    args = p.parse_args(argv)
    if args.prompt_len < 2 or args.steps < 2:
        p.error(f"--prompt_len {args.prompt_len} / --steps {args.steps}: allowed values are >= 2")
    if args.prefill_steps and not 3 <= args.prefill_steps <= args.prompt_len + args.gen_len:
        p.error(
            f"--prefill_steps {args.prefill_steps}: allowed are 0 and 3 to prompt_len + gen_len "
            f"({args.prompt_len + args.gen_len}; three steps capture the step's CUDA graph)"
        )
    return args


def merged_busy(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(busy, span) of ``(start, end)`` intervals: the length of their union and from the first start to the last
    end."""
    if not intervals:
        return 0.0, 0.0
    ordered = sorted(intervals)
    busy, (start, end) = 0.0, ordered[0]
    for s, e in ordered[1:]:
        if s > end:
            busy, start = busy + end - start, s
        end = max(end, e)
    return busy + end - start, max(e for _, e in ordered) - ordered[0][0]


def step_summary(events, steps: int, top: int, mark: str = STEP_MARK) -> dict:
    """Per-step GPU busy / idle time, host syncs and graph launches, and the top kernels / CPU ops, from the
    profiler's events of ``steps`` steps inside the ``mark`` ranges (GPU numbers are None without CUDA events)."""
    marks = [e for e in events if e.name == mark and e.device_type == torch.autograd.DeviceType.CPU]
    window = (min(e.time_range.start for e in marks), max(e.time_range.end for e in marks)) if marks else (0, 0)
    # Kernels from the first step on: the captured loop queues steps ahead of the GPU, so they run long after the
    # host's marks (the profile stops after a synchronize, and after the last step generate only gathers tokens).
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and window[0] <= e.time_range.start]
    busy_us, span_us = merged_busy([(e.time_range.start, e.time_range.end) for e in kernels])
    cpu = [
        e
        for e in events
        if e.device_type == torch.autograd.DeviceType.CPU and window[0] <= e.time_range.start <= window[1]
    ]

    def per_step(names) -> float:
        return sum(e.name in names for e in cpu) / steps

    def table(rows) -> list[dict]:
        totals: dict[str, list[float]] = {}
        for e in rows:
            totals.setdefault(e.name, [0.0, 0])
            totals[e.name][0] += e.time_range.elapsed_us()
            totals[e.name][1] += 1
        ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
        return [{"name": name[:120], "us_per_step": t / steps, "calls_per_step": n / steps} for name, (t, n) in ranked]

    cuda = bool(kernels)
    return {
        "wall_ms_per_step": (window[1] - window[0]) / 1e3 / steps,
        "gpu_busy_ms_per_step": busy_us / 1e3 / steps if cuda else None,
        "gpu_idle_ms_per_step": (span_us - busy_us) / 1e3 / steps if cuda else None,
        "kernels_per_step": len(kernels) / steps if cuda else None,
        "host_syncs_per_step": {name: per_step((name,)) for name in SYNC_NAMES},
        "graph_launches_per_step": per_step((GRAPH_LAUNCH,)),
        "top_kernels": table(kernels),
        "top_cpu_ops": table([e for e in cpu if e.name != mark]),
    }


class MarkedSteps(CompiledStepTimer):
    """``CompiledStepTimer`` that also marks each decode call as a ``STEP_MARK`` range in the profile."""

    def __call__(self, *args, **kwargs):
        with record_function(STEP_MARK):
            return super().__call__(*args, **kwargs)


def compile_config(device: str) -> CompileConfig | None:
    """generate's default on CUDA (inductor, CUDA graphs); on a CPU (smoke runs) the same compiled-call path with
    dynamo's eager backend, which generate otherwise skips there."""
    if device.startswith("cuda"):
        return None
    config = CompileConfig(backend="eager", mode=None)
    config._compile_all_devices = True
    return config


def decode(model, ids: torch.Tensor, args, steps: int, cache: StaticCache, profiler=None) -> tuple[float, float | None]:
    """Prefill ``ids[:, :-1]`` into ``cache``, rewound to empty (the same cache as the warm-up's, so the profiled
    call replays the captured graphs instead of recording them again), then ``generate`` ``steps`` greedy tokens
    (under ``profiler`` if given); returns generate's wall ms per decode step and the compiled call's ms (None on
    CPU)."""
    set_cached_length(cache, 0)
    with torch.no_grad():
        prefill_in_chunks(model, ids[:, :-1], cache, max(1, min(ids.shape[0], 32)))
        if ids.is_cuda:
            torch.cuda.synchronize()
        with MarkedSteps(model) as timer:
            if profiler is not None:
                profiler.start()
            start = time.perf_counter()
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                cache=cache,
                do_sample=False,
                max_new_tokens=steps,
                min_new_tokens=steps,
                pad_token_id=0,
                compile_config=compile_config(args.device),
            )
            if ids.is_cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
            if profiler is not None:
                profiler.stop()
    return 1e3 * wall / steps, timer.mean_ms()


def profile_model(path: str, args, out_dir: Path) -> dict:
    config = load_config_for_length(path, args.prompt_len + args.gen_len)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    model = build_random_model(config, dtype, args.device, args.attn_implementation)
    set_decode_kernel_options(model, args)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.prompt_len), device=model.device)
    torch._dynamo.reset()
    counters.clear()
    cache = StaticCache(config=model.config, max_cache_len=args.prompt_len + args.gen_len)
    decode(model, ids, args, args.steps, cache)  # compile and capture the decode step
    compiled = {
        "dynamo_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
    }
    prof = profile(activities=profiler_activities(model.device))
    generate_ms, compiled_ms = decode(model, ids, args, args.steps, cache, profiler=prof)
    name = Path(path).stem
    if is_main_process():
        prof.export_chrome_trace(str(out_dir / f"trace_{name}.json"))
    # generate's first forward (the last prompt token) is eager, not compiled: summarise the compiled calls only.
    summary = step_summary(prof.events(), args.steps - 1, args.top)
    prefill = None
    if args.prefill_steps and config.model_type == "opt-llama":
        prefill = profile_prefill(model, args, cache)
    elif args.prefill_steps:
        print(f"--prefill_steps: {path} is a {config.model_type}, which has no sequential prefill; not profiled")
    del cache, model
    return {
        "config": path,
        "generate_ms_per_step": generate_ms,
        "compiled_step_ms": compiled_ms,
        **compiled,
        **summary,
        **({"prefill": prefill} if prefill is not None else {}),
    }


def profile_prefill(model, args, cache: StaticCache) -> dict:
    """``--prefill_steps`` token steps of the sequential prefill from the rewound ``cache``, once untimed (compile and
    capture the step), once under the profiler: ``ms_per_step``, the steps' wall time up to the end of their GPU work,
    and ``step_summary``'s figures (its ``wall_ms_per_step`` is the host's, up to the return of the last launch)."""
    steps = args.prefill_steps
    ids = torch.randint(3, model.config.vocab_size, (args.batch, steps), device=model.device)
    prof = profile(activities=profiler_activities(model.device))
    for profiler in (None, prof):
        set_cached_length(cache, 0)
        synchronize(model.device)
        if profiler is not None:
            profiler.start()
        start = time.perf_counter()
        with torch.no_grad(), record_function(PREFILL_MARK):
            prefill_cache(model, ids, cache)
        synchronize(model.device)
        wall = time.perf_counter() - start
        if profiler is not None:
            profiler.stop()
    return {
        "steps": steps,
        "ms_per_step": 1e3 * wall / steps,
        **step_summary(prof.events(), steps, args.top, PREFILL_MARK),
    }


def time_ms(fn, repeats: int = 20) -> float:
    """Mean milliseconds of ``fn()`` (CUDA events on a GPU, wall time on a CPU), after one warm-up call."""
    fn()
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return 1e3 * (time.perf_counter() - start) / repeats
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / repeats


def attention_bench(config_path: str, args) -> list[dict]:
    """One layer's decode attention on a cache of ``prompt_len + gen_len`` slots with ``prompt_len`` filled:
    ms and filled-KV GB/s of ``sdpa_split_kv`` and ``sdpa_packed_gqa`` per batch; under ``torchrun``, one process's
    share of the heads (tensor parallelism splits them evenly)."""
    config = load_config_for_length(config_path, args.prompt_len + args.gen_len)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    heads, kv_heads, dim = (
        config.num_attention_heads // world_size(),
        config.num_key_value_heads // world_size(),
        config.head_dim,
    )
    slots, filled = args.prompt_len + args.gen_len, args.prompt_len
    rows = []
    split_kv = partial(split_kv_sdpa_attention, kernel=load_split_kv_kernel())  # the kernel this process can run
    for batch in map(int, args.attention_batches.split(",")):
        query = torch.randn(batch, heads, 1, dim, device=args.device, dtype=dtype)
        key, value = (torch.randn(batch, kv_heads, slots, dim, device=args.device, dtype=dtype) for _ in range(2))
        mask = torch.zeros(batch, 1, 1, slots, dtype=torch.bool, device=args.device)
        mask[..., :filled] = True
        filled_bytes = 2 * batch * kv_heads * filled * dim * dtype.itemsize
        row = {"batch": batch, "slots": slots, "filled": filled, "filled_kv_bytes": filled_bytes}
        for name, fn in ((SPLIT_KV, split_kv), (PACKED_SDPA, packed_sdpa_attention)):
            inputs = (None, query, key, value, mask)
            ms = time_ms(lambda fn=fn, inputs=inputs: fn(*inputs, scaling=dim**-0.5))
            row[name] = {"ms": ms, "filled_kv_GBps": filled_bytes / ms / 1e6}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # every process: each may write (rank 0 does)
    if args.device.startswith("cuda"):
        torch._dynamo.config.cache_size_limit = 64
    setting = {
        k: getattr(args, k)
        for k in (
            "attn_implementation",
            "batch",
            "prompt_len",
            "gen_len",
            "steps",
            "device",
            "prefill_steps",
            *DECODE_KERNEL_OPTIONS,
        )
    }
    setting["device_name"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    setting["tp_size"] = world_size()
    results = {Path(c).stem: profile_model(c, args, out_dir) for c in args.configs}
    out = {"setting": setting, "models": results, "attention": attention_bench(args.configs[0], args)}
    if not is_main_process():
        return out
    write_json(out_dir / "profile.json", out)
    for name, r in results.items():
        compiled = r["compiled_step_ms"]
        print(
            f"== {name}: generate {r['generate_ms_per_step']:.3f} ms/step, compiled call "
            f"{'n/a' if compiled is None else f'{compiled:.3f}'} ms, GPU busy {r['gpu_busy_ms_per_step']} ms, "
            f"idle {r['gpu_idle_ms_per_step']} ms, graph launches {r['graph_launches_per_step']}, dynamo graphs "
            f"{r['dynamo_graphs']}, graph breaks {r['graph_breaks']}, CUDA graphs skipped {r['cudagraph_skips']}, "
            "syncs "
            f"{ {k: v for k, v in r['host_syncs_per_step'].items() if v} }"
        )
        for row in r["top_kernels"][:8] + r["top_cpu_ops"][:8]:
            print(f"   {row['us_per_step']:9.1f} us x{row['calls_per_step']:5.1f}  {row['name']}")
        if "prefill" in r:
            p = r["prefill"]
            print(
                f"   prefill: {p['ms_per_step']:.3f} ms/step over {p['steps']} steps, GPU busy "
                f"{p['gpu_busy_ms_per_step']} ms, idle {p['gpu_idle_ms_per_step']} ms"
            )
            for row in p["top_kernels"][:8] + p["top_cpu_ops"][:8]:
                print(f"   {row['us_per_step']:9.1f} us x{row['calls_per_step']:5.1f}  {row['name']}")
    for row in out["attention"]:
        print(
            f"attention b={row['batch']}: "
            + ", ".join(
                f"{k} {row[k]['ms']:.3f} ms ({row[k]['filled_kv_GBps']:.0f} GB/s filled KV)"
                for k in (SPLIT_KV, PACKED_SDPA)
            )
        )
    print(f"written: {out_dir / 'profile.json'}")
    return out


if __name__ == "__main__":
    run_cli(main, prog="profile_decode")  # a usage error: one line, exit status 2
