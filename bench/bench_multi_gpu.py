"""Multi-GPU training throughput: tokens/s on 1 GPU, N GPUs with DDP and N GPUs with FSDP2, same per-GPU batch.

    python -m bench.bench_multi_gpu --output_dir bench/results            # 2x GPU box, ~3 minutes
    python -m bench.bench_multi_gpu --cpu --config configs/test_tiny_opt.json --batch_size 2 --block_size 32 \\
        --output_dir /tmp/mg                                              # CPU smoke test (gloo, no FSDP)

The parent process launches one worker per setting (``python -m bench.bench_multi_gpu --worker ...`` for one
device, ``accelerate launch --config_file configs/accelerate/{ddp,fsdp}.yaml`` for N) and writes
``multi_gpu.json`` under ``--output_dir``: global tokens/s, step time, peak memory and the scaling efficiency
``tokens/s(N) / (N * tokens/s(1))``. Each worker trains a freshly initialised model (AdamW, bf16 mixed precision)
on random tokens: no hub, no ``datasets``. The FSDP worker then gathers the full state dict, saves it as
safetensors in a temporary directory and reloads it on one device (logits and greedy tokens vs the sharded model).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from models.export import write_json
from tools import cli as shared  # its import of models registers opt-llama
from tools.cli import ArgumentParser, check_output_dir, check_range, run_cli
from tools.measure import synchronize

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (shared by the parent and its workers)."""
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tinyllama_opt.json", help="model config json")
    parser.add_argument("--batch_size", type=int, default=4, help="sequences per GPU per step")
    parser.add_argument("--block_size", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--num_gpus", type=int, default=2, help="processes of the multi-GPU runs")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["single", "ddp", "fsdp"],
        choices=["single", "ddp", "fsdp"],
        help="settings to run, in order",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="smoke test on CPU processes (gloo, fp32; FSDP skipped: accelerate enables it only on GPUs)",
    )
    parser.add_argument("--output_dir", default="bench/results", help="where multi_gpu.json goes")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: result json of one worker
    parser.add_argument("--mode", default="single", help=argparse.SUPPRESS)  # internal: the worker's setting
    args = parser.parse_args(argv)
    for flag in ("batch_size", "block_size", "steps", "num_gpus"):
        check_range(f"--{flag}", getattr(args, flag), minimum=1)
    check_range("--warmup", args.warmup, minimum=0)
    check_output_dir("--output_dir", args.output_dir)
    shared.load_config("--config", args.config)
    return args


# ----------------------------------------------------------------------------- worker (one process of one setting)


def check_checkpoint(accelerator, model, tokens: torch.Tensor) -> dict | None:
    """Save the sharded model's full state dict as safetensors, reload it on one device, compare (main process)."""
    from transformers import AutoModelForCausalLM

    model.eval()
    prompt = tokens[:1, :16]
    with torch.no_grad():
        sharded_logits = model(input_ids=prompt, use_cache=False).logits.float()
    state = accelerator.get_state_dict(model)  # collective: every rank takes part
    if not accelerator.is_main_process:
        return None
    with tempfile.TemporaryDirectory() as path:
        accelerator.unwrap_model(model).save_pretrained(path, state_dict=state)
        files = sorted(p.name for p in Path(path).iterdir())
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(accelerator.device).eval()
    with torch.no_grad():
        logits = loaded(input_ids=prompt, use_cache=False).logits.float()
        generated = loaded.generate(prompt, max_new_tokens=8, do_sample=False)
    return {
        "files": files,
        "max_abs_logit_diff_vs_sharded_bf16": (logits - sharded_logits).abs().max().item(),
        "same_argmax_fraction": (logits.argmax(-1) == sharded_logits.argmax(-1)).float().mean().item(),
        "generated_tokens": generated.shape[1] - prompt.shape[1],
    }


