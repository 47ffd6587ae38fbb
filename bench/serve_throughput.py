"""Tokens/s that `transformers serve` gives C concurrent clients of an LCKV model, beside test_latency.py's static
batch of the same size: how much of the batch throughput a served user gets.

    python bench/serve_throughput.py --part serve  --output_dir OUT   # GPU, ~5 min: export, serve, 1/8/64 clients
    python bench/serve_throughput.py --part static --output_dir OUT   # GPU, ~5 min: test_latency batches 1,8,64
    python bench/serve_throughput.py --smoke --part serve,static --output_dir OUT   # CPU, tiny model, same code paths

The two parts may run at the same time into one OUT, each on its own GPU (CUDA_VISIBLE_DEVICES=0 / 1).

``serve``: a checkpoint of ``--config`` with random weights (bf16 on CUDA) and a word-level tokenizer (one token per
word, so a prompt of P words is P tokens) is exported self-contained (``models.export``) and served by `transformers
serve --trust-remote-code` in its own process; for each C, C clients post one greedy /v1/completions request each at
the same time (``max_tokens`` G, no end-of-sequence token, so each gets G tokens). ``static``: test_latency.py
(``--compile``, prefill ``auto``) at batches C with the same prompt and generation lengths. Both parts merge into
OUT/serve_throughput.json: per C the served tokens/s (all clients, and per client) and the static batch's end-to-end
tokens/s, and their ratio.
"""

import argparse
import fcntl
import json
import random
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.transformers_server import transformers_server  # noqa: E402
from models.export import export_checkpoint, write_json  # noqa: E402
from tools.cli import ArgumentParser, check_choices, parse_int_list, run_cli  # noqa: E402
from tools.measure import load_config_for_length  # noqa: E402

PARTS = ("serve", "static")
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
STARTUP_SECONDS = 300


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="serve,static", help=f"comma-separated: {', '.join(PARTS)}")
    p.add_argument(
        "--smoke", action="store_true", help="CPU: configs/test_tiny_opt.json, clients 1,2,4, prompt 8 + 4 new tokens"
    )
    p.add_argument("--config", default="configs/tinyllama_opt.json", help="model config (random weights)")
    p.add_argument(
        "--clients", default="1,8,64", help="comma-separated numbers of concurrent clients (= static batch sizes)"
    )
    p.add_argument("--prompt_len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--gen_len", type=int, default=128, help="new tokens per request")
    p.add_argument(
        "--serve_compile", action="store_true", help="`transformers serve --compile` (static cache, torch.compile)"
    )
    p.add_argument("--output_dir", default="bench/results/serve_throughput")
    args = p.parse_args(argv)
    args.parts = args.part.split(",")
    check_choices("--part", args.parts, PARTS)
    if args.smoke:
        args.config, args.clients, args.prompt_len, args.gen_len = "configs/test_tiny_opt.json", "1,2,4", 8, 4
    args.client_counts = parse_int_list("--clients", args.clients)
    args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    return args


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word ``w<id>`` (ids from 4), and the usual specials 0-3."""
    vocab = {token: i for i, token in enumerate(SPECIAL)} | {f"w{i}": i for i in range(len(SPECIAL), vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_checkpoint(args, out: Path) -> Path:
    """The exported checkpoint: random weights, the word tokenizer, no end-of-sequence token (every answer is full)."""
    config = load_config_for_length(args.config, args.prompt_len + args.gen_len)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None
    repo_form = out / "repo_form"
    model.save_pretrained(repo_form)
    word_tokenizer(config.vocab_size).save_pretrained(repo_form)
    exported = out / "checkpoint"
    if exported.exists():
        import shutil

        shutil.rmtree(exported)
    export_checkpoint(repo_form, exported)
    return exported


def complete(url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """One greedy /v1/completions request: (seconds, completion tokens)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"content-type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=3600) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - start, answer["usage"]["completion_tokens"]


