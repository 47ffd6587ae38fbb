"""What dynamo's guard checks cost the captured decoding loop: host ms per token with every compiled call checked
against the loop's default, where calls after the first stop-check interval skip them (``models/fast_decode.py``).

    python -m bench.measure_guard_checks --output_dir bench/results/guard_checks_cpu          # CPU: the host alone
    python -m bench.measure_guard_checks --device cuda --configs configs/tinyllama_opt.json ... # a GPU

Per config: a random model (``build_random_model``), batch ``--batch``, greedy ``generate`` through the captured loop
with a static cache of a fixed size. A token's cost is the difference of a long and a short generation over their
difference in tokens, so the prefill and the set-up cancel; the two settings alternate, ``--repeats`` times each, and
the medians are reported, with the median of the paired differences (each repeat's two settings back to back). On a CPU
the compiled calls use dynamo's eager backend (as ``bench.profile_decode`` does), so every millisecond is the host's:
guards, Python, the eager kernels. On a GPU the step is the captured graph, and a host that finishes its work before the
GPU shows no difference. Writes ``guard_checks.json``.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import StaticCache

import models  # noqa: F401  (registers opt-llama and the attention backends)
from bench.profile_decode import compile_config  # generate's own on CUDA; dynamo's eager backend on a CPU
from models.export import write_json
from models.fast_decode import CHECKED_STEPS, DEFAULT_STOP_CHECK_INTERVAL
from tools.cli import run_cli
from tools.measure import build_random_model, load_config_for_length, synchronize

SETTINGS = {"checked": False, "skipped": True}  # name -> generation_config.skip_guard_checks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["configs/test_tiny_opt.json"], help="model configs to measure")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--prompt_len", type=int, default=8, help="prompt tokens")
    p.add_argument("--short", type=int, default=40, help="new tokens of the short generation")
    p.add_argument("--long", type=int, default=290, help="new tokens of the long generation")
    p.add_argument("--repeats", type=int, default=3, help="measurements of each setting, alternating")
    p.add_argument(
        "--stop_check_interval",
        type=int,
        default=DEFAULT_STOP_CHECK_INTERVAL,
        help="generation_config.stop_check_interval: the loop's first interval (and CHECKED_STEPS calls) runs every "
        "check, so --short must exceed both",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--threads", type=int, default=0, help="torch's CPU threads (0: its default); 1 times the host alone"
    )
    p.add_argument("--output_dir", default="bench/results/guard_checks")
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error(f"--threads {args.threads}: allowed are 0 (torch's default) and integers >= 1")
    for name in ("batch", "prompt_len", "short", "repeats", "stop_check_interval"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: allowed are integers >= 1")
    checked = max(args.stop_check_interval, CHECKED_STEPS) + 1  # the prefill's token, then the checked calls
    if args.short <= checked:
        p.error(f"--short {args.short}: allowed are more tokens than the {checked} generated before checks are skipped")
    if args.long <= args.short:
        p.error(f"--long {args.long}: allowed are more tokens than --short ({args.short})")
    return args


def generation_seconds(model, ids: torch.Tensor, new_tokens: int, slots: int) -> float:
    """Wall seconds of one greedy ``generate`` of ``new_tokens`` tokens through a new static cache of ``slots``."""
    cache = StaticCache(config=model.config, max_cache_len=slots)
    synchronize(ids.device)
    start = time.perf_counter()
    model.generate(
        ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, cache=cache
    )
    synchronize(ids.device)
    return time.perf_counter() - start


def measure(path: str, args) -> dict:
    """Median ms per token of each setting for the model of ``path``."""
    slots = args.prompt_len + args.long + 1
    config = load_config_for_length(path, slots)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    model = build_random_model(config, dtype, args.device, "sdpa")
    model.generation_config.compile_config = compile_config(args.device)
    model.generation_config.stop_check_interval = args.stop_check_interval
    ids = torch.randint(3, config.vocab_size, (args.batch, args.prompt_len), device=model.device)
    for _ in range(2):  # compile (and capture) the steps of both lengths
        generation_seconds(model, ids, args.short, slots)
    per_token: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for name, skip in SETTINGS.items():
            model.generation_config.skip_guard_checks = skip
            short = generation_seconds(model, ids, args.short, slots)
            long = generation_seconds(model, ids, args.long, slots)
            per_token[name].append(1e3 * (long - short) / (args.long - args.short))
    medians = {name: statistics.median(times) for name, times in per_token.items()}
    # Paired: each repeat measures both settings back to back, so a drift of the machine cancels in the difference.
    saved = [checked - skipped for checked, skipped in zip(per_token["checked"], per_token["skipped"], strict=True)]
    return {
        "config": path,
        "ms_per_token": medians,
        "ms_per_token_all": per_token,
        "saved_ms_per_token": statistics.median(saved),
        "skipped_faster_in": f"{sum(s > 0 for s in saved)} of {len(saved)} repeats",
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ("batch", "prompt_len", "short", "long", "repeats", "stop_check_interval", "device")
    setting = {k: getattr(args, k) for k in names}
    setting["device_name"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    setting["torch"], setting["threads"] = torch.__version__, torch.get_num_threads()
    out = {"setting": setting, "models": [measure(path, args) for path in args.configs]}
    write_json(out_dir / "guard_checks.json", out)
    for row in out["models"]:
        ms = row["ms_per_token"]
        print(
            f"{row['config']}: {ms['checked']:.3f} ms per token with every guard checked, {ms['skipped']:.3f} with "
            f"the checks skipped after the first interval (paired: {row['saved_ms_per_token']:.3f} ms saved, skipped "
            f"faster in {row['skipped_faster_in']})"
        )
    print(f"written: {out_dir / 'guard_checks.json'}")
    return out


if __name__ == "__main__":
    run_cli(main, prog="measure_guard_checks")  # a usage error: one line, exit status 2
