"""Stream far past ``max_position_embeddings`` with attention sinks + a recent window (StreamingLLM) on the LCKV cache.

Examples:
    python run_streaming.py --model_name_or_path outputs/tiny --mode generate --prompt "ROMEO:" \\
        --max_new_tokens 5000 --window_size 252 --num_sink_tokens 4 --do_sample --top_p 0.9
    python run_streaming.py --model_name_or_path outputs/tiny --mode perplexity --use_embedded_corpus \\
        --num_tokens 20480 --window_size 252 --output_json outputs/streaming_ppl.json

The cache (``models/cache_streaming.py``) keeps ``num_sink_tokens + window_size`` tokens per KV layer and gives every
token the position of its cache slot, so memory stays constant and RoPE stays in the trained range. Perplexity is
computed token by token, as StreamingLLM's long-text evaluation, with the running value on the progress bar. A plain
Llama checkpoint runs as an opt-llama with every layer standard (the same network). Bad input exits with one line.

Exactness (LCKV): ``--mode perplexity`` feeds one token per forward, the exact semantics, so the exact switches do not
apply there (an error). ``--mode generate`` prefills the prompt in chunks of ``window_size`` tokens; each chunk is a
multi-token forward that ``config.prefill`` decides (the checkpoint's own; iterative by default: exact for the first
``num_encoders + 1`` tokens of each chunk). ``--prefill sequential`` or ``--sequential_forward`` run every chunk token
by token. A chunk makes room for all its tokens before its first one runs, so past the cache's capacity the first
tokens of a chunk see fewer window tokens than a stream of single tokens would.
"""

import argparse
import json
import sys
from pathlib import Path

import transformers

from models.cache_streaming import SinkWindowCache
from models.export import write_json
from tools.cli import (
    ArgumentParser,
    UsageError,
    check_output_file,
    check_range,
    opt_llama_config,
    read_text_file,
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
from tools.measure import cache_tokens, measure_stream

# Flags of one mode: given with the other they would be parsed and ignored, so they are an error there.
MODE_ONLY = {
    "generate": (
        "prompt",
        "prompt_file",
        "max_new_tokens",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "num_beams",
        "num_return_sequences",
        "ignore_eos",
    ),
    "perplexity": ("text_file", "use_embedded_corpus", "num_tokens", "output_json"),
}


def make_cache(config, args: argparse.Namespace) -> SinkWindowCache:
    """The sink + window cache from the flags (window default: the position limit less the sinks)."""
    limit = config.max_position_embeddings
    if args.window_size is None and args.num_sink_tokens >= limit:
        raise UsageError(
            f"--num_sink_tokens: {args.num_sink_tokens}; allowed are fewer than max_position_embeddings ({limit}), "
            "leaving room for the default window (or give --window_size)"
        )
    window = limit - args.num_sink_tokens if args.window_size is None else args.window_size
    try:
        return SinkWindowCache(config, window_size=window, num_sink_tokens=args.num_sink_tokens)
    except ValueError as error:
        raise UsageError(f"--{error}") from None


def read_text(args: argparse.Namespace) -> str:
    """The evaluation text: ``--text_file`` or the embedded corpus's test split."""
    if (args.text_file is None) == (not args.use_embedded_corpus):
        raise UsageError("--text_file / --use_embedded_corpus: give exactly one of them for --mode perplexity")
    if args.use_embedded_corpus:
        from corpus import prepare_corpus

        return prepare_corpus().test.read_text(encoding="utf-8")
    return read_text_file("--text_file", args.text_file)


def run_perplexity(model, tokenizer, cache: SinkWindowCache, text: str, args: argparse.Namespace) -> dict:
    """Streaming perplexity of the first ``num_tokens`` tokens of ``text``; the result is also written as JSON."""
    limit = model.config.max_position_embeddings
    num_tokens = args.num_tokens or 20 * limit  # checked >= 2 in run()
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, :num_tokens].to(model.device)
    check_token_ids(args, input_ids, model.config.vocab_size)
    if input_ids.shape[1] < 2:
        raise UsageError("text: fewer than 2 tokens; give a longer text")
    result = dict(
        model=args.model_name_or_path or args.config,
        model_type=model.config.model_type,
        num_kv_layers=len(cache.kv_layers),
        max_position_embeddings=limit,
        **measure_stream(model, input_ids, cache, bucket=limit, disable=args.quiet),
    )
    print(json.dumps({k: v for k, v in result.items() if k != "ppl_by_position"}))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.output_json), result)
    return result


