"""What run_generation.py and run_streaming.py share: the flags that pick the model, the prompt, the decoding and the
LCKV exact switches, their checks, loading the config, tokenizer and model, and one timed ``generate``.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, TextStreamer

from models.prefill_modes import PREFILL_MODES

from . import cli
from .cli import DTYPE_CHOICES, UsageError, read_text_file, resolve_dtype, set_prefill, set_sequential
from .measure import synchronize


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Flags that pick the model, tokenizer, dtype and device (run_generation.py and run_streaming.py)."""
    parser.add_argument("--model_name_or_path", help="checkpoint directory (or hub id) of an opt-llama or llama model")
    parser.add_argument("--config", help="JSON config: a model with random weights instead of a checkpoint")
    parser.add_argument("--tokenizer", help="tokenizer directory (or hub id); default: the checkpoint's")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="float32",
        help="model dtype (default float32; auto: bfloat16 on cuda, float32 otherwise)",
    )
    parser.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    parser.add_argument(
        "--attn_implementation", default="sdpa", help="attention backend: sdpa, eager, flex_attention, ..."
    )
    parser.add_argument("--seed", type=int, default=42, help="random seed for weights (with --config) and sampling")
    cli.add_decode_kernel_options(parser)


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    """Flags that give the prompt: an argument, a file, or stdin when neither is given."""
    parser.add_argument("--prompt", help="prompt text")
    parser.add_argument("--prompt_file", help="read the prompt from this file (default: stdin if --prompt is absent)")


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """Decoding flags (run_generation.py and run_streaming.py)."""
    parser.add_argument("--max_new_tokens", type=int, default=64, help="number of tokens to generate (default 64)")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy / beam search")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do_sample)")
    parser.add_argument(
        "--top_k", type=int, default=50, help="sample from the k most likely tokens; 0 = all (with --do_sample)"
    )
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling probability mass (with --do_sample)")
    parser.add_argument("--num_beams", type=int, default=1, help="beam search width (1 = no beam search)")
    parser.add_argument("--num_return_sequences", type=int, default=1, help="sequences to return per prompt")
    parser.add_argument("--ignore_eos", action="store_true", help="always generate max_new_tokens tokens (for timing)")
    parser.add_argument(
        "--quiet", action="store_true", help="do not stream tokens; print only the final text and timings"
    )


def add_exact_args(parser: argparse.ArgumentParser) -> None:
    """The LCKV exact switches (run_generation.py and run_streaming.py); for other model types they are an error."""
    parser.add_argument(
        "--sequential_forward",
        action="store_true",
        help="LCKV: compute multi-token forwards token by token (exact); with and without cache then agree",
    )
    parser.add_argument(
        "--prefill",
        choices=PREFILL_MODES,
        default=None,
        help="LCKV prompt prefill into the cache (sets config.prefill; default: the checkpoint's own): iterative, "
        "sequential (token by token, exact) or auto (the cheaper one for the batch and prompt length)",
    )


def apply_exact_switches(args: argparse.Namespace, config) -> None:
    """Set ``--sequential_forward`` / ``--prefill`` on ``config`` (``tools.cli``: an error where they cannot apply)."""
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


def load_config_or_checkpoint(args: argparse.Namespace) -> PretrainedConfig:
    """The model config of ``--config`` (a JSON file: random weights), else of the ``--model_name_or_path`` checkpoint
    (whose weights are checked to be there)."""
    if (args.model_name_or_path is None) == (args.config is None):
        raise UsageError("--model_name_or_path / --config: give exactly one of them")
    if args.config is not None:
        return cli.load_config("--config", args.config)
    if Path(args.model_name_or_path).expanduser().is_file():
        raise UsageError(
            f"--model_name_or_path: {args.model_name_or_path} is a file; allowed is a checkpoint directory or a hub "
            "id (a config .json gives random weights through --config)"
        )
    config = cli.load_config("--model_name_or_path", args.model_name_or_path)
    cli.check_weights("--model_name_or_path", args.model_name_or_path)
    return config


