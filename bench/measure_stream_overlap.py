"""Whether one half-batch's matrix products and the other half's split-KV attention overlap on two CUDA streams.

    python -m bench.measure_stream_overlap --output_dir bench/results/stream_overlap_h200     # GPU, bf16
    python -m bench.measure_stream_overlap --smoke --output_dir /tmp/overlap                  # CPU: same code

A large-batch prefill token step (TinyLlama, batch 4096) spends about 10 ms in cuBLAS products at 0.8 of the peak
matrix rate and 5-40 ms in attention at the copy rate, one after the other. Splitting the batch in two halves whose
layers run half a layer apart would let one half's products (compute-bound) run beside the other half's attention
(bandwidth-bound). This measures the pair that would overlap, per layer of ``--config``: ``--rows`` rows through a
condensed layer's products (Q, O, gate/up, down) and the split-KV attention of ``--rows`` other rows over
``--context`` filled slots, each alone, one after the other on one stream, and on two streams at once; the last also
with cuBLAS kept off ``--carveouts`` multiprocessors (``torch._C._set_sm_carveout_experimental``) and through
cuBLASLt, and with the products on a stream of the highest priority. ``overlap_gain`` = (products + attention) /
both at once: 1 is no overlap, the best is ``(products + attention) / max(products, attention)``;
``overlap_gain_vs_carved_products`` divides the carved-out products' own time plus the attention instead. Each
variant runs ``--layers`` layers in one CUDA graph, timed as the kernel tuners time (bench/kernel_tuning.py). Writes
``<output_dir>/stream_overlap.json``.
"""

import argparse
import contextlib
from collections.abc import Callable
from pathlib import Path

import torch

from bench.kernel_tuning import input_copies, time_ms, tuning_device
from models.export import write_json
from models.kernels.decode_attention import load_split_kv_kernel, split_kv_decode_attention
from tools import cli as shared
from tools.cli import ArgumentParser, check_output_dir, check_range, run_cli

HIGHEST_PRIORITY = -(2**10)  # CUDA maps a priority past its range to the range's end: here the highest
SMOKE = dict(rows=4, context=24, layers=2)  # --smoke: a tiny pair through the same code (Triton's interpreter)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tinyllama_opt.json", help="model config whose layer shapes are used")
    p.add_argument("--rows", type=int, default=2048, help="rows of each half: the products' and the attention's")
    p.add_argument("--context", type=int, default=1024, help="filled KV slots the attention reads per row")
    p.add_argument("--layers", type=int, default=22, help="layers per timed CUDA graph")
    p.add_argument(
        "--carveouts", default="0,32,66", help="comma-separated multiprocessors kept from cuBLAS in the overlapped run"
    )
    p.add_argument("--warmup_ms", type=float, default=100.0, help="do_bench warm-up per variant")
    p.add_argument("--rep_ms", type=float, default=500.0, help="do_bench timed span per variant")
    p.add_argument("--smoke", action="store_true", help=f"tiny shapes {SMOKE} on the CPU, float32")
    p.add_argument("--output_dir", default="bench/results/stream_overlap", help="where stream_overlap.json goes")
    args = p.parse_args(argv)
    for flag in ("rows", "context", "layers"):
        check_range(f"--{flag}", getattr(args, flag), minimum=1)
    args.carveouts = shared.parse_int_list("--carveouts", args.carveouts, minimum=0)
    args.config_obj = shared.load_config("--config", args.config)
    check_output_dir("--output_dir", args.output_dir)
    if args.smoke:
        vars(args).update(SMOKE)
    return args


class OverlapPair:
    """One condensed layer's products on ``rows`` rows and the split-KV attention of ``rows`` other rows, with enough
    weight copies that each layer reads its weights from HBM; the attention's KV (larger than the L2) is shared."""

    def __init__(self, config, rows: int, context: int, device: torch.device, dtype: torch.dtype):
        hidden, inner = config.hidden_size, config.intermediate_size
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        shapes = [(hidden, heads * head_dim), (heads * head_dim, hidden), (2 * inner, hidden), (hidden, inner)]

        def weights() -> list[torch.Tensor]:  # (out, in) each, scaled so products stay about 1
            return [torch.randn(n, k, device=device, dtype=dtype) / k**0.5 for n, k in shapes]

        layer_bytes = sum(n * k for n, k in shapes) * dtype.itemsize
        l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
        self.layer_weights = [weights() for _ in range(input_copies(layer_bytes, l2) if l2 else 1)]
        self.x = torch.randn(rows, hidden, device=device, dtype=dtype)
        self.query = torch.randn(rows, heads, 1, head_dim, device=device, dtype=dtype)
        self.keys, self.values = (
            torch.randn(rows, kv_heads, context, head_dim, device=device, dtype=dtype) for _ in range(2)
        )
        self.kernel = load_split_kv_kernel()
        self.inner = inner
        self.flops = 2 * rows * sum(n * k for n, k in shapes)
        self.kv_bytes = 2 * self.keys.numel() * dtype.itemsize

    def products(self, layer: int) -> torch.Tensor:
        q_w, o_w, gate_up_w, down_w = self.layer_weights[layer % len(self.layer_weights)]
        queries = self.x @ q_w.T
        gate_up = self.x @ gate_up_w.T
        return (queries @ o_w.T) + (gate_up[:, : self.inner] @ down_w.T)

    def attention(self) -> torch.Tensor:
        return split_kv_decode_attention(self.kernel.run, self.query, self.keys, self.values, None, None)


