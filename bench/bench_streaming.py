"""Streaming (sink + window) perplexity, tokens/s and peak memory of a tiny LCKV model and a Llama of the same shape.

    python -m bench.bench_streaming --train_steps 400                        # train both quickly, then measure
    python -m bench.bench_streaming --lckv_model outputs/opt --llama_model outputs/llama   # run_clm.py checkpoints

Each model streams the embedded corpus's test text token by token through ``SinkWindowCache``: at every window of
``--windows`` (default: 1/8, 1/4 of the position limit, and the limit less the sinks) over ``--ppl_factor`` x the
limit tokens, and at the largest window over ``--length_factor`` (20) x the limit, which gives tokens/s and peak
memory of a run far past the limit. ``--num_streams`` segments of the text run side by side as a batch. Without
checkpoints, ``--train_steps`` trains both from ``--config`` (the Llama: the same config with every layer standard,
which is LlamaForCausalLM's function) on the corpus train split with blocks of the position limit. Writes
``streaming.json`` and ``streaming.png`` (perplexity against position) under ``--output_dir``.
"""

import argparse
import json
import platform
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corpus import prepare_corpus
from models import OptLlamaConfig
from models.cache_streaming import SinkWindowCache
from models.export import write_json
from tools import cli as shared
from tools.cli import DTYPE_CHOICES, ArgumentParser, UsageError, check_range, run_cli
from tools.measure import measure_stream


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lckv_model", help="trained LCKV checkpoint directory (else trained here, see --train_steps)")
    parser.add_argument(
        "--llama_model", help="trained Llama checkpoint directory (else trained here, see --train_steps)"
    )
    parser.add_argument(
        "--config",
        default="configs/llama_tiny_opt.json",
        help="LCKV config to train from (the Llama: same, every layer standard)",
    )
    parser.add_argument(
        "--max_position_embeddings",
        type=int,
        default=256,
        help="position limit (and block size) of the models trained here",
    )
    parser.add_argument("--train_steps", type=int, default=0, help="AdamW steps per model when no checkpoint is given")
    parser.add_argument("--batch_size", type=int, default=16, help="training blocks per step")
    parser.add_argument(
        "--learning_rate", type=float, default=1e-3, help="peak learning rate (linear warmup 10%%, linear decay)"
    )
    parser.add_argument(
        "--windows", type=int, nargs="+", help="window sizes (default: limit/8, limit/4, limit - sinks)"
    )
    parser.add_argument("--num_sink_tokens", type=int, default=4, help="attention sinks kept")
    parser.add_argument(
        "--ppl_factor", type=int, default=4, help="tokens streamed per window, in multiples of the limit"
    )
    parser.add_argument(
        "--length_factor", type=int, default=20, help="tokens streamed at the largest window, in multiples of the limit"
    )
    parser.add_argument("--num_streams", type=int, default=4, help="text segments streamed side by side (batch size)")
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="dtype (auto: bfloat16 on cuda, float32 on cpu)"
    )
    parser.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (weights, training batches)")
    parser.add_argument("--output_dir", default="bench", help="where streaming.json and streaming.png go")
    args = parser.parse_args(argv)
    for flag in ("max_position_embeddings", "batch_size", "ppl_factor", "length_factor", "num_streams"):
        check_range(f"--{flag}", getattr(args, flag), minimum=1)
    for flag in ("train_steps", "num_sink_tokens"):
        check_range(f"--{flag}", getattr(args, flag), minimum=0)
    check_range("--learning_rate", args.learning_rate, minimum=0, exclusive_min=True)
    for window in args.windows or []:
        check_range("--windows", window, minimum=1)
    for flag in ("lckv_model", "llama_model"):
        if getattr(args, flag) is not None:
            shared.load_config(f"--{flag}", getattr(args, flag))
        elif args.train_steps < 1:
            raise UsageError(f"--{flag}: give a checkpoint, or --train_steps to train one here")
    if args.lckv_model is None or args.llama_model is None:
        shared.load_config("--config", args.config)
    args.device = torch.device(shared.resolve_device(args.device))
    shared.check_output_dir("--output_dir", args.output_dir)
    return args


