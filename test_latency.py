"""Latency, throughput and memory of LCKV (opt-llama) against a standard Llama of the same shape.

Each model gets random weights, random prompts of ``--prompt_len`` tokens and samples ``--gen_len`` new
tokens; the batch doubles until out of memory (or ``--max_batch``), then bisects. Per model: max batch,
throughput at every batch tried, prefill time, per-step latency against the weights + KV bytes / HBM
bandwidth roofline, peak memory and the bytes of the KV cache tensors; then each model's ratio to the
baseline (the first Llama config). LCKV models run each ``--prefill`` mode (``config.prefill``; the sequential
prefill fills the static cache token by token through one compiled step, ``models.sequential_prefill``). With
``--steps`` below ``--gen_len`` the decode step is measured at the start and at the end of the context and the
full ``gen_len`` is extrapolated from them (``setting.extrapolation`` in the JSON). Each run also states its
end-to-end rate over the e2e roofline and its prefill over the roofline of the path that ran (``models.roofline``,
with the GPU's bandwidth and matrix rate, recorded in ``setting.roofline``); ``--memory_cap`` reproduces the regime of
a smaller card. ``--plan`` needs no GPU: KV bytes per token and the KV-bound max batch per sequence length, from the
config shapes alone. Under ``torchrun --nproc_per_node N`` every model is sharded over the
N processes (tensor parallelism, ``models.tensor_parallel``), figures are per process, and rank 0 writes the results.

    python test_latency.py --configs configs/tinyllama.json configs/tinyllama_opt.json --compile --output_dir bench/x
    python test_latency.py --plan --gpu_memory 80GB
    torchrun --nproc_per_node 2 test_latency.py --configs configs/llama65b.json configs/llama65b_opt.json --compile
"""

import gc
import json
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PretrainedConfig, StaticCache

from models import (  # import models registers opt-llama and both decoding attentions
    OptLlamaConfig,
)
from models.chunked_prefill import prefill_in_chunks
from models.export import write_json
from models.prefill_modes import choose_prefill, prefill_seconds
from models.roofline import (
    Hardware,
    decode_roofline_seconds,
    iterative_prefill_cost,
    model_shape,
    parallel_prefill_cost,
    sequential_prefill_seconds,
    token_step_cost,
)
from models.sequential_prefill import compile_options, compiled_token_step, prefill_cache
from models.tensor_parallel import (
    config_tp_size,
    end_process_group,
    is_main_process,
    world_size,
)
from tools import cli as shared
from tools.cli import (
    UsageError,
    run_cli,
)
from tools.gpu_clocks import ClockSampler, describe, nvidia_smi_id
from tools.latency import (
    apply_memory_cap,
    build_model,
    filled_cache,
    kv_bytes_and_slots,
    kv_bytes_per_token,
    kv_read_bytes_per_token,
    new_cache,
    num_kv_layers,
    parameter_counts,
    parse_args,
    pricing_hardware,
    resolve_dtype,
    roofline_hardware,
    step_matmul_floor_ms,
    step_roofline_ms,
    weight_bytes,
)
from tools.measure import CompiledStepTimer, StepTimer, baseline_name, load_config_for_length, synchronize


