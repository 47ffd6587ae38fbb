"""The exact (token-by-token) forward where users run it: ``test_harness.py --sequential`` (lm-eval's
loglikelihoods), ``run_clm.py --eval_sequential`` and ``sequential_forward`` generally call the model on whole
sequences without a cache. LCKV's variants and a Llama of the same shape in one process.

    python -m bench.measure_exact_forward --output_dir /tmp/exact_forward                      # CPU, tiny configs
    python -m bench.measure_exact_forward --device cuda --configs configs/tinyllama_opt.json \\
        --llama configs/tinyllama.json --shapes 1x2048 8x512 32x256 --output_dir bench/results/exact_forward_h200

Per ``BxT`` shape (``--shapes``): ms per ``model(ids)`` under ``no_grad``, as lm-eval calls it, for

- ``exact``: ``sequential_forward=True``; the forward runs into a static scratch cache the model keeps, the cyclic
  block token by token (its step compiled and captured on CUDA), the layers below and above it over segments of
  ``MASK_CHUNK`` tokens (``models/sequential_prefill.py``);
- ``exact_every_layer_per_token``: the same with every layer in the token step (``SEGMENT_ATTENTION_BYTES = 0``, as at
  a batch too large for the segments);
- ``exact_dynamic_eager``: the path before the scratch cache: a dynamic cache, every layer in eager token steps;
- ``iterative``: the default forward (exact only for the first ``num_encoders + 1`` tokens);
- ``llama``: the Llama's forward (``--llama``), the parallel baseline.

Each variant runs ``--warmup`` untimed forwards (compilation, graph capture), then ``--repeats`` timed ones (median);
``graphs_compiled_while_timed`` counts dynamo graphs compiled during the timed ones (0: nothing recompiled). Writes
``exact_forward.json`` with the ratios to ``exact``'s time and to the Llama's.
"""

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from unittest import mock

import torch

import models  # noqa: F401  (registers opt-llama and the attention backends)
from models import sequential_prefill
from models.export import write_json
from tools.cli import run_cli
from tools.measure import build_random_model, load_config_for_length, synchronize

# variant -> (config.sequential_forward, what the forward runs under)
VARIANTS: dict[str, tuple[bool, Callable[[], AbstractContextManager]]] = {
    "exact": (True, nullcontext),
    "exact_every_layer_per_token": (True, lambda: mock.patch.object(sequential_prefill, "SEGMENT_ATTENTION_BYTES", 0)),
    "exact_dynamic_eager": (True, lambda: mock.patch.object(sequential_prefill, "scratch_cache", lambda *a: None)),
    "iterative": (False, nullcontext),
}


def parse_shape(text: str) -> tuple[int, int]:
    """``"8x512"`` -> ``(8, 512)``: batch x tokens."""
    parts = text.split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: allowed is BATCHxTOKENS with positive integers, e.g. 8x512")
    return int(parts[0]), int(parts[1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["configs/llama_tiny_opt.json"], help="LCKV model configs")
    p.add_argument("--llama", default="configs/llama_tiny.json", help="the Llama config of the same shape")
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=[(2, 40)], help="BATCHxTOKENS per forward")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per variant (compile, capture)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per variant (the median is reported)")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=[*VARIANTS, "llama"],
        default=[*VARIANTS, "llama"],
        help="what to time (default all; ratios need exact and llama)",
    )
    p.add_argument("--attn", default="sdpa_split_kv", help="attn_implementation of every model")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--output_dir", default="bench/results/exact_forward")
    args = p.parse_args(argv)
    for name in ("warmup", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: allowed are integers >= 1")
    return args


def unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def time_forwards(model, ids: torch.Tensor, args) -> dict:
    """Median ms of ``model(ids)`` after ``--warmup`` calls, and the graphs compiled while timing."""
    with torch.no_grad():
        for _ in range(args.warmup):
            model(ids)
        graphs = unique_graphs()
        times = []
        for _ in range(args.repeats):
            synchronize(ids.device)
            start = time.perf_counter()
            model(ids)
            synchronize(ids.device)
            times.append(1e3 * (time.perf_counter() - start))
    ms = statistics.median(times)
    return {
        "ms": ms,
        "ms_all": times,
        "tokens_per_s": ids.numel() / ms * 1e3,
        "graphs_compiled_while_timed": unique_graphs() - graphs,
    }


def build(path: str, length: int, args):
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    return build_random_model(load_config_for_length(path, length), dtype, args.device, args.attn)


def measure(path: str, batch: int, length: int, args) -> dict:
    """One shape's variants of the LCKV model of ``path`` and the Llama's forward."""
    model, llama = build(path, length, args), build(args.llama, length, args)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), device=model.device)
    row = {"config": path, "batch": batch, "tokens": length, "variants": {}}
    for name in args.variants:
        sequential, context = VARIANTS.get(name, (False, nullcontext))
        model.config.sequential_forward = sequential
        start = time.perf_counter()
        with context():
            row["variants"][name] = time_forwards(llama if name == "llama" else model, ids, args)
        row["variants"][name]["seconds_with_warmup"] = time.perf_counter() - start
        print(f"{path} {batch}x{length} {name}: {row['variants'][name]['ms']:.1f} ms", flush=True)
    if "exact" in row["variants"]:
        exact = row["variants"]["exact"]["ms"]
        row["vs_exact"] = {name: v["ms"] / exact for name, v in row["variants"].items()}
        if "llama" in row["variants"]:
            row["exact_vs_llama"] = exact / row["variants"]["llama"]["ms"]
    return row


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    setting = {k: getattr(args, k) for k in ("llama", "warmup", "repeats", "attn", "device")}
    setting["device_name"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    setting["torch"], setting["mask_chunk"] = torch.__version__, sequential_prefill.MASK_CHUNK
    out = {"setting": setting, "runs": []}
    for path in args.configs:
        for batch, length in args.shapes:
            out["runs"].append(measure(path, batch, length, args))
            # rewritten after every shape, whole: a run stopped by a time limit keeps the shapes it finished
            write_json(out_dir / "exact_forward.json", out)
    for row in out["runs"]:
        ratios = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in row.get("vs_exact", {}).items())
        print(f"{row['config']} {row['batch']}x{row['tokens']}: against exact's time: {ratios}")
    print(f"written: {out_dir / 'exact_forward.json'}")
    return out


if __name__ == "__main__":
    run_cli(main, prog="measure_exact_forward")  # a usage error: one line, exit status 2