def load_tokenizer(args: argparse.Namespace):
    """The tokenizer from ``--tokenizer`` or the checkpoint; sets a pad token when there is none."""
    source = args.tokenizer or args.model_name_or_path
    if source is None:
        raise UsageError("--tokenizer: needed with --config (e.g. the embedded corpus tokenizer, see python -m corpus)")
    tokenizer = cli.load_tokenizer("--tokenizer" if args.tokenizer else "--model_name_or_path", source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_token_ids(args: argparse.Namespace, input_ids: torch.Tensor, vocab_size: int) -> None:
    """The text's token ids exist in the model's vocabulary: a tokenizer of another model would fail inside the
    forward. (Random weights, ``--config``, are sized to the tokenizer.)"""
    largest = int(input_ids.max()) if input_ids.numel() else -1
    if args.config is None and largest >= vocab_size:
        flag = "--tokenizer" if args.tokenizer else "--model_name_or_path"
        raise UsageError(
            f"{flag}: the text holds token id {largest}, outside the model's vocabulary of {vocab_size}; allowed is "
            "the model's own tokenizer"
        )


def load_model(args: argparse.Namespace, config, tokenizer) -> PreTrainedModel:
    """The model in eval mode on ``args.device``: the checkpoint, or random weights for ``--config``.

    With random weights the vocabulary is sized to the tokenizer.
    """
    if args.config is not None:
        config.vocab_size = max(config.vocab_size, len(tokenizer))
    checkpoint = None if args.config is not None else args.model_name_or_path
    dtype = resolve_dtype(args.dtype, args.device)
    model = instantiate(
        config, checkpoint, args.device, args.seed, dtype=dtype, attn_implementation=args.attn_implementation
    )
    cli.set_decode_kernel_options(model, args)
    return model


def instantiate(config, checkpoint: str | None, device: str, seed: int, **kwargs) -> PreTrainedModel:
    """The model of ``config`` in eval mode on ``device``: ``checkpoint``'s weights, or (None) random weights of
    ``seed``; ``kwargs`` go to ``from_pretrained`` / ``from_config`` (dtype, attention implementation)."""
    cli.warn_kernel_flags_without_effect(config)
    if checkpoint is None:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, config=config, **kwargs)
    return model.to(device).eval()


def streams_tokens(args: argparse.Namespace) -> bool:
    """Whether ``generate_once`` prints tokens as they come (one sequence, no beams, not ``--quiet``); otherwise the
    caller prints the finished texts."""
    return args.num_beams == 1 and args.num_return_sequences == 1 and not args.quiet


def generate_once(
    model, tokenizer, input_ids: torch.Tensor, args: argparse.Namespace, **extra
) -> tuple[torch.Tensor, float]:
    """Generate from ``input_ids`` ``(1, T)``; return the new tokens ``(num_return_sequences, N)`` and the seconds
    taken.

    ``extra`` goes to ``generate`` as is (``use_cache``, ``cache``, ``prefill_chunk_size``, ...).
    """
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if streams_tokens(args) else None
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
    synchronize(model.device)
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **generation)
    synchronize(model.device)
    return output[:, input_ids.shape[1] :], time.perf_counter() - start


def check_generation_args(args: argparse.Namespace) -> None:
    """One-line errors for decoding flags out of range."""
    for name in ("max_new_tokens", "num_beams", "num_return_sequences"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name}: {getattr(args, name)}; allowed values are integers >= 1")
    cli.check_attn_implementation("--attn_implementation", args.attn_implementation)
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UsageError(f"--temperature: {args.temperature}; allowed is a finite number > 0")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top_p: {args.top_p}; allowed is 0 < top_p <= 1")
    if args.top_k < 0:
        raise UsageError(f"--top_k: {args.top_k}; allowed are integers >= 0 (0: all tokens)")
    if args.num_return_sequences > args.num_beams and not args.do_sample:
        raise UsageError(
            "--num_return_sequences: greedy search returns 1 sequence; allowed is <= --num_beams, or --do_sample"
        )
