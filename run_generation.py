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
import time

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, TextStreamer

from models import OptLlamaConfig
from models import cli as shared  # import models registers model_types "opt-llama" and "lckv-llama"
from models.cli import (
    DTYPE_CHOICES,
    ArgumentParser,
    UsageError,
    read_text_file,
    resolve_dtype,
    run_cli,
    set_prefill,
    set_sequential,
)
from models.fast_decode import enable_fast_decode
from models.prefill_modes import PREFILL_MODES


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Flags that pick the model, tokenizer, dtype and device (shared with run_streaming.py)."""
    parser.add_argument("--model_name_or_path", help="checkpoint directory (or hub id) of an opt-llama or llama model")
    parser.add_argument("--config", help="JSON config: a model with random weights instead of a checkpoint")
    parser.add_argument("--tokenizer", help="tokenizer directory (or hub id); default: the checkpoint's")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                        help="model dtype (default float32; auto: bfloat16 on cuda, float32 otherwise)")
    parser.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    parser.add_argument("--attn_implementation", default="sdpa", help="attention backend: sdpa, eager, flex_attention, ...")
    parser.add_argument("--seed", type=int, default=42, help="random seed for weights (with --config) and sampling")


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    """Flags that give the prompt: an argument, a file, or stdin when neither is given."""
    parser.add_argument("--prompt", help="prompt text")
    parser.add_argument("--prompt_file", help="read the prompt from this file (default: stdin if --prompt is absent)")


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """Decoding flags (shared with run_streaming.py)."""
    parser.add_argument("--max_new_tokens", type=int, default=64, help="number of tokens to generate (default 64)")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy / beam search")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do_sample)")
    parser.add_argument("--top_k", type=int, default=50, help="sample from the k most likely tokens; 0 = all (with --do_sample)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling probability mass (with --do_sample)")
    parser.add_argument("--num_beams", type=int, default=1, help="beam search width (1 = no beam search)")
    parser.add_argument("--num_return_sequences", type=int, default=1, help="sequences to return per prompt")
    parser.add_argument("--ignore_eos", action="store_true", help="always generate max_new_tokens tokens (for timing)")
    parser.add_argument("--quiet", action="store_true", help="do not stream tokens; print only the final text and timings")


def add_exact_args(parser: argparse.ArgumentParser) -> None:
    """The LCKV exact switches (shared with run_streaming.py); for other model types they are an error."""
    parser.add_argument("--sequential_forward", action="store_true",
                        help="LCKV: compute multi-token forwards token by token (exact); with and without cache then agree")
    parser.add_argument("--prefill", choices=PREFILL_MODES, default=None,
                        help="LCKV prompt prefill into the cache (sets config.prefill; default: the checkpoint's own): iterative, "
                        "sequential (token by token, exact) or auto (the cheaper one for the batch and prompt length)")


def apply_exact_switches(args: argparse.Namespace, config) -> None:
    """Set ``--sequential_forward`` / ``--prefill`` on ``config`` (``models.cli``: an error where they cannot apply)."""
    if args.sequential_forward:
        set_sequential(config, "--sequential_forward")
    if args.prefill is not None:
        set_prefill(config, "--prefill", args.prefill)


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt from ``--prompt``, ``--prompt_file`` or stdin; an empty one is a UsageError."""
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("--prompt / --prompt_file: give one of them, not both")
    if args.prompt is not None:
        prompt = args.prompt
    elif args.prompt_file is not None:
        prompt = read_text_file("--prompt_file", args.prompt_file)
    elif sys.stdin.isatty():
        raise UsageError("prompt: give --prompt TEXT, --prompt_file FILE, or pipe the prompt on stdin")
    else:
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UsageError("prompt: empty; give some text")
    return prompt


def load_config(args: argparse.Namespace):
    """The model config from ``--config`` (a JSON file) or the checkpoint."""
    if (args.model_name_or_path is None) == (args.config is None):
        raise UsageError("--model_name_or_path / --config: give exactly one of them")
    if args.config is not None:
        return shared.load_config("--config", args.config)
    config = shared.load_config("--model_name_or_path", args.model_name_or_path)
    shared.check_weights("--model_name_or_path", args.model_name_or_path)
    return config


def load_tokenizer(args: argparse.Namespace):
    """The tokenizer from ``--tokenizer`` or the checkpoint; sets a pad token when there is none."""
    source = args.tokenizer or args.model_name_or_path
    if source is None:
        raise UsageError("--tokenizer: needed with --config (e.g. the embedded corpus tokenizer, see python -m corpus)")
    tokenizer = shared.load_tokenizer("--tokenizer" if args.tokenizer else "--model_name_or_path", source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(args: argparse.Namespace, config, tokenizer) -> PreTrainedModel:
    """The model in eval mode on ``args.device``: the checkpoint, or random weights for ``--config``.

    With random weights the vocabulary is sized to the tokenizer.
    """
    kwargs = dict(dtype=resolve_dtype(args.dtype, args.device), attn_implementation=args.attn_implementation)
    if args.config is not None:
        config.vocab_size = max(config.vocab_size, len(tokenizer))
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, config=config, **kwargs)
    return model.to(args.device).eval()


def resolve_device(args: argparse.Namespace) -> None:
    """Fill in and check ``args.device``: cuda when available, else cpu."""
    args.device = shared.resolve_device(args.device)