def served_throughput(args, out: Path) -> dict:
    checkpoint = build_checkpoint(args, out)
    vocab = load_config_for_length(args.config, 1).vocab_size
    rng = random.Random(0)

    def prompt() -> str:
        return " ".join(f"w{rng.randrange(len(SPECIAL), vocab)}" for _ in range(args.prompt_len))

    options = [
        "--device",
        args.device,
        "--dtype",
        "bfloat16" if args.device == "cuda" else "float32",
        *(["--compile"] if args.serve_compile else []),
    ]
    with transformers_server(checkpoint, out, options, STARTUP_SECONDS) as (_, url):
        complete(url, str(checkpoint), prompt(), args.gen_len)  # warm-up: loads the code, first forward
        results = {}
        for clients in args.client_counts:
            prompts = [prompt() for _ in range(clients)]
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                answers = list(pool.map(lambda text: complete(url, str(checkpoint), text, args.gen_len), prompts))
            wall = time.perf_counter() - start
            tokens = sum(count for _, count in answers)
            results[str(clients)] = {
                "wall_s": wall,
                "completion_tokens": tokens,
                "all_full_length": all(count == args.gen_len for _, count in answers),
                "tokens_per_s": tokens / wall,
                "per_client_tokens_per_s": sum(count / seconds for seconds, count in answers) / clients,
                "mean_latency_s": sum(seconds for seconds, _ in answers) / clients,
            }
            print(
                f"serve, {clients} clients: {tokens / wall:.1f} tok/s in all, "
                f"{results[str(clients)]['per_client_tokens_per_s']:.1f} per client"
            )
        return results


def static_throughput(args, out: Path) -> dict:
    """test_latency.py's end-to-end tokens/s at batch C (static cache, compiled decode step on CUDA)."""
    command = [
        sys.executable,
        str(REPO / "test_latency.py"),
        "--configs",
        args.config,
        "--batches",
        args.clients,
        "--prompt_len",
        str(args.prompt_len),
        "--gen_len",
        str(args.gen_len),
        "--compile",
        "--prefill",
        "auto",
        "--device",
        args.device,
        "--output_dir",
        str(out / "static"),
    ]
    subprocess.run(command, check=True, cwd=REPO)
    result = next(iter(json.loads((out / "static" / "latency.json").read_text())["models"].values()))
    runs = {str(r["batch"]): r for r in result["runs"] if not r.get("oom")}
    return {c: {"e2e_tokens_per_s": r["e2e_throughput"], "prefill_path": r["prefill_path"]} for c, r in runs.items()}


def merge_into_summary(path: Path, setting: dict, parts: dict) -> dict:
    """Add ``parts`` (``served`` and/or ``static_batch``) to the summary JSON at ``path`` under an exclusive lock, so
    the two parts may run at the same time (one GPU each) into one folder; the served share of the batch throughput
    is computed once both are there."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        summary = json.loads(path.read_text()) if path.exists() else {}
        summary |= {"setting": setting} | parts
        if "served" in summary and "static_batch" in summary:
            summary["served_share_of_batch"] = {
                c: summary["served"][c]["tokens_per_s"] / summary["static_batch"][c]["e2e_tokens_per_s"]
                for c in summary["served"]
                if c in summary["static_batch"]
            }
        write_json(path, summary)
    return summary


def measure(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setting = {k: getattr(args, k) for k in ("config", "prompt_len", "gen_len", "serve_compile", "device")} | {
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None
    }
    parts = {}
    if "serve" in args.parts:
        parts["served"] = served_throughput(args, out)
    if "static" in args.parts:
        parts["static_batch"] = static_throughput(args, out)
    summary_path = out / "serve_throughput.json"
    summary = merge_into_summary(summary_path, setting, parts)
    print(json.dumps(summary.get("served_share_of_batch", {}), indent=2))
    print(f"written: {summary_path}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    return run_cli(measure, argv, prog="bench/serve_throughput.py")


if __name__ == "__main__":
    main()