def plan(
    config: PretrainedConfig, dtype: torch.dtype, gpu_memory: float, lengths: list[int], bandwidth: float, tp: int = 1
) -> dict:
    """Per sequence length: the batch whose KV fills the memory left by the weights, and the bandwidth-bound
    decode tokens/s at that batch (each step reads every weight once and, per sequence, ``n`` tokens of KV in
    every layer). With ``tp`` GPUs each holds and reads ``1/tp`` of the weights and of the KV heads (all-reduce
    time not counted); bytes are per GPU."""
    per_token, read, weights = (
        x // tp
        for x in (
            kv_bytes_per_token(config, dtype),
            kv_read_bytes_per_token(config, dtype),
            weight_bytes(config, dtype),
        )
    )
    max_batch = {n: int((gpu_memory - weights) // (per_token * n)) for n in lengths}
    roofline = {n: batch * bandwidth / (weights + batch * n * read) for n, batch in max_batch.items()}
    return {
        "kv_layers": num_kv_layers(config),
        "kv_bytes_per_token": per_token,
        "kv_read_bytes_per_token": read,
        "weight_bytes": weights,
        "max_batch": max_batch,
        "decode_roofline_tokens_per_s": roofline,
    }


@dataclass
class RunResult:
    batch: int
    prefill_s: float
    step_ms: float
    throughput: float  # generated tokens / s over the whole generate (prefill included)
    decode_throughput: float  # generated tokens / s of the decode steps alone
    peak_memory_bytes: int | None
    kv_bytes: int
    kv_bytes_per_token: float
    compile_s: float | None = None
    compiled_step_ms: float | None = None  # the compiled decode forward alone, without generate's Python loop
    prefill_path: str | None = None  # the prefill that ran: iterative / sequential (LCKV), parallel (Llama)
    step_ms_end: float | None = (
        None  # decode step with the context near prompt_len + gen_len (None: all gen_len steps ran)
    )
    mean_step_ms: float = 0.0  # mean decode step over gen_len: the mean of start and end, or step_ms when all steps ran
    e2e_s: float = 0.0  # prefill + gen_len - 1 decode steps (extrapolated when --steps < --gen_len)
    e2e_throughput: float = 0.0  # batch * gen_len / e2e_s
    mean_decode_throughput: float = 0.0  # decode tokens / s over gen_len: batch / mean_step_ms
    prefill_cost_model_s: dict | None = None  # LCKV: the auto cost model's seconds of each path (None: not priced)
    prefill_sample_step_ms: list[float] | None = (
        None  # --prefill_sample: ms per token step of the start and end segments
    )
    gpu_clocks: dict | None = None  # the GPU's SM clock, power and power-cap share over the timed runs (gpu_clocks.py)


def generate_once(
    model,
    args,
    batch: int,
    steps: int,
    bar: tqdm,
    prompt_len: int,
    context: int = 0,
    record: dict | None = None,
    reuse: StaticCache | None = None,
) -> tuple[StepTimer, object, float]:
    """One sampled generation of ``steps`` tokens for ``batch`` random prompts of ``prompt_len`` tokens, with the cache
    sized for ``--prompt_len + --gen_len``; returns the timer, the cache and the start time. ``context > 0``: the
    cache already holds ``context`` tokens (zeros, or what earlier runs left in ``reuse``: a step's work depends on
    the length only) and the prompt is one more token (decode steps at that context).
    ``record`` gets ``prefill_sample_s``, the seconds of the two timed segments of a sampled prefill. ``reuse``: the
    batch's static cache, rewound instead of a new one (``filled_cache``)."""
    device = model.device
    input_ids = torch.randint(3, model.config.vocab_size, (batch, context + prompt_len), device=device)
    timer = StepTimer(bar)
    sequential = getattr(model.config, "prefill", None) == "sequential" and args.cache == "static"
    sampled = sequential and prompt_len > 1 and not context and args.prefill_sample and prompt_len == args.prompt_len
    # The sampled prefill sets up its own cache for each segment (``reuse`` rewound, or a new one at a time with a
    # dynamic cache): a cache made here as well would double the memory.
    cache = None if sampled else filled_cache(model, args, batch, context, reuse)
    with torch.no_grad():
        start = time.perf_counter()
        if sampled:
            cache, start, segments = sampled_prefill(model, args, input_ids, bar, reuse)
            if record is not None:
                record["prefill_sample_s"] = segments
        elif sequential and prompt_len > 1 and not context:
            prefill_cache(
                model, input_ids[:, :-1], cache
            )  # whole batch, one token at a time, only the last logits kept
        elif args.prefill_chunk and prompt_len > 1 and not context:
            prefill_in_chunks(model, input_ids[:, :-1], cache, args.prefill_chunk)
        model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            cache=cache,
            streamer=timer,
            do_sample=True,
            top_k=0,
            max_new_tokens=steps,
            min_new_tokens=steps,
            pad_token_id=0,
            disable_compile=not args.compile,
        )
    return timer, cache, start


def sampled_prefill(
    model, args, input_ids: torch.Tensor, bar: tqdm, reuse: StaticCache | None = None
) -> tuple[object, float, list[float]]:
    """The sequential prefill of ``input_ids[:, :-1]`` timed on ``--prefill_sample`` tokens at its start and as many at
    its end (a cache filled up to there: ``reuse`` rewound, else one new cache at a time, so the batch fits as in a
    full prefill), extrapolated linearly to the whole prompt. Returns the cache, now holding ``prompt_len - 1``
    tokens, a start time set back by the extrapolated prefill, so that ``times[1] - start`` is the prefill as a full
    run reports it, and the seconds of the two timed segments."""
    sample, length = args.prefill_sample, input_ids.shape[1] - 1
    seconds = []
    for context in (0, length - sample):
        bar.set_postfix_str(f"prefill sample at {context}")
        cache = filled_cache(model, args, input_ids.shape[0], context, reuse)
        synchronize(model.device)
        begin = time.perf_counter()
        prefill_cache(model, input_ids[:, context : context + sample], cache)
        synchronize(model.device)
        seconds.append(time.perf_counter() - begin)
        if not context:
            del cache
    return cache, time.perf_counter() - length * sum(seconds) / (2 * sample), seconds


def step_ms(timer: StepTimer) -> float:
    """Mean milliseconds per decode step (the first token is the prefill's)."""
    return 1e3 * (timer.times[-1] - timer.times[1]) / max(1, len(timer.times) - 2)


def extrapolate(prefill_s: float, start_ms: float, end_ms: float | None, gen_len: int) -> tuple[float, float]:
    """Mean decode step over ``gen_len`` tokens and the end-to-end seconds: the step grows with the context (KV
    reads), so the mean of the steps measured at the start and at the end stands for the whole (linear growth).

    >>> extrapolate(1.0, 10.0, 30.0, 101)
    (20.0, 3.0)
    """
    mean_ms = start_ms if end_ms is None else (start_ms + end_ms) / 2
    return mean_ms, prefill_s + (gen_len - 1) * mean_ms / 1e3


def run(model, args, batch: int, desc: str) -> RunResult:
    """Measure one batch size (raises torch.OutOfMemoryError when it does not fit)."""
    requested = getattr(model.config, "prefill", None)
    if requested is None:  # a Llama
        return measure_batch(model, args, batch, desc, "parallel")
    prefill_path, estimates = resolve_prefill(model, args, batch)
    model.config.prefill = prefill_path  # resolved here, so the warm-up compiles its path; restored after the run
    try:
        return replace(measure_batch(model, args, batch, desc, prefill_path), prefill_cost_model_s=estimates)
    finally:
        model.config.prefill = requested


def resolve_prefill(model, args, batch: int) -> tuple[str, dict | None]:
    """An LCKV model's prefill path for ``batch`` (``config.prefill``, "auto" resolved as the model resolves it, on
    ``pricing_hardware``) and, where the cost model prices it, its seconds of each path."""
    hardware, value_bytes = pricing_hardware(args), model.dtype.itemsize
    length = args.prompt_len - 1  # the tokens prefilled before generate's first step
    captured = compile_options(model.device, new_cache(model, args)) is not None
    tp = config_tp_size(model.config)
    path = choose_prefill(model.config.prefill, model.config, batch, length, hardware, value_bytes, captured, tp)
    return path, prefill_seconds(
        model.config, batch, length, hardware, value_bytes, tp
    ) if hardware is not None else None


def measure_batch(model, args, batch: int, desc: str, prefill_path: str | None) -> RunResult:
    """``run`` with the LCKV prefill path already set in the config."""
    cuda = model.device.type == "cuda"
    # Warm-up, untimed: compile and capture the decode step of this batch size (with --compile: 3 steps for warm-up,
    # record, replay) and run the prefill path once at the measured shape, so one-time costs (the first kernels of a
    # shape, library heuristics, the allocator growing) stay out of the timed run. The sequential prefill's step is
    # one shape at any length: 4 prompt tokens compile and capture it.
    warm_prompt = min(4, args.prompt_len) if prefill_path == "sequential" else args.prompt_len
    warm_steps = 3 if args.compile else 1
    # One static cache serves every generation of this batch, rewound each time: the graphs captured in the warm-up
    # read it at the same addresses in the timed runs (a new cache would record them again inside the timed window),
    # and one cache is alive at a time (two need not fit).
    reuse = filled_cache(model, args, batch, 0) if args.cache == "static" else None
    with tqdm(
        total=warm_steps, desc=f"{desc} {'compile' if args.compile else 'warm-up'} b={batch}", leave=False
    ) as bar:
        timer, warm_cache, start = generate_once(
            model, args, batch, warm_steps, bar, prompt_len=warm_prompt, reuse=reuse
        )
    compile_s = timer.times[-1] - start if args.compile else None
    del warm_cache  # a dynamic cache: freed before the measured run allocates its own
    if cuda:
        torch.cuda.reset_peak_memory_stats(model.device)
    with ClockSampler(nvidia_smi_id(model.device), args.clock_interval_ms) as clocks:  # what the timed steps ran at
        with (
            tqdm(total=args.steps, desc=f"{desc} b={batch}", leave=False) as bar,
            CompiledStepTimer(model) as step_timer,
        ):
            record = {}
            timer, cache, start = generate_once(
                model, args, batch, args.steps, bar, args.prompt_len, record=record, reuse=reuse
            )
        times = timer.times
        kv, slots = kv_bytes_and_slots(cache)
        del cache
        end_ms = None
        if args.steps < args.gen_len:  # the same steps with the context near its end
            with tqdm(total=args.steps, desc=f"{desc} b={batch} end", leave=False) as bar:
                end_timer, end_cache, _ = generate_once(
                    model,
                    args,
                    batch,
                    args.steps,
                    bar,
                    1,
                    context=args.prompt_len + args.gen_len - args.steps - 1,
                    reuse=reuse,
                )
            end_ms = step_ms(end_timer)
            del end_cache
    del reuse
    decode_s = times[-1] - times[1]
    mean_ms, e2e_s = extrapolate(times[1] - start, step_ms(timer), end_ms, args.gen_len)
    return RunResult(
        batch=batch,
        prefill_s=times[1] - start,
        step_ms=step_ms(timer),
        throughput=batch * args.steps / (times[-1] - start),
        decode_throughput=batch * (len(times) - 2) / decode_s if decode_s > 0 else float("nan"),
        peak_memory_bytes=torch.cuda.max_memory_allocated(model.device) if cuda else None,
        kv_bytes=kv,
        kv_bytes_per_token=kv / (batch * slots),
        compile_s=compile_s,
        compiled_step_ms=step_timer.mean_ms(),
        prefill_path=prefill_path,
        step_ms_end=end_ms,
        mean_step_ms=mean_ms,
        e2e_s=e2e_s,
        e2e_throughput=batch * args.gen_len / e2e_s,
        mean_decode_throughput=batch * 1e3 / mean_ms,
        prefill_sample_step_ms=[1e3 * s / args.prefill_sample for s in record["prefill_sample_s"]] if record else None,
        gpu_clocks=clocks.summary,
    )


def try_run(model, args, batch: int, desc: str) -> RunResult | None:
    """``run``, or None when the batch does not fit in memory (the memory is released)."""
    try:
        return run(model, args, batch, desc)
    except torch.OutOfMemoryError as error:
        # Where it ran out, for sizing batches: the innermost frames of this repository and the memory in use then.
        frames = [
            f"{Path(f.filename).name}:{f.name}"
            for f in traceback.extract_tb(error.__traceback__)
            if "site-packages" not in f.filename
        ]
        in_use = torch.cuda.memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0
        tqdm.write(f"{desc} b={batch}: out of memory in {' > '.join(frames[-4:])} ({in_use:.1f} GB allocated)")
        return None
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def batch_search(model, args, desc: str) -> list[RunResult | dict]:
    """Double the batch from ``--start_batch`` until it fails or reaches ``--max_batch``, then bisect to
    ``--resolution``; batch 1 is always measured (per-step latency). ``--batches`` runs a fixed list instead (up to the
    first that fits with ``--first_fit``)."""
    tried: dict[int, RunResult | None] = {}
    good, bad, batch = 0, None, args.start_batch
    if args.batches:
        for b in map(int, args.batches.split(",")):
            tried[b] = try_run(model, args, b, desc)
            if tried[b] and args.first_fit:
                break
        good = args.max_batch  # skips the search
    elif batch > 1:
        tried[1] = try_run(model, args, 1, desc)
        good, bad = (1, None) if tried[1] else (0, 1)
    while bad is None and good < args.max_batch:
        tried[batch] = try_run(model, args, batch, desc)
        good, bad = (batch, None) if tried[batch] else (good, batch)
        batch = min(2 * batch, args.max_batch)
    while bad is not None and bad - good > max(1, int(good * args.resolution)):
        batch = (good + bad) // 2
        tried[batch] = try_run(model, args, batch, desc)
        good, bad = (batch, bad) if tried[batch] else (good, batch)
    return [asdict(r) if r else {"batch": b, "oom": True} for b, r in sorted(tried.items())]


def measure_model(path: str, args, dtype: torch.dtype, hardware: Hardware) -> dict[str, dict]:
    """One entry per LCKV prefill mode (``name:mode`` when several), one for a Llama (prefill "parallel")."""
    config = load_config_for_length(path, args.prompt_len + args.gen_len)
    model = build_model(config, args, dtype)
    modes = prefill_modes_for(config, args.prefill_modes, args.prefill_given)
    out = {}
    for mode in modes:
        name = Path(path).stem if len(modes) == 1 else f"{Path(path).stem}:{mode}"
        if mode is not None:
            shared.set_prefill(model.config, "--prefill", mode)
        out[name] = summarize(path, config, args, dtype, hardware, batch_search(model, args, name)) | {
            "prefill": mode or "parallel"
        }
    del model
    if args.compile:  # compiled graphs hold the model's weights; free them before the next model
        compiled_token_step.cache_clear()
        torch._dynamo.reset()
    return out


def summarize(
    path: str, config: PretrainedConfig, args, dtype: torch.dtype, hardware: Hardware, runs: list[dict]
) -> dict:
    """The runs of one model (and prefill mode) with their max-batch figures, their rooflines and the batch-1
    roofline."""
    fitting = [r for r in runs if not r.get("oom")]
    best = max(fitting, key=lambda r: r["batch"]) if fitting else None
    parameters, multiplied = (count / world_size() for count in parameter_counts(config))  # per process
    weights, kv_read = parameters * dtype.itemsize, kv_read_bytes_per_token(config, dtype) / world_size()
    bandwidth = hardware.hbm_bandwidth
    # A decode step reads every weight once plus, per sequence and in every layer, the KV of the average context.
    avg_context = args.prompt_len + args.steps / 2
    for r in fitting:
        r["roofline_ms"] = step_roofline_ms(weights, kv_read, r["batch"], avg_context, bandwidth)
        r["compiled_step_vs_roofline"] = r["compiled_step_ms"] / r["roofline_ms"] if r["compiled_step_ms"] else None
        r["matmul_floor_ms"] = step_matmul_floor_ms(multiplied, r["batch"], hardware.peak_flops)
        r |= run_rooflines(r, config, args, hardware, weights, kv_read, dtype.itemsize)
    roofline_ms = step_roofline_ms(weights, kv_read, 1, avg_context, bandwidth)
    batch1 = next((r for r in fitting if r["batch"] == 1), None)
    return {
        "config": path,
        "model_type": config.model_type,
        "kv_layers": num_kv_layers(config),
        "weight_bytes": weights,
        "kv_bytes_per_token_formula": kv_bytes_per_token(config, dtype) // world_size(),
        "max_batch": best["batch"] if best else 0,
        "max_batch_throughput": best["throughput"] if best else 0.0,
        "max_batch_decode_throughput": best["decode_throughput"] if best else 0.0,
        "max_batch_e2e_throughput": best["e2e_throughput"] if best else 0.0,
        "max_batch_e2e_vs_roofline": best["e2e_vs_roofline"] if best else None,
        "max_batch_gpu_clocks": best["gpu_clocks"] if best else None,
        "batch1_step_ms": batch1["step_ms"] if batch1 else None,
        "batch1_roofline_ms": roofline_ms,
        "batch1_step_vs_roofline": batch1["step_ms"] / roofline_ms if batch1 else None,
        "batch1_compiled_step_ms": batch1["compiled_step_ms"] if batch1 else None,
        "hit_max_batch_cap": bool(best) and best["batch"] >= args.max_batch,
        "runs": runs,
    }


def e2e_roofline_throughput(
    config: PretrainedConfig,
    weights: int,
    kv_read: int,
    batch: int,
    prompt_len: int,
    gen_len: int,
    hardware: Hardware,
    value_bytes: int,
    tp: int = 1,
) -> float:
    """``batch * gen_len / (T_prefill + T_decode)``: ``T_prefill`` a Llama's parallel prefill of the prompt (the
    config's dimensions, every layer with its own KVs) at the peak matrix rate, the least any exact prefill can
    cost; ``T_decode`` the ``gen_len - 1`` decode steps after it at the bandwidth, each reading the ``weights`` and, per
    sequence, the filled KV in every layer (``kv_read`` bytes per token; ``decode_roofline_seconds``). All per process
    of ``tp`` tensor-parallel ones (``weights`` and ``kv_read`` are given per process)."""
    shape = model_shape(config, as_llama=True, tp=tp)
    t_prefill = parallel_prefill_cost(shape, batch, prompt_len, value_bytes).flops / hardware.peak_flops
    t_decode = decode_roofline_seconds(weights, kv_read, batch, prompt_len, gen_len - 1, hardware.hbm_bandwidth)
    return batch * gen_len / (t_prefill + t_decode)


def prefill_roofline_s(
    config: PretrainedConfig, path: str, batch: int, length: int, hardware: Hardware, value_bytes: int, tp: int = 1
) -> float:
    """The roofline of the prefill that ran: a Llama's one parallel pass, the iterative pass, or the sequential token
    steps, each at its own roofline (the max of its matrix work and its reads, no per-step overhead), per process of
    ``tp`` tensor-parallel ones."""
    shape = model_shape(config, tp=tp)
    if path == "sequential":
        return sequential_prefill_seconds(
            shape, batch, length, replace(hardware, step_overhead_per_layer=0.0), value_bytes
        )
    cost = iterative_prefill_cost if path == "iterative" else parallel_prefill_cost
    return cost(shape, batch, length, value_bytes).seconds(hardware)


def run_rooflines(
    run: dict, config: PretrainedConfig, args, hardware: Hardware, weights: int, kv_read: int, value_bytes: int
) -> dict:
    """A run's end-to-end and prefill rooflines and its measured figures over them; with --prefill_sample, the
    roofline of the token step at the middle of each timed segment."""
    batch, tp = run["batch"], world_size()
    e2e = e2e_roofline_throughput(
        config, weights, kv_read, batch, args.prompt_len, args.gen_len, hardware, value_bytes, tp
    )
    prefill = prefill_roofline_s(config, run["prefill_path"], batch, args.prompt_len, hardware, value_bytes, tp)
    out = {
        "e2e_roofline_throughput": e2e,
        "e2e_vs_roofline": run["e2e_throughput"] / e2e,
        "prefill_roofline_s": prefill,
        "prefill_vs_roofline": run["prefill_s"] / prefill,
    }
    if run.get("prefill_sample_step_ms"):
        sample, shape = args.prefill_sample, model_shape(config, tp=tp)
        middles = [(sample + 1) / 2, args.prompt_len - 1 - sample + (sample + 1) / 2]  # filled tokens, mid-segment
        out["prefill_sample_roofline_ms"] = [
            1e3 * token_step_cost(shape, batch, n, value_bytes).seconds(hardware) for n in middles
        ]
        out["prefill_sample_vs_roofline"] = [
            t / r for t, r in zip(run["prefill_sample_step_ms"], out["prefill_sample_roofline_ms"], strict=True)
        ]
    return out


def ratios(results: dict[str, dict]) -> dict[str, dict]:
    """Each non-baseline model's max batch, throughputs and KV bytes/token over the baseline's (first Llama)."""
    baseline = baseline_name(results)
    base = results[baseline]
    keys = [
        "max_batch",
        "max_batch_throughput",
        "max_batch_decode_throughput",
        "max_batch_e2e_throughput",
        "kv_bytes_per_token_formula",
    ]
    return {
        f"{name}/{baseline}": {k: r[k] / base[k] if base[k] else None for k in keys}
        for name, r in results.items()
        if name != baseline
    }


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        fitting = [run for run in r["runs"] if not run.get("oom")]
        batches = [run["batch"] for run in fitting]
        (line,) = ax.plot(batches, [run["e2e_throughput"] for run in fitting], marker="o", label=f"{name}: end to end")
        ax.plot(
            batches,
            [run["mean_decode_throughput"] for run in fitting],
            marker="x",
            linestyle="--",
            color=line.get_color(),
            label=f"{name}: decode",
        )
    ax.set(xscale="log", xlabel="batch size", ylabel="generated tokens / s", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_title(args, device: str) -> str:
    """The plot's setting: the full prompt and generation, the device, and how the decode rate over gen_len was
    measured (a second line: one line overflowed the figure with a GPU's name)."""
    decode = "all steps timed" if args.steps >= args.gen_len else f"decode from {args.steps} steps at each end"
    return f"prompt {args.prompt_len} + {args.gen_len} new tokens, {device}\n({decode})"


def prefill_modes_for(config: PretrainedConfig, modes: list[str], given: bool) -> list[str | None]:
    """The prefill modes measured for ``config``: ``modes`` (``--prefill``'s) where ``given``; else the config's own
    ``prefill`` (a checkpoint measured as it serves, as run_generation.py runs it), ``sequential`` for a config saved
    with ``sequential_forward`` (the one mode it allows); ``[None]`` for a Llama (one parallel pass)."""
    if not isinstance(config, OptLlamaConfig):
        return [None]
    if given:
        return modes
    return ["sequential" if config.sequential_forward else config.prefill]


def check_prefill_applies(configs: list[PretrainedConfig], modes: list[str], given: bool) -> None:
    """Each ``--prefill`` mode applies to every LCKV config, and a given ``--prefill`` to some config (UsageError)."""
    lckv = [config for config in configs if isinstance(config, OptLlamaConfig)]
    if given and not lckv:
        shared.require_lckv(configs[0], "--prefill")
    for config in lckv:
        for mode in prefill_modes_for(config, modes, given):
            shared.check_prefill(config, "--prefill", mode)


def main(argv: list[str] | None = None) -> dict:
    """The command line; bad input ends the process with one line on stderr and exit status 2."""
    try:
        return run_cli(measure, argv, prog="test_latency.py")
    finally:
        end_process_group()


def measure(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dtype = resolve_dtype(args)
    hardware = roofline_hardware(args)
    bandwidth = hardware.hbm_bandwidth
    total_len = max(args.plan_lengths_list) if args.plan else args.prompt_len + args.gen_len
    configs = {
        c: load_config_for_length(c, total_len) for c in args.configs
    }  # every config checked before any model is built
    if not args.plan:
        check_prefill_applies(list(configs.values()), args.prefill_modes, args.prefill_given)
    if args.plan:
        lengths = args.plan_lengths_list
        memory = args.gpu_memory_bytes
        out = {
            Path(c).stem: plan(config, dtype, memory, lengths, bandwidth, args.tp_size) for c, config in configs.items()
        }
        for name, p in out.items():
            if p["weight_bytes"] >= memory:
                raise UsageError(
                    f"--gpu_memory: {args.gpu_memory} does not even hold the weights of {name} "
                    f"({p['weight_bytes']:,} bytes); allowed is more memory than that"
                )
        for name, p in out.items():
            per_length = ", ".join(
                f"{n}: {b} ({p['decode_roofline_tokens_per_s'][n]:,.0f} tok/s)" for n, b in p["max_batch"].items()
            )
            print(
                f"{name}: {p['kv_layers']} KV layers, {p['kv_bytes_per_token']} KV bytes/token stored, "
                f"{p['kv_read_bytes_per_token']} read per cached token per decode step; max batch per length "
                f"(decode roofline at it) {per_length}"
            )
        return out

    if args.compile:
        torch._dynamo.config.cache_size_limit = 64  # one graph per batch size tried
    keys = (
        "prompt_len",
        "gen_len",
        "steps",
        "cache",
        "offload",
        "compile",
        "compile_mode",
        "prefill_chunk",
        "prefill",
        "prefill_sample",
        "max_batch",
        "batches",
        "attn_implementation",
        *shared.DECODE_KERNEL_OPTIONS,
    )
    setting = {k: getattr(args, k) for k in keys}
    setting["extrapolation"] = (
        "none: all gen_len decode steps ran"
        if args.steps >= args.gen_len
        else f"decode steps timed at the start ({args.steps} after the prompt) "
        f"and at the end of the context ({args.steps} "
        "from a cache filled to prompt_len + gen_len - steps - 1 zero tokens); mean_step_ms is their mean, e2e_s = "
        "prefill_s + (gen_len - 1) * mean_step_ms, e2e_throughput = batch * gen_len / e2e_s; throughput and "
        "decode_throughput cover the first steps only"
    )
    if args.prefill_sample:
        setting["extrapolation"] += (
            f"; sequential prefill_s: {args.prefill_sample} prompt tokens timed at the start and "
            f"{args.prefill_sample} at the end, scaled to prompt_len - 1, plus the last token's step"
        )
    setting |= {
        "dtype": str(dtype),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "tp_size": world_size(),
    }
    # As asked; without --prefill each LCKV entry's "prefill" says which default it took (auto, or sequential for a
    # config saved with sequential_forward), and a Llama's entry records "parallel".
    setting["prefill"] = args.prefill if args.prefill_given else "default"
    setting |= apply_memory_cap(args)
    setting["roofline"] = {
        "gpu": hardware.name,
        "hbm_bandwidth_bytes_per_s": hardware.hbm_bandwidth,
        "peak_bf16_flops_per_s": hardware.peak_flops,
        "e2e": "e2e_roofline_throughput = batch * gen_len / (T_prefill + T_decode): "
        "T_prefill a Llama's parallel prefill "
        "of the prompt at the peak matrix rate, T_decode the gen_len - 1 decode steps at the bandwidth, each "
        "reading the weights and the filled KV of every layer; e2e_vs_roofline = e2e_throughput over it",
        "prefill": "prefill_roofline_s: the path that ran, at its roofline (a sequential token step: the max of its "
        "matrix work and its reads of the weights and the KV filled so far, no per-step overhead)",
        "tensor_parallel": "every roofline is of one process: 1/tp_size of the heads, MLP features, weights and KV",
    }
    results = {}
    for c in tqdm(args.configs, desc="models"):
        results |= measure_model(c, args, dtype, hardware)
    out = {"setting": setting, "models": results, "ratios": ratios(results)}
    if not is_main_process():
        return out
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "latency.json", out)
    plot(results, out_dir / "throughput.png", plot_title(args, setting["device"]))
    for name, r in results.items():
        vs_roofline = (
            f" ({r['max_batch_e2e_vs_roofline']:.2f} of the roofline)" if r["max_batch_e2e_vs_roofline"] else ""
        )
        batch1 = (  # only where batch 1 was run
            f", batch-1 step {r['batch1_step_ms']:.3f} ms vs roofline {r['batch1_roofline_ms']:.3f} ms"
            if r["batch1_step_ms"]
            else ""
        )
        clocks = describe(r["max_batch_gpu_clocks"])
        print(
            f"{name}: max batch {r['max_batch']}, end to end {r['max_batch_e2e_throughput']:.1f} tok/s{vs_roofline}, "
            f"first steps {r['max_batch_throughput']:.1f} tok/s "
            f"(decode {r['max_batch_decode_throughput']:.1f}){batch1}{f'; {clocks}' if clocks else ''}"
        )
    print(json.dumps(out["ratios"], indent=2))
    print(f"written: {out_dir / 'latency.json'}, {out_dir / 'throughput.png'}")
    return out


if __name__ == "__main__":
    main()