def train(config, tokenizer, args: argparse.Namespace) -> tuple[torch.nn.Module, list[float]]:
    """Train a fresh model of ``config`` on random blocks of the corpus train split; return it and its losses."""
    block = config.max_position_embeddings
    needed = args.train_steps * args.batch_size * block
    text = prepare_corpus().train.read_text(encoding="utf-8")[: 8 * needed]  # ~4 characters a token: plenty
    ids = torch.tensor(tokenizer(text).input_ids)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.1)
    warmup = max(1, args.train_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, (args.train_steps - step) / (args.train_steps - warmup + 1))
    )
    losses = []
    for _ in range(args.train_steps):
        starts = torch.randint(0, len(ids) - block, (args.batch_size,))
        batch = torch.stack([ids[s : s + block] for s in starts]).to(args.device)
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.device.type == "cuda"):
            loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model.eval(), losses


def load_models(args: argparse.Namespace) -> dict[str, tuple]:
    """``{"lckv": (model, tokenizer, losses), "llama": ...}``, loaded from checkpoints or trained here."""
    corpus_tokenizer = None
    models = {}
    for name, path in (("lckv", args.lckv_model), ("llama", args.llama_model)):
        if path is not None:
            config = shared.load_opt_llama_config(f"--{name}_model", path)
            model = (
                AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).to(args.device).eval()
            )
            models[name] = (model, AutoTokenizer.from_pretrained(path), [])
            continue
        corpus_tokenizer = corpus_tokenizer or AutoTokenizer.from_pretrained(prepare_corpus().tokenizer)
        fields = json.loads(Path(args.config).read_text())
        fields.pop("model_type", None)
        fields.update(max_position_embeddings=args.max_position_embeddings, vocab_size=len(corpus_tokenizer))
        if name == "llama":
            fields["layer_types"] = "_".join(["0"] * fields["num_hidden_layers"])
        model, losses = train(OptLlamaConfig(**fields), corpus_tokenizer, args)
        models[name] = (model, corpus_tokenizer, losses)
    return models


def plot(runs: list[dict], limit: int, path: Path) -> None:
    """Perplexity against position, one line per model and window; the position limit dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    windows = sorted({run["window_size"] for run in runs})
    for run in runs:
        buckets = run["ppl_by_position"]
        x = [(b["start"] + b["end"]) / 2 for b in buckets]
        ax.plot(
            x,
            [b["ppl"] for b in buckets],
            "-" if run["model"] == "lckv" else "--",
            color=f"C{windows.index(run['window_size'])}",
            label=f"{run['model']} window {run['window_size']}",
        )
    ax.axvline(limit, color="gray", linestyle=":", label=f"position limit {limit}")
    ax.set(
        xlabel="position in the stream (tokens)",
        ylabel="perplexity",
        yscale="log",
        title="Streaming perplexity (sinks + window)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    """The command line; bad input ends the process with one line on stderr and exit status 2."""
    return run_cli(compare, argv, prog="bench_streaming")


def compare(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dtype = shared.resolve_dtype(args.dtype, args.device.type)
    models = load_models(args)
    test_text = prepare_corpus().test.read_text(encoding="utf-8")
    runs, training = [], {}
    for name, (model, tokenizer, losses) in models.items():
        model.to(dtype)
        limit = model.config.max_position_embeddings
        windows = sorted(args.windows or [limit // 8, limit // 4, limit - args.num_sink_tokens])
        longest = args.length_factor * limit
        ids = tokenizer(test_text[: 8 * args.num_streams * longest], return_tensors="pt").input_ids[
            0
        ]  # ~4 chars a token
        if len(ids) < args.num_streams * longest:
            raise UsageError(
                f"--num_streams: {args.num_streams}; the test text has {len(ids)} tokens, fewer than "
                f"{args.num_streams} x {longest}; allowed are fewer streams or a smaller --length_factor"
            )
        ids = ids[: args.num_streams * longest].view(args.num_streams, longest).to(args.device)
        for window in windows:
            length = longest if window == windows[-1] else args.ppl_factor * limit
            cache = SinkWindowCache(model.config, window_size=window, num_sink_tokens=args.num_sink_tokens)
            run = measure_stream(
                model, ids[:, :length], cache, bucket=max(1, limit // 2), desc=f"{name} window {window}"
            )
            runs.append(
                dict(model=name, num_kv_layers=model.config.num_kv_layers, max_position_embeddings=limit, **run)
            )
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "ppl_by_position"}))
        training[name] = dict(
            steps=len(losses), first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None
        )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device.type == "cuda" else platform.processor() or "cpu"
    result = dict(
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        num_sink_tokens=args.num_sink_tokens,
        training=training,
        runs=runs,
    )
    write_json(out / "streaming.json", result)
    plot(runs, runs[0]["max_position_embeddings"], out / "streaming.png")
    print(f"wrote {out / 'streaming.json'} and {out / 'streaming.png'}")


if __name__ == "__main__":
    main()
