"""Per-token cost of ``generate`` on a static cache: the captured decode loop (models/fast_decode.py) against the
captured forward step alone and against transformers' own static-cache loop, for a Llama and its LCKV twin.

    python -m bench.measure_generate_overhead --configs configs/tinyllama.json configs/tinyllama_opt.json \\
        --batches 128 --output_dir bench/results/generate_overhead      # GPU: bf16, compiled; one call per batch
    python -m bench.measure_generate_overhead --configs configs/llama2_7b.json --batches 1   # 7B: one model per call
    python -m bench.measure_generate_overhead --smoke --output_dir /tmp/overhead   # CPU: tiny configs, same path

Per config and batch: random weights, one static cache of ``context + new_tokens`` slots holding ``--context`` tokens
(zeros: a decode step's work depends on the context length, not on the values), and per loop (``fast``: the captured
loop; ``transformers``: ``generate``'s own ``_sample``, i.e. ``generation_config.fast_decode = False``) one generate
that compiles and captures, then the timed one, on that same cache rewound to the context (the timed run replays the
captured graphs). Each samples ``--new_tokens`` tokens as test_latency.py does (``do_sample``, ``top_k=0``,
``min_new_tokens``). Per loop: ``ms_per_token`` (first new token to last, from a timestamping streamer, as
test_latency's ``step_ms``), ``captured_step_ms`` (the compiled forward alone, CUDA events: test_latency's
``compiled_step_ms``) and their ratio; then the fast loop's cost over transformers' captured step and over its whole
loop, the step's HBM roofline (weights + the context's KV in every layer, ``--hbm_bandwidth``), and whether both loops
give the same ``--check_tokens`` tokens (greedy, and sampling from one seed); where the greedy tokens differ,
``greedy_divergence`` says where and how far apart the two tokens' logits were (in ulps of the model's dtype: bf16
forwards compiled into different graphs round differently, and break a near tie either way). Writes
``<output_dir>/generate_overhead_<config names>_b<batches>.json``. ``--smoke`` runs the same code on the CPU (dynamo's
eager backend standing in for inductor) with configs/llama_tiny*.json. ``--fast_loop_only`` times the captured loop
alone, without transformers' loop and the comparisons: an A/B of the step for about half the device time.
"""

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch._dynamo.utils import counters
from torch._functorch import config as functorch_config
from torch._inductor import config as inductor_config
from tqdm.auto import tqdm

import models  # noqa: F401  (registers opt-llama and the attention backends)
from bench.profile_decode import compile_config  # generate's own on CUDA; dynamo's eager backend on a CPU
from models import SPLIT_KV
from models.chunked_prefill import set_cached_length
from models.export import write_json
from models.kernels.gemv_fusion import COUNTER as GEMV_FUSION_COUNTER
from tools import latency  # test_latency.py's model, cache and roofline: the runs these numbers explain
from tools.cli import DECODE_KERNEL_OPTIONS, add_decode_kernel_options, parse_int_list, parse_size, run_cli
from tools.measure import CompiledStepTimer, StepTimer, load_config_for_length, synchronize

