"""Floating-point work of LCKV against Llama of the same shape: one prefill and one training step.

    python -m bench.bench_flops --output_dir bench/results/flops

Counts with torch's ``FlopCounterMode`` on the meta device (no memory, no GPU, deterministic): matrix
multiplies and attention, as dispatched by the models' real forward and backward. LCKV's cost is its
iterations (docs/design.md): the cyclic block runs ``num_encoders + 1`` times (prefill: at most
the prompt length), two of them with gradients in training. Writes ``flops.json`` with each model's
TFLOPs and its ratio to the baseline (the first Llama config).
"""

import argparse
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from models.export import write_json
from tools import cli as shared  # its import of models registers opt-llama
from tools.cli import ArgumentParser, check_output_dir, check_range, run_cli
from tools.measure import baseline_name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["configs/tinyllama.json", "configs/tinyllama_opt.json", "configs/tinyllama_opt_w4.json"],
        help="model configs; the first Llama (model_type llama) is the baseline of the ratios",
    )
    parser.add_argument(
        "--seq_len", type=int, default=2048, help="tokens per sequence (batch 1; work scales with batch)"
    )
    parser.add_argument("--output_dir", default="bench/results/flops", help="where flops.json goes")
    args = parser.parse_args(argv)
    check_range("--seq_len", args.seq_len, minimum=1)
    check_output_dir("--output_dir", args.output_dir)
    for path in args.configs:
        shared.load_config("--configs", path)
    return args


def count_flops(config_path: str, seq_len: int) -> dict:
    """TFLOPs of a prefill (no grad, logits of the last token) and a training step (forward + backward)."""
    config = shared.load_config("--configs", config_path)
    config.max_position_embeddings = max(config.max_position_embeddings, seq_len)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as prefill:
        model.eval()(ids, logits_to_keep=1)
    with FlopCounterMode(display=False) as train:
        model.train()(input_ids=ids, labels=ids).loss.backward()
    return {
        "model_type": config.model_type,
        "prefill_tflop": prefill.get_total_flops() / 1e12,
        "train_step_tflop": train.get_total_flops() / 1e12,
    }


def main(argv: list[str] | None = None) -> dict:
    """The command line; bad input ends the process with one line on stderr and exit status 2."""
    return run_cli(count, argv, prog="bench_flops")


def count(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = {Path(c).stem: count_flops(c, args.seq_len) for c in tqdm(args.configs, desc="counting FLOPs")}
    baseline = baseline_name(results)
    for r in results.values():
        for key in ("prefill_tflop", "train_step_tflop"):
            r[key.replace("tflop", "vs_baseline")] = r[key] / results[baseline][key]
    out = {"seq_len": args.seq_len, "batch": 1, "baseline": baseline, "models": results}
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "flops.json", out)
    for name, r in results.items():
        print(
            f"{name}: prefill {r['prefill_tflop']:.3f} TFLOP ({r['prefill_vs_baseline']:.2f}x), "
            f"train step {r['train_step_tflop']:.3f} TFLOP ({r['train_step_vs_baseline']:.2f}x)"
        )
    return out


if __name__ == "__main__":
    main()