def generate_once(model, tokenizer, input_ids: torch.Tensor, args: argparse.Namespace, **extra) -> tuple[torch.Tensor, float]:
    """Generate from ``input_ids`` ``(1, T)``; return the new tokens ``(num_return_sequences, N)`` and the seconds taken.

    ``extra`` goes to ``generate`` as is (``use_cache``, ``cache``, ``prefill_chunk_size``, ...).
    """
    streamer = None
    if args.num_beams == 1 and args.num_return_sequences == 1 and not args.quiet:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    torch.manual_seed(args.seed)
    generation = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        num_beams=args.num_beams,
        num_return_sequences=args.num_return_sequences,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        **extra,
    )
    if args.do_sample:
        generation.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.ignore_eos:
        generation.update(min_new_tokens=args.max_new_tokens)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **generation)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return output[:, input_ids.shape[1] :], time.perf_counter() - start


def check_generation_args(args: argparse.Namespace) -> None:
    """One-line errors for decoding flags out of range."""
    for name in ("max_new_tokens", "num_beams", "num_return_sequences"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name}: {getattr(args, name)}; allowed values are integers >= 1")
    shared.check_attn_implementation("--attn_implementation", args.attn_implementation)
    if args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UsageError("--temperature / --top_p / --top_k: allowed are temperature > 0, 0 < top_p <= 1, top_k >= 0")
    if args.num_return_sequences > args.num_beams and not args.do_sample:
        raise UsageError("--num_return_sequences: greedy search returns 1 sequence; allowed is <= --num_beams, or --do_sample")


def check_cache_flags(args: argparse.Namespace) -> None:
    """``--static_cache`` needs a cache; ``--offload`` moves one between GPU and CPU: it needs a cache and CUDA."""
    if args.static_cache and args.no_cache:
        raise UsageError("--static_cache: preallocates the KV cache, so it cannot go with --no_cache")
    if not args.offload:
        return
    if args.no_cache or args.compare_cache:
        raise UsageError("--offload: offloads the KV cache, so it cannot go with --no_cache or --compare_cache")
    if not str(args.device).startswith("cuda"):
        raise UsageError(f"--offload: moves the KV cache between GPU and CPU, so it needs a cuda --device, not {args.device}")


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
    cache.add_argument("--compare_cache", action="store_true", help="generate with and without the cache; report both speeds and whether the text matches")
    parser.add_argument("--static_cache", action="store_true",
                        help="preallocated (static) KV cache; on CUDA, generate compiles the decode step (CUDA graphs) and runs "
                        "the captured decode loop (models/fast_decode.py; tokens stream in bursts)")
    parser.add_argument("--offload", action="store_true",
                        help="keep each KV layer on the CPU between uses (transformers' offloaded cache, offloaded_static with "
                        "--static_cache); CUDA only")
    add_exact_args(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Generate as the flags say; return ``{mode: {"text": [...], "new_tokens": n, "seconds": s, "tokens_per_s": r}}``."""
    resolve_device(args)
    check_generation_args(args)
    check_cache_flags(args)
    prompt = read_prompt(args)
    config = load_config(args)
    if args.prefill is not None and args.no_cache:
        raise UsageError("--prefill: the prompt prefill fills the KV cache, and --no_cache generates without one; "
                         "allowed is a cache, or --sequential_forward for exact no-cache forwards")
    apply_exact_switches(args, config)
    tokenizer = load_tokenizer(args)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(args.device)
    check_position_limit(args, input_ids.shape[1], config.max_position_embeddings)
    model = load_model(args, config, tokenizer)
    if args.static_cache:  # a Llama too (LCKV models always): decoding without a host sync per token
        enable_fast_decode(model)

    modes = {"cache": True, "no_cache": False} if args.compare_cache else {"no_cache" if args.no_cache else "cache": not args.no_cache}
    results = {}
    for mode, use_cache in modes.items():
        print(f"--- {mode} ---\n{prompt}", end="", flush=True)
        implementation = cache_implementation(args) if use_cache else None
        extra = {"cache_implementation": implementation} if implementation else {}
        new_tokens, seconds = generate_once(model, tokenizer, input_ids, args, use_cache=use_cache, **extra)
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        if args.quiet or len(texts) > 1:
            print("\n".join(texts) if len(texts) == 1 else "".join(f"\n[{i}] {t}" for i, t in enumerate(texts)))
        count = new_tokens.numel()
        results[mode] = dict(text=texts, new_tokens=count, seconds=seconds, tokens_per_s=count / seconds)
        print(f"\n[{mode}] {count} new tokens in {seconds:.3f} s: {count / seconds:.1f} tokens/s", file=sys.stderr)
    if args.compare_cache:
        same = results["cache"]["text"] == results["no_cache"]["text"]
        speedup = results["cache"]["tokens_per_s"] / results["no_cache"]["tokens_per_s"]
        print(f"[compare] cache is {speedup:.2f}x faster; same text: {'yes' if same else 'no'}", file=sys.stderr)
        if not same and isinstance(model.config, OptLlamaConfig) and not model.config.sequential_forward:
            print("[compare] LCKV: the no-cache forward is exact only for num_encoders + 1 tokens; use --sequential_forward", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> dict:
    """The command line; bad input ends the process with one line on stderr and exit status 2."""
    return run_cli(lambda argv: run(parse_args(argv)), argv, prog="run_generation.py")


if __name__ == "__main__":
    main()