def worker(args: argparse.Namespace) -> None:
    """Train ``warmup + steps`` steps in this process's setting; the main process writes the result json."""
    from accelerate import Accelerator
    from transformers import AutoConfig, AutoModelForCausalLM

    import models  # noqa: F401  (registers opt-llama)

    accelerator = Accelerator(mixed_precision="no" if args.cpu else "bf16", cpu=args.cpu)
    device = accelerator.device
    config = AutoConfig.from_pretrained(args.config)
    torch.manual_seed(0)  # identical initial weights on every rank
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    generator = torch.Generator(device).manual_seed(accelerator.process_index)
    tokens = torch.randint(0, config.vocab_size, (args.batch_size, args.block_size), device=device, generator=generator)
    step_times, losses = [], []
    for step in range(args.warmup + args.steps):
        synchronize(device)
        start = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= args.warmup:
            step_times.append(time.perf_counter() - start)
            losses.append(loss.item())

    world = accelerator.num_processes
    step_time = sum(step_times) / len(step_times)
    result = {
        "mode": args.mode,
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": world,
        "tokens_per_step": world * args.batch_size * args.block_size,
        "step_time_s": step_time,
        "step_times_s": step_times,
        "tokens_per_s": world * args.batch_size * args.block_size / step_time,
        "peak_memory_gib_rank0": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "losses": losses,
    }
    if args.mode == "fsdp":
        result["checkpoint"] = check_checkpoint(accelerator, model, tokens)
    if accelerator.is_main_process:
        write_json(Path(args.worker), result)
    accelerator.wait_for_everyone()
    accelerator.end_training()


# ----------------------------------------------------------------------------- parent (launches and collects)


def launch_command(mode: str, args: argparse.Namespace) -> list[str]:
    """The launcher prefix of one setting: a plain process, torchrun (CPU) or accelerate launch with our yaml."""
    if mode == "single":
        return [sys.executable, "-m"]
    if args.cpu:  # accelerate's --cpu runs one process; torchrun + Accelerator(cpu=True) gives gloo MULTI_CPU
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.num_gpus), "-m"]
    config = ACCELERATE_CONFIGS / f"{mode}.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", str(args.num_gpus), "-m"]  # fmt: skip


def worker_flags(args: argparse.Namespace) -> list[str]:
    """The flags every worker gets from the parent."""
    flags = ["--config", args.config, "--batch_size", str(args.batch_size), "--block_size", str(args.block_size),
             "--warmup", str(args.warmup), "--steps", str(args.steps)]  # fmt: skip
    return flags + (["--cpu"] if args.cpu else [])


def run_mode(mode: str, args: argparse.Namespace, output_dir: Path) -> dict:
    """Launch one setting and return its result (or the reason it has none)."""
    if mode == "fsdp" and args.cpu:
        return {
            "mode": mode,
            "skipped": "accelerate enables FSDP only on GPUs (tests/test_distributed.py covers "
            "FSDP2 on CPU with fully_shard directly)",
        }
    result_path = output_dir / f"multi_gpu_{mode}.json"
    result_path.unlink(missing_ok=True)
    cmd = launch_command(mode, args) + ["bench.bench_multi_gpu", "--worker", str(result_path), "--mode", mode]
    cmd += worker_flags(args)
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not result_path.exists():
        return {"mode": mode, "error": f"exit status {proc.returncode}", "wall_s": wall}
    return {**json.loads(result_path.read_text()), "wall_s": wall}


def main(argv: list[str] | None = None) -> dict:
    """The command line; bad input ends the process with one line on stderr and exit status 2."""
    return run_cli(run_settings, argv, prog="bench_multi_gpu")


def run_settings(argv: list[str] | None = None) -> dict:
    """Run every setting in ``--modes`` and write ``multi_gpu.json`` with the scaling efficiencies."""
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    runs = {mode: run_mode(mode, args, output_dir) for mode in args.modes}
    single = runs.get("single", {}).get("tokens_per_s")
    scaling = {
        mode: run["tokens_per_s"] / (run["num_processes"] * single)
        for mode, run in runs.items()
        if mode != "single" and single and "tokens_per_s" in run
    }
    report = {
        "config": args.config,
        "per_device_batch": [args.batch_size, args.block_size],
        "warmup": args.warmup,
        "steps": args.steps,
        "device": "cpu" if args.cpu else (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None),
        "torch": torch.__version__,
        "runs": runs,
        "scaling_efficiency": scaling,
    }
    write_json(output_dir / "multi_gpu.json", report)
    for mode, run in runs.items():
        summary = (
            f"{run['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in run else run.get("error", run.get("skipped"))
        )
        print(f"{mode:>6}: {summary}" + (f", scaling efficiency {scaling[mode]:.2f}" if mode in scaling else ""))
    if any("error" in run for run in runs.values()):
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