def streams(device: torch.device, priority: int = 0) -> tuple[Callable, Callable]:
    """``(fork, join)`` for running work beside the current stream: on CUDA a side stream of ``priority`` (lower runs
    first where both have work waiting) that first waits for the current one, and the current one waiting for it at
    the join; on a CPU, no streams (the same calls, in order)."""
    if device.type != "cuda":
        return contextlib.nullcontext, lambda: None
    side = torch.cuda.Stream(device, priority=priority)

    @contextlib.contextmanager
    def fork():
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            yield

    return fork, lambda: torch.cuda.current_stream(device).wait_stream(side)


def variants(pair: OverlapPair, layers: int, device: torch.device) -> dict[str, Callable[[], None]]:
    """The timed calls, each ``layers`` layers: products alone, attention alone, both on one stream, both at once, and
    both at once with the products on a stream of the highest priority (the block scheduler then hands them each
    multiprocessor an attention program leaves)."""
    fork, join = streams(device)
    high_fork, high_join = streams(device, priority=HIGHEST_PRIORITY)

    def products():
        for layer in range(layers):
            pair.products(layer)

    def attention():
        for _ in range(layers):
            pair.attention()

    def one_stream():
        for layer in range(layers):
            pair.products(layer)
            pair.attention()

    def two_streams():
        for layer in range(layers):
            with fork():
                pair.attention()
            pair.products(layer)
            join()

    def two_streams_products_first():
        for layer in range(layers):
            with high_fork():
                pair.products(layer)
            pair.attention()
            high_join()

    return {
        "products": products,
        "attention": attention,
        "one_stream": one_stream,
        "two_streams": two_streams,
        "two_streams_products_first": two_streams_products_first,
    }


@contextlib.contextmanager
def blas_setting(carveout: int, library: str):
    """cuBLAS kept off ``carveout`` multiprocessors and ``library`` preferred, restored afterwards."""
    previous_carveout = torch._C._get_sm_carveout_experimental()
    previous_library = torch.backends.cuda.preferred_blas_library()
    try:
        torch._C._set_sm_carveout_experimental(carveout or None)
        torch.backends.cuda.preferred_blas_library(library)
        yield
    finally:
        torch._C._set_sm_carveout_experimental(previous_carveout)
        torch.backends.cuda.preferred_blas_library(previous_library)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, dtype = tuning_device(args.smoke)
    pair = OverlapPair(args.config_obj, args.rows, args.context, device, dtype)
    calls = variants(pair, args.layers, device)

    def per_layer_ms(name: str) -> float:
        return time_ms([calls[name]], device.type, args.warmup_ms, args.rep_ms) / args.layers

    result = {name: per_layer_ms(name) for name in calls}
    settings = [(c, lib) for lib in ("cublas", "cublaslt") for c in args.carveouts if (c, lib) != (0, "cublas")]
    carved = []
    for carveout, library in settings if device.type == "cuda" else []:
        with blas_setting(carveout, library):
            key = f"{library}_carveout_{carveout}"
            carved.append(key)
            result[f"products_{key}"] = per_layer_ms("products")
            result[f"two_streams_{key}"] = per_layer_ms("two_streams")
    alone = result["products"] + result["attention"]
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": args.config,
        "rows": args.rows,
        "context": args.context,
        "layers": args.layers,
        "dtype": str(dtype).removeprefix("torch."),
        "ms_per_layer": result,
        "products_tflops": pair.flops / result["products"] / 1e9,
        "attention_tb_per_s": pair.kv_bytes / result["attention"] / 1e9,
        "best_possible_gain": alone / max(result["products"], result["attention"]),
        "overlap_gain": {
            "default": alone / result["two_streams"],
            "products_first": alone / result["two_streams_products_first"],
            **{key: alone / result[f"two_streams_{key}"] for key in carved},
        },
        # Against the products as slowed by the carveout: what overlapping won back of the carved-out pair.
        "overlap_gain_vs_carved_products": {
            key: (result[f"products_{key}"] + result["attention"]) / result[f"two_streams_{key}"] for key in carved
        },
    }
    for key, value in report.items():
        print(f"{key}: {value}")
    path = Path(args.output_dir) / "stream_overlap.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, report)
    return report


if __name__ == "__main__":
    run_cli(main)
