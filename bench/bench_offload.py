"""Offloaded vs GPU-resident KV cache: peak memory, resident KV bytes and decode ms/step, LCKV vs Llama.

    python -m bench.bench_offload --output_dir bench/results

Random bf16 weights at TinyLlama shape (configs/tinyllama.json and tinyllama_opt.json), greedy decoding
of a fixed number of tokens after a long prompt, through ``generate(cache_implementation=...)``.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from models.export import write_json
from tools import cli as shared  # its import of models registers opt-llama
from tools.cli import ArgumentParser, check_output_dir, check_range, run_cli
from tools.measure import StepTimer


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["configs/tinyllama.json", "configs/tinyllama_opt.json"],
        help="model configs to compare",
    )
    parser.add_argument("--prompt_len", type=int, default=8192, help="prompt tokens per sequence")
    parser.add_argument("--gen_len", type=int, default=256, help="new tokens per sequence")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16], help="batch sizes to run")
    parser.add_argument(
        "--modes", nargs="+", default=["dynamic", "offloaded"], help="cache_implementation values to compare"
    )
    parser.add_argument("--output_dir", default="bench/results", help="where offload.json is written")
    parser.add_argument(
        "--device", default="cuda", help="torch device (offloaded modes need cuda; cpu only smoke-tests)"
    )
    args = parser.parse_args(argv)
    for flag in ("prompt_len", "gen_len"):
        check_range(f"--{flag}", getattr(args, flag), minimum=1)
    for batch in args.batch_sizes:
        check_range("--batch_sizes", batch, minimum=1)
    shared.check_choices("--modes", args.modes, ["dynamic", "static", "offloaded", "offloaded_static"])
    args.device = shared.resolve_device(args.device)
    check_output_dir("--output_dir", args.output_dir)
    for path in args.configs:
        shared.load_config("--configs", path)
    return args


def cuda_kv_bytes(cache) -> int:
    """Bytes of cached keys/values that sit on the GPU right now."""
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        if getattr(layer, "keys", None) is not None
        for t in (layer.keys, layer.values)
        if t.is_cuda
    )


def timed_generate(model, ids: torch.Tensor, new_tokens: int, mode: str) -> tuple[object, float, float]:
    """Greedy ``generate`` of ``new_tokens``; (output, prefill seconds, decode ms per step), both from one run.

    Per-token timestamps (a synchronising streamer) split prefill from decoding inside the same call, rather than
    subtracting a separate prefill-only run, whose own variance would leak into the per-step time.
    """
    if ids.is_cuda:
        torch.cuda.synchronize(ids.device)
    with tqdm(total=new_tokens, desc=f"{mode} b={ids.shape[0]}", leave=False) as bar:
        timer = StepTimer(bar)
        start = time.perf_counter()
        out = model.generate(
            ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            cache_implementation=mode,
            return_dict_in_generate=True,
            streamer=timer,
        )
    times = timer.times  # [prompt, token 1 (after prefill), ..., token new_tokens]
    return out, times[1] - start, 1e3 * (times[-1] - times[1]) / (len(times) - 2)


def run_one(model, config, batch: int, args, mode: str) -> dict:
    ids = torch.randint(3, config.vocab_size, (batch, args.prompt_len), device=model.device)
    cuda = model.device.type == "cuda"
    try:
        timed_generate(model, ids, min(8, args.gen_len), mode)  # warm-up: kernels, allocator, mask paths of this shape
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        out, prefill_s, step_ms = timed_generate(model, ids, args.gen_len, mode)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"batch": batch, "mode": mode, "oom": True}
    result = {
        "batch": batch,
        "mode": mode,
        "oom": False,
        "prefill_s": prefill_s,
        "decode_ms_per_step": step_ms,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "gpu_resident_kv_mib": cuda_kv_bytes(out.cache) / 2**20,
    }
    del out
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> dict:
    """The command line; bad input ends the process with one line on stderr and exit status 2."""
    return run_cli(compare, argv, prog="bench_offload")


def compare(argv=None) -> dict:
    args = parse_args(argv)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    results = {"device": device_name, "prompt_len": args.prompt_len, "gen_len": args.gen_len, "runs": {}}
    jobs = [(c, b, m) for c in args.configs for b in args.batch_sizes for m in args.modes]
    bar = tqdm(jobs, desc="offload bench")
    model, loaded = None, None
    for config_path, batch, mode in bar:
        if loaded != config_path:
            config = shared.load_config(
                "--configs", config_path, {"max_position_embeddings": args.prompt_len + args.gen_len}
            )
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
            model = model.to(args.device).eval()
            loaded = config_path
        bar.set_postfix(config=Path(config_path).stem, batch=batch, mode=mode)
        with torch.no_grad():
            run = run_one(model, config, batch, args, mode)
        results["runs"].setdefault(Path(config_path).stem, []).append(run)
        tqdm.write(json.dumps({"config": Path(config_path).stem, **run}))
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "offload.json", results)
    return results


if __name__ == "__main__":
    main()
