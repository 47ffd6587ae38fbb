"""Training tokens/s and peak memory with the LCKV_* kernel flags: all off, each alone, all on.

    python -m bench.bench_kernels --output_dir bench/results

Random bf16 weights at TinyLlama shape, AdamW steps on random tokens at a fixed batch and block size.
A Llama config (configs/tinyllama.json) runs as opt-llama with every layer standard, which computes the
same function as LlamaForCausalLM (tested) and lets the flags apply. Writes ``kernels.json`` and
``kernels.png`` under ``--output_dir``.
"""

import argparse
import gc
import json
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from models import OptLlamaConfig
from models.export import write_json
from models.kernels import FLAGS, KernelSelection
from tools import cli as shared
from tools.cli import ArgumentParser, check_output_dir, check_range, run_cli
from tools.measure import synchronize


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["configs/tinyllama_opt.json", "configs/tinyllama.json"],
        help="model configs (opt-llama or llama json)",
    )
    parser.add_argument("--batch_size", type=int, default=4, help="sequences per step")
    parser.add_argument("--block_size", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (Triton compilation, allocator)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per flag set")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="weights dtype")
    parser.add_argument("--device", default="cuda", help="torch device")
    parser.add_argument("--output_dir", default="bench/results", help="where kernels.json and kernels.png go")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "block_size", "steps"):
        check_range(f"--{flag}", getattr(args, flag), minimum=1)
    check_range("--warmup", args.warmup, minimum=0)
    args.device = shared.resolve_device(args.device)
    check_output_dir("--output_dir", args.output_dir)
    for path in args.configs:
        shared.load_opt_llama_config("--configs", path)
    return args


def flag_sets() -> list[tuple[str, dict[str, str]]]:
    """(name, environment) pairs: all off, each flag alone, all on."""
    off = dict.fromkeys(FLAGS, "0")
    return [("off", off), *((flag, {**off, flag: "1"}) for flag in FLAGS), ("all", dict.fromkeys(FLAGS, "1"))]


def selected_kernels(selection: KernelSelection) -> dict[str, str | None]:
    """Which implementation each flag actually got (fallbacks included)."""

    def name(obj) -> str | None:
        return None if obj is None else obj.__name__

    return {
        "rms_norm": name(selection.rms_norm),
        "swiglu": name(selection.swiglu_mlp),
        "rotary": name(selection.apply_rotary_pos_emb),
        "cross_entropy": name(selection.fused_linear_cross_entropy),
        "attention": name(selection.causal_attention),
    }


def run(config: OptLlamaConfig, environ: dict[str, str], args, device: torch.device) -> dict:
    """Build the model with ``environ``'s flags and time ``args.steps`` training steps after ``args.warmup``."""
    selection = KernelSelection.from_environ(environ)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, args.dtype), attn_implementation="sdpa", kernel_selection=selection
        )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tokens = torch.randint(3, config.vocab_size, (args.batch_size, args.block_size), device=device)

    def step() -> float:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    result = {"kernels": selected_kernels(selection)}
    try:
        for _ in range(args.warmup):
            step()
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        losses = [step() for _ in range(args.steps)]
        synchronize(device)
        elapsed = time.perf_counter() - start
        result.update(
            tokens_per_s=args.steps * tokens.numel() / elapsed,
            step_s=elapsed / args.steps,
            first_loss=losses[0],
            peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        )
    except torch.OutOfMemoryError:
        result["oom"] = True
    return result


def free_memory(device: torch.device) -> None:
    """Return the finished run's memory so the next run's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def plot(results: list[dict], path: Path) -> None:
    """Per flag set, one bar per config: tokens/s relative to all flags off, and peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in results))
    names = list(dict.fromkeys(r["flags"] for r in results))
    fig, (speed_ax, memory_ax) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(configs)
    for i, config in enumerate(configs):
        rows = {r["flags"]: r for r in results if r["config"] == config}
        base = rows["off"].get("tokens_per_s")
        positions = [j + i * width for j in range(len(names))]
        speed_ax.bar(
            positions, [rows[n].get("tokens_per_s", 0) / base if base else 0 for n in names], width, label=config
        )
        memory_ax.bar(positions, [rows[n].get("peak_memory_gib") or 0 for n in names], width, label=config)
    labels = [n.removeprefix("LCKV_").removeprefix("FUSED_").lower() for n in names]
    for ax, ylabel in ((speed_ax, "training tokens/s vs all off"), (memory_ax, "peak memory (GiB)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], labels, rotation=30)
        ax.set_ylabel(ylabel)
        ax.legend()
    speed_ax.axhline(1.0, color="gray", lw=0.5)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> list[dict]:
    """The command line; bad input ends the process with one line on stderr and exit status 2."""
    return run_cli(measure_flags, argv, prog="bench_kernels")


def measure_flags(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    results = []
    runs = [(path, name, environ) for path in args.configs for name, environ in flag_sets()]
    for path, name, environ in tqdm(runs, desc="kernel flags"):
        result = run(shared.load_opt_llama_config("--configs", path), environ, args, device)
        free_memory(device)
        results.append({"config": Path(path).stem, "flags": name, **result})
        tqdm.write(json.dumps(results[-1]))

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    setup = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "liger_kernel": package_version("liger-kernel"),
        "flash_attn": package_version("flash-attn"),
        **{k: getattr(args, k) for k in ("batch_size", "block_size", "warmup", "steps", "dtype")},
    }
    write_json(output_dir / "kernels.json", {"setup": setup, "results": results})
    plot(results, output_dir / "kernels.png")
    return results


if __name__ == "__main__":
    main()