LOOPS = ("fast", "transformers")
SMOKE_CONFIGS = ["configs/llama_tiny.json", "configs/llama_tiny_opt.json"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--configs",
        nargs="+",
        default=["configs/tinyllama.json", "configs/tinyllama_opt.json"],
        help="model config .json files (a Llama and its LCKV twin); each is built with random weights",
    )
    p.add_argument("--batches", default="1", help="comma-separated batch sizes")
    p.add_argument("--context", type=int, default=2048, help="tokens in the cache when decoding starts (the prompt)")
    p.add_argument("--new_tokens", type=int, default=128, help="tokens sampled by the timed generate")
    p.add_argument("--check_tokens", type=int, default=16, help="tokens compared between the two loops")
    p.add_argument(
        "--attn_implementation",
        default=SPLIT_KV,
        help=f"attention of both models (default {SPLIT_KV}: the decode kernel reading only the filled cache)",
    )
    p.add_argument(
        "--compile_mode",
        choices=latency.COMPILE_MODES,
        default="reduce-overhead",
        help="torch.compile mode of the decode step (as test_latency.py --compile_mode)",
    )
    p.add_argument(
        "--hbm_bandwidth", default="4.8TB", help="memory bandwidth per second for the roofline (H200: 4.8TB)"
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device the models are built on (default: cuda when available, else cpu)",
    )
    add_decode_kernel_options(p)
    p.add_argument(
        "--fast_loop_only",
        action="store_true",
        help="time the captured loop alone: no transformers loop and no token comparison between the two (an A/B of "
        "the step in about half the device time; the JSON's comparison fields are absent)",
    )
    p.add_argument("--smoke", action="store_true", help="CPU, tiny configs, a few tokens: the same code path")
    p.add_argument(
        "--output_dir",
        default="bench/results/generate_overhead",
        help="folder of the JSON (one file per set of configs and batches)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.context, args.new_tokens, args.check_tokens = "cpu", 8, 6, 4
        args.configs = SMOKE_CONFIGS if args.configs == p.get_default("configs") else args.configs
    args.batch_list = parse_int_list("--batches", args.batches)
    args.bandwidth = parse_size("--hbm_bandwidth", args.hbm_bandwidth)
    for name in ("context", "new_tokens", "check_tokens"):
        if getattr(args, name) < 2:
            p.error(f"--{name}: {getattr(args, name)}; allowed values are integers >= 2")
    if args.check_tokens > args.new_tokens:
        p.error(f"--check_tokens: {args.check_tokens}; allowed values are <= --new_tokens ({args.new_tokens})")
    return args


class GenerateRun(NamedTuple):
    """What ``run_generate`` returns: the new tokens ``(B, n)``; when timed, generate's ms per token (first new token
    to last) and the captured forward's mean ms (None when it was not compiled); when asked, the logits ``(B, n, V)``
    that chose the tokens; when timed, the captured forward's fastest, median and slowest call
    (``CompiledStepTimer.spread_ms``)."""

    tokens: torch.Tensor
    ms: float | None = None
    captured_ms: float | None = None
    logits: torch.Tensor | None = None
    captured_spread: dict | None = None


def run_generate(
    model,
    cache,
    batch: int,
    context: int,
    loop: str,
    new_tokens: int,
    sample: bool = True,
    timed: bool = False,
    logits: bool = False,
) -> GenerateRun:
    """``new_tokens`` tokens for ``batch`` sequences after the ``context`` in ``cache`` (one more prompt token is
    prefilled) with ``loop``; the cache is rewound to ``context`` afterwards. ``logits`` (transformers' loop only:
    the fast loop returns tokens alone) also keeps the logits of every step."""
    model.generation_config.fast_decode = loop == "fast"
    ids = torch.randint(
        3, model.config.vocab_size, (batch, context + 1), generator=torch.Generator().manual_seed(0)
    ).to(model.device)
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        cache=cache,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
        do_sample=sample,
    )
    if sample:
        kwargs["top_k"] = 0
    if logits:
        kwargs |= dict(output_logits=True, return_dict_in_generate=True)
    torch.manual_seed(0)
    with tqdm(total=new_tokens, disable=True) as bar, CompiledStepTimer(model) as step_timer, torch.no_grad():
        timer = StepTimer(bar)
        synchronize(model.device)
        out = model.generate(ids, streamer=timer if timed else None, **kwargs)
        synchronize(model.device)
    set_cached_length(cache, context)
    sequences, step_logits = (out.sequences, torch.stack(out.logits, 1)) if logits else (out, None)
    if not timed:
        return GenerateRun(sequences[:, context + 1 :], logits=step_logits)
    ms = 1e3 * (timer.times[-1] - timer.times[1]) / (len(timer.times) - 2)
    return GenerateRun(sequences[:, context + 1 :], ms, step_timer.mean_ms(), step_logits, step_timer.spread_ms())


def first_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int] | None:
    """``(row, step)`` of the earliest step at which two ``(B, n)`` token tensors differ (its first such row), or
    None when they are equal."""
    steps = (a != b).any(0).nonzero()
    if len(steps) == 0:
        return None
    step = int(steps[0])
    return int((a[:, step] != b[:, step]).nonzero()[0]), step


def logit_tie(logits: torch.Tensor, chosen: int, other: int, dtype: torch.dtype) -> dict:
    """How close ``other`` came to ``chosen`` in one row's logits ``(V,)`` (values of the forward's ``dtype``, which
    generate hands out as float32): their gap, and one ulp of ``dtype`` at the chosen logit's magnitude. A gap of a
    few ulps is a tie that two forwards compiled differently may break either way."""
    top = float(logits[chosen])
    ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(abs(top))) if top else torch.finfo(dtype).tiny
    gap = top - float(logits[other])
    return {"logit_gap": gap, "ulp": ulp, "gap_in_ulps": gap / ulp}


def greedy_divergence(model, cache, batch: int, context: int, greedy: dict[str, torch.Tensor]) -> dict | None:
    """Where the loops' greedy tokens ``(B, n)`` first differ (None where they agree): the row, the step, each loop's
    token, and ``logit_tie`` of the two tokens in transformers' loop's logits at that step (its run repeated up to
    there, the prefix being the same in both loops)."""
    divergence = first_difference(greedy["fast"], greedy["transformers"])
    if divergence is None:
        return None
    row, step = divergence
    tokens = {loop: int(new[row, step]) for loop, new in greedy.items()}
    stock = run_generate(model, cache, batch, context, "transformers", step + 1, sample=False, logits=True)
    dtype = next(model.parameters()).dtype
    tie = logit_tie(stock.logits[row, step], tokens["transformers"], tokens["fast"], dtype)
    return {"row": row, "step": step, "tokens": tokens} | tie


