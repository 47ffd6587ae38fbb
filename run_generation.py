"""Generate text from an LCKV (``opt-llama``) or plain Llama checkpoint, streaming tokens to the terminal.

Examples:
    python run_generation.py --model_name_or_path outputs/tiny --prompt "ROMEO:" --max_new_tokens 100
    echo "KING:" | python run_generation.py --model_name_or_path outputs/tiny --do_sample --top_p 0.9
    python run_generation.py --config configs/test_tiny_opt.json --tokenizer .cache/corpus/<dir>/tokenizer \\
        --prompt "Hello" --compare_cache --sequential_forward

``--compare_cache`` generates with and without the KV cache and reports the time and tokens/s of each, so you see
what the cache buys. The no-cache forward of an LCKV model runs ``num_encoders + 1`` parallel iterations, exact only
for that many tokens; ``--sequential_forward`` computes token by token (the exact semantics, docs/design.md), and
then both modes give the same text at any length. Sequences past ``max_position_embeddings`` are an error here: use
run_streaming.py to go beyond. Bad input exits with a one-line error.
"""

import argparse
import sys

from models import OptLlamaConfig  # import models registers model_types "opt-llama" and "lckv-llama"
from models.fast_decode import enable_fast_decode
from tools.cli import (
    ArgumentParser,
    UsageError,
    check_compiled_only_options,
    is_sequential,
    resolve_device,
    run_cli,
)
from tools.generation import (
    add_exact_args,
    add_generation_args,
    add_model_args,
    add_prompt_args,
    apply_exact_switches,
    check_generation_args,
    check_token_ids,
    generate_once,
    load_config_or_checkpoint,
    load_model,
    load_tokenizer,
    read_prompt,
    streams_tokens,
)


def check_exact_prefill_masks(args: argparse.Namespace, config) -> None:
    """An exact prefill (``sequential_forward`` or ``prefill="sequential"``, from the flags or the checkpoint's config)
    cuts the prompt's masks per token; over a ``--static_cache`` generate makes flex-attention masks whole, which
    cannot be cut: a UsageError before the model loads."""
    if is_sequential(config) and args.static_cache and args.attn_implementation == "flex_attention":
        raise UsageError(
            "--attn_implementation: flex_attention's masks over a --static_cache cannot be cut per token for the "
            "exact (sequential) prefill that the flags or the checkpoint's config ask for; allowed there are sdpa, "
            "eager, sdpa_packed_gqa, sdpa_split_kv"
        )


def check_cache_flags(args: argparse.Namespace) -> None:
    """``--static_cache`` needs a cache; ``--offload`` moves a cache between GPU and CPU: it needs a cache and CUDA."""
    if args.static_cache and args.no_cache:
        raise UsageError("--static_cache: preallocates the KV cache, so it cannot go with --no_cache")
    check_compiled_only_options(args, args.static_cache, "--static_cache on CUDA (generate compiles its decode step)")
    if not args.offload:
        return
    if args.no_cache or args.compare_cache:
        raise UsageError("--offload: offloads the KV cache, so it cannot go with --no_cache or --compare_cache")
    if not str(args.device).startswith("cuda"):
        raise UsageError(
            f"--offload: moves the KV cache between GPU and CPU, so it needs a cuda --device, not {args.device}"
        )


def cache_implementation(args: argparse.Namespace) -> str | None:
    """generate's ``cache_implementation`` for ``--static_cache`` / ``--offload`` (None: the dynamic cache)."""
    names = {(True, False): "static", (False, True): "offloaded", (True, True): "offloaded_static"}
    return names.get((args.static_cache, args.offload))


