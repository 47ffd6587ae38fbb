"""What test_latency.py and the bench/ scripts that rerun its measurements share: its flags (``parse_args``), the
memory cap, the roofline hardware, the KV and weight byte counts, the model and the caches it times.
"""

import argparse
from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM, CompileConfig, DynamicCache, PretrainedConfig, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer

from models import PACKED_SDPA, SPLIT_KV
from models.chunked_prefill import set_cached_length
from models.prefill_modes import PREFILL_MODES
from models.roofline import UNKNOWN_GPU, Hardware, device_hardware
from models.tensor_parallel import kv_heads_per_process, world_size

from . import cli as shared
from .cli import DTYPE_CHOICES, ArgumentParser, UsageError, check_range, parse_flop_rate, parse_int_list, parse_size
from .measure import build_random_model, kv_bytes, kv_layers_holding

DESCRIPTION = "Latency, throughput and memory of LCKV (opt-llama) against a standard Llama of the same shape."
COMPILE_MODES = ("reduce-overhead", "max-autotune")  # both capture the step in CUDA graphs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="test_latency.py", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--configs",
        nargs="+",
        default=["configs/tinyllama.json", "configs/tinyllama_opt.json"],
        help="model config .json files; the first Llama (no LCKV fields) is the baseline of the ratios",
    )
    p.add_argument("--prompt_len", type=int, default=2048, help="prompt tokens per sequence")
    p.add_argument("--gen_len", type=int, default=2048, help="new tokens per sequence (sampled); sizes the cache")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="decode only this many of the gen_len tokens (cache still sized for prompt_len + gen_len, so the "
        "max batch is that of the full setting; throughput then covers the first steps); default gen_len",
    )
    p.add_argument("--max_batch", type=int, default=1024, help="largest batch the search tries")
    p.add_argument(
        "--start_batch",
        type=int,
        default=1,
        help="the search doubles from this batch (e.g. near the --plan estimate; batch 1 is measured too)",
    )
    p.add_argument(
        "--batches", default=None, help="comma-separated batch sizes to run instead of the search (OOM still caught)"
    )
    p.add_argument(
        "--first_fit",
        action="store_true",
        help="with --batches: stop at the first batch that fits (list them largest first, as fallbacks); under "
        "torchrun only running out in the cache's allocation is recovered (a process out of memory inside a "
        "forward leaves the others waiting in a collective)",
    )
    p.add_argument(
        "--resolution",
        type=float,
        default=0.125,
        help="bisection stops when the gap between a fitting and a failing batch is at most this fraction",
    )
    p.add_argument(
        "--cache", choices=["dynamic", "static"], default="dynamic", help="KV cache: transformers' dynamic or static"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="static cache + torch.compile'd decode step (CUDA graphs); "
        "the first run per batch is timed separately as compile time (generate compiles on CUDA only)",
    )
    p.add_argument(
        "--compile_mode",
        choices=COMPILE_MODES,
        default="reduce-overhead",
        help="torch.compile mode of the decode step (generation_config.compile_config): reduce-overhead "
        "(CUDA graphs; generate's default) or max-autotune (CUDA graphs plus autotuned matmul and "
        "coordinate-descent-tuned kernels: minutes more compile per batch)",
    )
    p.add_argument(
        "--offload",
        action="store_true",
        help="keep each KV layer on the CPU between uses (transformers' offloaded / offloaded_static cache); CUDA only",
    )
    p.add_argument(
        "--prefill_chunk",
        type=int,
        default=0,
        help="static cache: prefill this many sequences at a time into the preallocated cache (0: whole batch)",
    )
    p.add_argument(
        "--prefill",
        default=None,
        help=f"LCKV prefill path(s), comma-separated to measure several: {', '.join(PREFILL_MODES)} (config.prefill; "
        "default: each config's own, sequential for one saved with sequential_forward); auto resolves per batch by "
        "the cost model of models.prefill_modes, recorded as prefill_path; sequential ignores --prefill_chunk; "
        "needs an LCKV config (a Llama prefills in one pass)",
    )
    p.add_argument(
        "--prefill_sample",
        type=int,
        default=0,
        help="sequential prefill: run only this many prompt tokens at the start and as many at the end of the "
        "prompt (cache filled with zeros up to there) and extrapolate the prefill time linearly (0: whole prompt)",
    )
    p.add_argument(
        "--attn_implementation",
        default=SPLIT_KV,
        help=f"attention backend of both models; {SPLIT_KV} (default) decodes with a split-KV Triton kernel that "
        f"reads only the filled cache slots (CUDA; elsewhere it is {PACKED_SDPA}); {PACKED_SDPA} is transformers' "
        "sdpa that also packs GQA heads inside a compiled decode step instead of expanding KVs with repeat_kv; "
        "sdpa, eager, ...",
    )
    shared.add_decode_kernel_options(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bfloat16 on cuda and for --plan, float32 on cpu"
    )
    p.add_argument(
        "--hbm_bandwidth",
        default=None,
        help="memory bandwidth per second of the rooflines and of the auto "
        "prefill's cost model, e.g. 4.8TB; default: the GPU's from models.roofline.GPUS (H100 SXM's 3.35TB for "
        "--plan or an unknown GPU)",
    )
    p.add_argument(
        "--peak_flops",
        default=None,
        help="dense bf16 matrix FLOP/s of the rooflines and of the cost model, e.g. "
        "989T; default: the GPU's, as --hbm_bandwidth. On a CPU the cost model prices nothing (auto: iterative) "
        "unless one of the two is given",
    )
    p.add_argument(
        "--memory_cap",
        default=None,
        help="cap this process's CUDA allocations at this size (e.g. 79GiB on a "
        "141GB card: what an 80 GB H100 gives CUDA), through torch.cuda.set_per_process_memory_fraction",
    )
    p.add_argument(
        "--clock_interval_ms",
        type=int,
        default=1000,
        help="read the GPU's SM clock, power and power-cap state with nvidia-smi every this many ms over each timed "
        "run (gpu_clocks in the JSON: a GPU at its power limit runs long runs below the clock of short ones); "
        "0: do not read them",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of weights, prompts and sampling")
    p.add_argument("--output_dir", default="bench/latency", help="where latency.json and throughput.png go")
    p.add_argument(
        "--plan",
        action="store_true",
        help="no GPU: print KV bytes/token, the KV-bound max batch per length "
        "and the bandwidth-bound (--hbm_bandwidth) decode tokens/s at that batch",
    )
    p.add_argument("--gpu_memory", default="80GB", help="--plan: GPU memory, e.g. 80GB, 141GB, 24GiB")
    p.add_argument(
        "--tp_size",
        type=int,
        default=world_size(),
        help="--plan: GPUs the model is split over (tensor parallel: weights and KV heads divided); "
        "default: torchrun's",
    )
    p.add_argument(
        "--plan_lengths", default="512,1024,2048,4096,8192,16384", help="--plan: comma-separated sequence lengths"
    )
    args = p.parse_args(argv)
    if args.compile:
        args.cache = "static"
    if args.prefill_chunk and args.cache != "static":
        p.error("--prefill_chunk: needs --cache static (or --compile)")
    if args.offload and not args.plan and not args.device.startswith("cuda"):
        p.error(f"--offload: moves the KV cache between GPU and CPU, so it needs a cuda --device, not {args.device}")
    if args.offload and args.compile:
        p.error("--offload: not with --compile (a captured decode step cannot move the cache between devices)")
    if not 1 <= args.start_batch <= args.max_batch:
        p.error(f"--start_batch: {args.start_batch}; allowed values are 1 to --max_batch ({args.max_batch})")
    shared.check_compiled_only_options(args, args.compile, "--compile")
    check_args(args)
    args.steps = args.steps or args.gen_len
    return args


def check_args(args: argparse.Namespace) -> None:
    """One-line errors for every flag out of range, before any config or model is loaded; sizes are parsed here."""
    for flag in ("prompt_len", "gen_len", "max_batch", "start_batch"):
        check_range(f"--{flag}", getattr(args, flag), minimum=1)
    check_range("--steps", args.steps, minimum=1, maximum=args.gen_len)
    check_range("--prefill_sample", args.prefill_sample, minimum=0, maximum=args.prompt_len // 2 - 1)
    args.prefill_given = args.prefill is not None  # the Llama baseline needs no prefill mode, but some config must
    # Without --prefill each LCKV config runs its own (test_latency.prefill_modes_for), as run_generation.py does.
    args.prefill_modes = args.prefill.split(",") if args.prefill_given else []
    shared.check_choices("--prefill", args.prefill_modes, PREFILL_MODES)
    check_range("--prefill_chunk", args.prefill_chunk, minimum=0)
    check_range("--resolution", args.resolution, minimum=0, maximum=1)
    check_range("--tp_size", args.tp_size, minimum=1)
    check_range("--clock_interval_ms", args.clock_interval_ms, minimum=0)
    if args.batches is not None:
        parse_int_list("--batches", args.batches)
    elif args.first_fit:
        raise UsageError("--first_fit: stops a --batches list at its first fitting batch; allowed only with --batches")
    args.hbm_bandwidth_bytes = (
        parse_size("--hbm_bandwidth", args.hbm_bandwidth) if args.hbm_bandwidth is not None else None
    )
    args.peak_flops_rate = parse_flop_rate("--peak_flops", args.peak_flops) if args.peak_flops is not None else None
    args.gpu_memory_bytes = parse_size("--gpu_memory", args.gpu_memory)
    args.plan_lengths_list = parse_int_list("--plan_lengths", args.plan_lengths)
    shared.check_attn_implementation("--attn_implementation", args.attn_implementation)
    if not args.plan:
        args.device = shared.resolve_device(args.device)
        shared.check_output_dir("--output_dir", args.output_dir)
    args.memory_cap_bytes = check_memory_cap(args)


def check_memory_cap(args: argparse.Namespace) -> int | None:
    """``--memory_cap`` in bytes (None: not given); a one-line error with ``--plan``, off CUDA, or above the card's
    memory (a cap there would cap nothing)."""
    if args.memory_cap is None:
        return None
    cap = parse_size("--memory_cap", args.memory_cap)
    if args.plan:
        raise UsageError(
            "--memory_cap: caps the CUDA allocations of a measurement; not with --plan (which takes --gpu_memory)"
        )
    if not args.device.startswith("cuda"):
        raise UsageError(f"--memory_cap: caps CUDA allocations; allowed with a cuda --device, not {args.device}")
    card = torch.cuda.get_device_properties(torch.device(args.device))
    if cap > card.total_memory:
        raise UsageError(
            f"--memory_cap: {args.memory_cap} is more than the {card.total_memory / 1e9:.1f} GB of the "
            f"{card.name}; allowed is at most the card's memory"
        )
    return int(cap)


def apply_memory_cap(args: argparse.Namespace) -> dict:
    """Cap this process's CUDA allocations at ``--memory_cap`` (a fraction of the card's memory); the JSON's record."""
    if args.memory_cap_bytes is None:
        return {"memory_cap": None}
    device = torch.device(args.device)
    index = device.index if device.index is not None else torch.cuda.current_device()  # the cap takes an index
    fraction = args.memory_cap_bytes / torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return {"memory_cap": args.memory_cap, "memory_cap_bytes": args.memory_cap_bytes, "memory_cap_fraction": fraction}


def roofline_hardware(args: argparse.Namespace) -> Hardware:
    """The bandwidth and matrix rate of the rooflines: the GPU's table entry (``models.roofline.GPUS``; H100 SXM
    figures for --plan, a CPU or an unknown GPU), with --hbm_bandwidth and --peak_flops taking precedence."""
    table = None if args.plan else device_hardware(torch.device(args.device))
    hardware = table or UNKNOWN_GPU
    if args.hbm_bandwidth_bytes is None and args.peak_flops_rate is None:
        return hardware
    return replace(
        hardware,
        name=f"{hardware.name}, given --hbm_bandwidth / --peak_flops",
        hbm_bandwidth=args.hbm_bandwidth_bytes or hardware.hbm_bandwidth,
        peak_flops=args.peak_flops_rate or hardware.peak_flops,
    )


def pricing_hardware(args: argparse.Namespace) -> Hardware | None:
    """What ``prefill="auto"`` prices with, as the model does (``uses_sequential_prefill``): the GPU, or the given
    --hbm_bandwidth / --peak_flops; None (auto: iterative) on a CPU without them."""
    given = args.hbm_bandwidth_bytes is not None or args.peak_flops_rate is not None
    return roofline_hardware(args) if given or args.device.startswith("cuda") else None


def num_kv_layers(config: PretrainedConfig) -> int:
    return getattr(config, "num_kv_layers", config.num_hidden_layers)


def layer_kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """One layer's KV bytes per token: 2 (keys, values) x KV heads x head dim x dtype bytes."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_key_value_heads * head_dim * dtype.itemsize


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """KV cache bytes stored per token: KV layers x one layer's KV bytes."""
    return num_kv_layers(config) * layer_kv_bytes_per_token(config, dtype)


def kv_read_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """KV bytes a decode step reads per cached token: every layer attends to one layer's KVs (condensed layers to
    the shared target's), so LCKV reads as much as a Llama of the same shape while storing less."""
    return config.num_hidden_layers * layer_kv_bytes_per_token(config, dtype)


def step_roofline_ms(weights: int, kv_read_per_token: int, batch: int, context: float, bandwidth: float) -> float:
    """Milliseconds a decode step takes at ``bandwidth`` if it reads every weight once and, per sequence, the KV of
    its ``context`` filled slots in every layer (not the preallocated, unfilled ones)."""
    return 1e3 * (weights + batch * kv_read_per_token * context) / bandwidth


def step_matmul_floor_ms(matmul_parameters: float, batch: int, peak_flops: float) -> float:
    """Milliseconds a decode step's weight matmuls take at ``peak_flops``: 2 FLOPs per parameter per sequence. At a
    large batch this bound exceeds the bytes roofline (``step_roofline_ms``); attention is left out (its reads bound
    it)."""
    return 1e3 * 2 * matmul_parameters * batch / peak_flops


def weight_bytes(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Parameter bytes, counted on the meta device (no memory, no GPU)."""
    return parameter_counts(config)[0] * dtype.itemsize


def parameter_counts(config: PretrainedConfig) -> tuple[int, int]:
    """``(all parameters, the ones a decode step multiplies with)``, counted on the meta device: the second leaves out
    the input embedding table, which a step only indexes, unless the LM head shares it."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    return total, total - (0 if tied else embedding.numel())


def kv_bytes_and_slots(cache) -> tuple[int, int]:
    """Bytes of the cache's key/value tensors and the number of token slots per sequence they hold."""
    return kv_bytes(cache), kv_layers_holding(cache)[0].keys.shape[-2]


def new_cache(model, args):
    """An empty cache of ``--cache`` kind sized for ``--prompt_len + --gen_len``."""
    if args.cache == "static":
        return StaticCache(config=model.config, max_cache_len=args.prompt_len + args.gen_len, offloading=args.offload)
    return DynamicCache(config=model.config, offloading=args.offload)


def filled_cache(model, args, batch: int, length: int, reuse: StaticCache | None = None) -> StaticCache | DynamicCache:
    """A cache that reports ``length`` cached tokens (zeros in a new one): a decode step's work depends on the context
    length, not on the values, so this times steps at the end of the context without decoding up to there. A static
    cache is allocated whole here, also at ``length`` 0, before any forward, as serving engines allocate theirs.
    Allocated layer by layer inside a large prefill (transformers' lazy initialisation), a Llama at batch 576, prompt
    2048 ran out of memory with 32 GB allocated under a 79 GiB cap on an H200, where batch 640 had fitted when the
    cache was allocated before that prefill; the likely cause is the cache's blocks carved out of segments the
    prefill's activations left free (fragmentation), not measured.

    ``reuse``: a static cache this made for ``batch``, set to ``length`` in place (``set_cached_length``; its values
    are what earlier runs left) instead of a new one, so the captured steps replay their CUDA graphs instead of
    recording them again."""
    if reuse is not None:
        static = [layer for layer in reuse.layers if isinstance(layer, StaticLayer) and layer.is_initialized]
        held = {layer.keys.shape[0] for layer in static}
        if held != {batch}:
            raise ValueError(f"reuse: a cache of batch {sorted(held)}; allowed: one made for batch {batch}")
        return set_cached_length(reuse, length)
    cache = new_cache(model, args)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    shape = (batch, kv_heads_per_process(model), length, head_dim)
    for layer_idx, layer in enumerate(cache.layers):
        if isinstance(layer, StaticLayer):
            one = torch.zeros(*shape[:2], 1, head_dim, dtype=model.dtype, device=model.device)
            layer.lazy_initialization(one, one)
        elif isinstance(layer, DynamicLayer) and length:  # not DummyLayer (condensed layers store nothing)
            zeros = torch.zeros(shape, dtype=model.dtype, device=model.device)
            cache.update(zeros, zeros.clone(), layer_idx)
    return set_cached_length(cache, length)


def build_model(config: PretrainedConfig, args, dtype: torch.dtype):
    """Random weights of ``--seed`` on ``--device`` (each process its shard under torchrun), ``--attn_implementation``,
    generate's captured decoding loop (``tools.measure.build_random_model``) compiled in ``--compile_mode``, with
    the decode-kernel options (``tools.cli.set_decode_kernel_options``)."""
    torch.manual_seed(args.seed)
    model = build_random_model(config, dtype, args.device, args.attn_implementation)
    model.generation_config.compile_config = CompileConfig(mode=args.compile_mode)
    shared.set_decode_kernel_options(model, args)
    return model


def resolve_dtype(args) -> torch.dtype:
    """auto: bfloat16 on cuda and for --plan (a GPU's plan), float32 on cpu."""
    return shared.resolve_dtype(args.dtype, "cuda" if args.plan else args.device)