def measure(model, config, batch: int, args) -> dict:
    """Both loops at ``batch`` (the fast one alone with ``args.fast_loop_only``): warm-up, timed run, tokens
    compared."""
    cache = latency.filled_cache(
        model,
        SimpleNamespace(cache="static", prompt_len=args.context, gen_len=args.new_tokens, offload=False),
        batch,
        args.context,
    )
    row = {"batch": batch, "context": args.context, "new_tokens": args.new_tokens}
    tokens = {}
    for loop in ("fast",) if args.fast_loop_only else LOOPS:
        rewrites = Counter(counters[GEMV_FUSION_COUNTER])
        run_generate(model, cache, batch, args.context, loop, 3)  # compile, warm up and capture
        _, ms, captured, _, spread = run_generate(model, cache, batch, args.context, loop, args.new_tokens, timed=True)
        row[loop] = {
            "ms_per_token": ms,
            "captured_step_ms": captured,
            "captured_step_ms_spread": spread,
            "vs_captured": ms / captured if captured else None,
        }
        if args.gemv_fusion:  # what the pass rewrote in the graphs this loop compiled (all: compile_every_graph)
            row[loop]["gemv_fusion_rewrites"] = dict(Counter(counters[GEMV_FUSION_COUNTER]) - rewrites)
        tokens[loop] = [
            run_generate(model, cache, batch, args.context, loop, args.check_tokens, sample=s).tokens
            for s in (False, True)
        ]
    dtype = next(model.parameters()).dtype
    row["roofline_ms"] = latency.step_roofline_ms(
        latency.weight_bytes(config, dtype),
        latency.kv_read_bytes_per_token(config, dtype),
        batch,
        args.context + args.new_tokens / 2,
        args.bandwidth,
    )
    if args.fast_loop_only:
        return row
    fast, stock = row["fast"], row["transformers"]
    row["fast_vs_transformers_captured_step"] = (
        fast["ms_per_token"] / stock["captured_step_ms"] if stock["captured_step_ms"] else None
    )
    row["fast_vs_transformers_generate"] = fast["ms_per_token"] / stock["ms_per_token"]
    row["same_tokens"] = {
        kind: bool(torch.equal(a, b)) for kind, a, b in zip(("greedy", "sampled"), *tokens.values(), strict=True)
    }
    greedy = {loop: new[0] for loop, new in tokens.items()}
    row["greedy_divergence"] = greedy_divergence(model, cache, batch, args.context, greedy)
    del cache
    return row


def compile_every_graph() -> None:
    """Compile every graph of this (main) thread, never load one from inductor's FX graph cache or AOTAutograd's: a
    loaded graph was rewritten by the GEMV fusion pass when it was first compiled (the pass is part of the key), but
    not here, so its rewrites would be missing from ``gemv_fusion_rewrites`` (an earlier run's JSON read ``{}``)."""
    inductor_config.fx_graph_cache = False
    functorch_config.enable_autograd_cache = False


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.gemv_fusion:
        compile_every_graph()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    setting = {
        k: getattr(args, k)
        for k in (
            "context",
            "new_tokens",
            "check_tokens",
            "attn_implementation",
            "compile_mode",
            "hbm_bandwidth",
            "fast_loop_only",
            *DECODE_KERNEL_OPTIONS,
        )
    }
    setting["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    setting["dtype"] = str(dtype)
    results = []
    for path in args.configs:
        config = load_config_for_length(path, args.context + args.new_tokens + 1)
        latency_args = SimpleNamespace(
            seed=0,
            device=args.device,
            attn_implementation=args.attn_implementation,
            compile_mode=args.compile_mode,
            **{option: getattr(args, option) for option in DECODE_KERNEL_OPTIONS},
        )
        model = latency.build_model(config, latency_args, dtype)  # the fast loop on a Llama too
        model.generation_config.compile_config = compile_config(args.device)
        for batch in args.batch_list:
            start = time.perf_counter()
            row = {"config": path, "model_type": config.model_type} | measure(model, config, batch, args)
            row["seconds"] = time.perf_counter() - start
            print(json.dumps(row), flush=True)
            results.append(row)
        del model
        torch._dynamo.reset()  # compiled graphs hold the weights
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = {"setting": setting, "runs": results}
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "_".join(Path(c).stem for c in args.configs) + "_b" + "_".join(map(str, args.batch_list))
    path = out_dir / f"generate_overhead_{name}.json"
    write_json(path, out)
    print(f"written: {path}")
    return out


if __name__ == "__main__":
    run_cli(main, prog="measure_generate_overhead")  # a usage error: one line, exit status 2