def check_position_limit(args: argparse.Namespace, prompt_length: int, limit: int) -> None:
    """Without streaming, prompt + new tokens past ``max_position_embeddings`` is a one-line error."""
    if prompt_length + args.max_new_tokens > limit:
        raise UsageError(
            f"sequence length: prompt {prompt_length} + max_new_tokens {args.max_new_tokens} tokens exceed "
            f"max_position_embeddings={limit}; shorten them or stream with run_streaming.py"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_prompt_args(parser)
    add_generation_args(parser)
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--no_cache", action="store_true", help="generate without the KV cache (recompute every step)")
    cache.add_argument(
        "--compare_cache",
        action="store_true",
        help="generate with and without the cache; report both speeds and whether the text matches",
    )
    parser.add_argument(
        "--static_cache",
        action="store_true",
        help="preallocated (static) KV cache; on CUDA, generate compiles the decode step (CUDA graphs) and runs "
        "the captured decode loop (models/fast_decode.py; tokens stream in bursts)",
    )
    parser.add_argument(
        "--offload",
        action="store_true",
        help="keep each KV layer on the CPU between uses (transformers' offloaded cache, offloaded_static with "
        "--static_cache); CUDA only",
    )
    add_exact_args(parser)
    return parser.parse_args(argv)


def check_prefill_has_a_cache(args: argparse.Namespace, config) -> None:
    """``--prefill iterative`` or ``auto`` picks how the prompt fills the KV cache: with ``--no_cache`` (or the
    no-cache half of ``--compare_cache``) there is none to fill, and "auto" would not be priced (the forwards run
    iteratively). A one-line error; ``--prefill sequential`` (or ``sequential_forward``) makes every forward exact,
    cache or not, so it applies there."""
    if args.prefill is None or not (args.no_cache or args.compare_cache) or is_sequential(config):
        return
    flag = "--no_cache" if args.no_cache else "--compare_cache"
    raise UsageError(
        f"--prefill: the prompt prefill fills the KV cache, and {flag} generates without one; "
        "allowed is a cache, or --prefill sequential / --sequential_forward for exact no-cache forwards"
    )


def run(args: argparse.Namespace) -> dict:
    """Generate as the flags say; return
    ``{mode: {"text": [...], "new_tokens": n, "seconds": s, "tokens_per_s": r}}``."""
    args.device = resolve_device(args.device)
    check_generation_args(args)
    check_cache_flags(args)
    prompt = read_prompt(args)
    config = load_config_or_checkpoint(args)
    apply_exact_switches(args, config)
    check_prefill_has_a_cache(args, config)
    check_exact_prefill_masks(args, config)
    tokenizer = load_tokenizer(args)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(args.device)
    check_token_ids(args, input_ids, config.vocab_size)
    check_position_limit(args, input_ids.shape[1], config.max_position_embeddings)
    model = load_model(args, config, tokenizer)
    if args.static_cache:  # a Llama too (LCKV models always): decoding without a host sync per token
        enable_fast_decode(model)

    modes = (
        {"cache": True, "no_cache": False}
        if args.compare_cache
        else {"no_cache" if args.no_cache else "cache": not args.no_cache}
    )
    results = {}
    for mode, use_cache in modes.items():
        print(f"--- {mode} ---\n{prompt}", end="", flush=True)
        implementation = cache_implementation(args) if use_cache else None
        extra = {"cache_implementation": implementation} if implementation else {}
        new_tokens, seconds = generate_once(model, tokenizer, input_ids, args, use_cache=use_cache, **extra)
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        if not streams_tokens(args):
            print("\n".join(texts) if len(texts) == 1 else "".join(f"\n[{i}] {t}" for i, t in enumerate(texts)))
        count = new_tokens.numel()
        results[mode] = dict(text=texts, new_tokens=count, seconds=seconds, tokens_per_s=count / seconds)
        print(f"\n[{mode}] {count} new tokens in {seconds:.3f} s: {count / seconds:.1f} tokens/s", file=sys.stderr)
    if args.compare_cache:
        same = results["cache"]["text"] == results["no_cache"]["text"]
        speedup = results["cache"]["tokens_per_s"] / results["no_cache"]["tokens_per_s"]
        print(f"[compare] cache is {speedup:.2f}x faster; same text: {'yes' if same else 'no'}", file=sys.stderr)
        if not same and isinstance(model.config, OptLlamaConfig) and not model.config.sequential_forward:
            print(
                "[compare] LCKV: the no-cache forward is exact only for num_encoders + 1 tokens; "
                "use --sequential_forward",
                file=sys.stderr,
            )
    return results


def main(argv: list[str] | None = None) -> dict:
    """The command line; bad input ends the process with one line on stderr and exit status 2."""
    return run_cli(lambda argv: run(parse_args(argv)), argv, prog="run_generation.py")


if __name__ == "__main__":
    main()