def run_generate(model, tokenizer, cache: SinkWindowCache, prompt: str, args: argparse.Namespace) -> dict:
    """Generate ``max_new_tokens`` tokens (any number) with the streaming cache; long prompts are prefilled in
    chunks."""
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    check_token_ids(args, input_ids, model.config.vocab_size)
    transformers.logging.set_verbosity_error()  # generate warns past max_position_embeddings; streaming goes there
    print(prompt, end="", flush=True)
    new_tokens, seconds = generate_once(
        model, tokenizer, input_ids, args, cache=cache, prefill_chunk_size=cache.window_size
    )
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    if not streams_tokens(args):
        print("\n".join(texts))
    count = new_tokens.numel()
    print(
        f"\n[streaming] {count} new tokens in {seconds:.3f} s: {count / seconds:.1f} tokens/s; "
        f"cache holds {cache_tokens(cache)} tokens per KV layer",
        file=sys.stderr,
    )
    return dict(
        text=texts,
        new_tokens=count,
        seconds=seconds,
        tokens_per_s=count / seconds,
        max_cache_tokens=cache_tokens(cache),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument(
        "--mode",
        choices=("generate", "perplexity"),
        default="generate",
        help="generate text, or evaluate long-text perplexity",
    )
    parser.add_argument(
        "--window_size",
        type=int,
        default=None,
        help="recent tokens kept per KV layer (default: max_position_embeddings - num_sink_tokens)",
    )
    parser.add_argument(
        "--num_sink_tokens", type=int, default=4, help="first tokens kept for good as attention sinks (default 4)"
    )
    add_prompt_args(parser)
    add_generation_args(parser)
    parser.add_argument("--text_file", help="perplexity: text file to evaluate")
    parser.add_argument(
        "--use_embedded_corpus", action="store_true", help="perplexity: evaluate the embedded corpus's test split"
    )
    parser.add_argument(
        "--num_tokens",
        type=int,
        default=None,
        help="perplexity: tokens to evaluate (default 20 x max_position_embeddings)",
    )
    parser.add_argument(
        "--output_json", help="perplexity: write the result (with perplexity by position) to this JSON file"
    )
    add_exact_args(parser)
    args = parser.parse_args(argv)
    for mode, names in MODE_ONLY.items():
        given = [name for name in names if args.mode != mode and getattr(args, name) != parser.get_default(name)]
        if given:
            raise UsageError(f"--{given[0]}: applies to --mode {mode} only; this run is --mode {args.mode}")
    return args


def run(args: argparse.Namespace) -> dict:
    """Run the chosen mode; return its result dict."""
    args.device = resolve_device(args.device)
    check_generation_args(args)
    check_range("--num_tokens", args.num_tokens, minimum=2)
    if args.output_json:
        check_output_file("--output_json", args.output_json)
    text = read_text(args) if args.mode == "perplexity" else read_prompt(args)
    config = load_config_or_checkpoint(args)
    if args.mode == "perplexity" and (args.sequential_forward or args.prefill is not None):
        raise UsageError(
            f"{'--sequential_forward' if args.sequential_forward else '--prefill'}: --mode perplexity feeds one "
            "token per forward, exact already; allowed with --mode generate"
        )
    apply_exact_switches(args, config)
    config = opt_llama_config("--config" if args.config is not None else "--model_name_or_path", config)
    cache = make_cache(config, args)  # checks the window before loading any weights
    tokenizer = load_tokenizer(args)
    model = load_model(args, config, tokenizer)
    return (run_perplexity if args.mode == "perplexity" else run_generate)(model, tokenizer, cache, text, args)


def main(argv: list[str] | None = None) -> dict:
    """The command line; bad input ends the process with one line on stderr and exit status 2."""
    return run_cli(lambda argv: run(parse_args(argv)), argv, prog="run_streaming.py")


if __name__ == "__main__":
    main()
