"""SDPA's backends one at a time at a model's attention shapes: run-to-run determinism, accuracy and time per call.

    python -m bench.measure_sdpa_determinism --output_dir bench/results/sdpa_determinism_h200   # GPU, bf16
    python -m bench.measure_sdpa_determinism --smoke --output_dir /tmp/sdpa                      # CPU: same code

On an H200 with torch 2.11+cu130, greedy bf16 generations of transformers' Llama parted from themselves while SDPA's
cuDNN backend was on, and never with it off (docs/performance.md, "KV cache offloading"). This measures the cause
where it lives. For each shape of ``--config``'s attention (a decode step: one query token over ``--contexts``
filled slots; a prefill: a causal prompt of ``--prompt_len`` tokens; at each of ``--batches``) and each backend
(``flash``, ``efficient``, ``cudnn``, ``math``, forced with ``torch.nn.attention.sdpa_kernel``) it records:

* ``deterministic``: whether ``--repeats`` calls on the same inputs gave bitwise the first call's output, and how
  many differed;
* ``max_abs_error``: the first output against SDPA's math backend in float32 on the same inputs;
* ``ms``: the median time of a call (``bench.kernel_tuning.time_ms``: CUDA-graph replays; wall time on a CPU);
* or ``error``: why the backend cannot run that shape here.

Writes ``<output_dir>/sdpa_determinism.json``.
"""

import argparse
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

from bench.kernel_tuning import time_ms, tuning_device
from models.export import write_json
from tools import cli as shared
from tools.cli import ArgumentParser, check_output_dir, check_range, one_line, run_cli

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
SMOKE = dict(
    batches=[2], contexts=[16], prefill_batches=[2], prompt_len=8, repeats=3
)  # --smoke: tiny shapes through the same code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tinyllama.json", help="model config whose attention shapes are used")
    p.add_argument("--batches", default="1,128", help="comma-separated batch sizes of the decode shapes")
    p.add_argument("--contexts", default="2048,4096", help="comma-separated filled slots a decode step reads")
    p.add_argument(
        "--prefill_batches",
        default="1,8",
        help="comma-separated batch sizes of the prefill shapes (the math backend holds their whole score matrix)",
    )
    p.add_argument("--prompt_len", type=int, default=2048, help="tokens of the causal prefill shape (0: none)")
    p.add_argument("--repeats", type=int, default=50, help="calls compared bitwise with the first, per shape")
    p.add_argument("--warmup_ms", type=float, default=50.0, help="do_bench warm-up per timing")
    p.add_argument("--rep_ms", type=float, default=200.0, help="do_bench timed span per timing")
    p.add_argument("--smoke", action="store_true", help=f"tiny shapes {SMOKE} on the CPU, float32")
    p.add_argument("--output_dir", default="bench/results/sdpa_determinism", help="where the JSON goes")
    args = p.parse_args(argv)
    args.batches = shared.parse_int_list("--batches", args.batches, minimum=1)
    args.contexts = shared.parse_int_list("--contexts", args.contexts, minimum=1)
    args.prefill_batches = shared.parse_int_list("--prefill_batches", args.prefill_batches, minimum=1)
    check_range("--prompt_len", args.prompt_len, minimum=0)
    check_range("--repeats", args.repeats, minimum=2)
    args.config_obj = shared.load_config("--config", args.config)
    check_output_dir("--output_dir", args.output_dir)
    if args.smoke:
        vars(args).update(SMOKE)
    return args


def attention_shapes(args: argparse.Namespace) -> list[dict]:
    """``{"kind", "batch", "queries", "keys"}`` per shape: decode steps (one query, ``--contexts`` keys), then causal
    prefills of ``--prompt_len`` tokens."""
    shapes = [dict(kind="decode", batch=b, queries=1, keys=s) for b in args.batches for s in args.contexts]
    if args.prompt_len:
        length = args.prompt_len
        shapes += [dict(kind="prefill", batch=b, queries=length, keys=length) for b in args.prefill_batches]
    return shapes


def inputs_of(config, shape: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Seeded query ``(B, Hq, T, D)`` and key / value ``(B, Hkv, S, D)`` of ``shape`` for ``config``'s heads."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    generator = torch.Generator(device="cpu").manual_seed(0)

    def draw(heads: int, length: int) -> torch.Tensor:
        return torch.randn(shape["batch"], heads, length, head_dim, generator=generator).to(device, dtype)

    kv_heads = config.num_key_value_heads
    return (
        draw(config.num_attention_heads, shape["queries"]),
        draw(kv_heads, shape["keys"]),
        draw(kv_heads, shape["keys"]),
    )


def attend(query, key, value, causal: bool) -> torch.Tensor:
    return scaled_dot_product_attention(query, key, value, is_causal=causal, enable_gqa=True)


def measure_backend(backend: str, inputs: tuple, causal: bool, reference: torch.Tensor, args) -> dict:
    """Determinism, error against ``reference`` and time of ``backend`` on ``inputs``; ``error`` where it cannot run."""

    def call() -> torch.Tensor:
        with sdpa_kernel([BACKENDS[backend]]):
            return attend(*inputs, causal)

    try:
        first = call()
    except RuntimeError as error:  # no kernel of this backend for the shape, dtype or device
        return {"error": one_line(error)[:300]}
    differing = sum(not torch.equal(call(), first) for _ in range(args.repeats - 1))
    result = {
        "deterministic": differing == 0,
        "differing_calls": differing,
        "max_abs_error": (first.float() - reference).abs().max().item(),
    }
    try:
        result["ms"] = time_ms([call], str(first.device), args.warmup_ms, args.rep_ms)
    except RuntimeError as error:  # e.g. a backend that cannot be captured in a CUDA graph
        result["timing_error"] = one_line(error)[:300]
    return result


def describe(result: dict) -> str:
    """One backend's result in a few words."""
    if "deterministic" not in result:
        return "-"
    if "ms" not in result:
        return "untimed" + ("" if result["deterministic"] else " NONDETERMINISTIC")
    spread = "" if result["deterministic"] else f" NONDETERMINISTIC ({result['differing_calls']} differed)"
    return f"{result['ms']:.3f} ms{spread}"


def main_run(args: argparse.Namespace) -> dict:
    device, dtype = tuning_device(args.smoke)
    rows = []
    for shape in attention_shapes(args):
        inputs = inputs_of(args.config_obj, shape, device, dtype)
        causal = shape["kind"] == "prefill"
        with sdpa_kernel([SDPBackend.MATH]):
            reference = attend(*(x.float() for x in inputs), causal)
        results = {name: measure_backend(name, inputs, causal, reference, args) for name in BACKENDS}
        rows.append(shape | {"backends": results})
        summary = ", ".join(f"{name} {describe(result)}" for name, result in results.items())
        print(f"{shape['kind']} batch {shape['batch']} keys {shape['keys']}: {summary}", flush=True)
        del inputs, reference
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "config": args.config,
        "repeats": args.repeats,
        "shapes": rows,
    }
    path = Path(args.output_dir) / "sdpa_determinism.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, out)
    print(f"written: {path}")
    return out


def main(argv: list[str] | None = None) -> dict:
    return run_cli(lambda argv: main_run(parse_args(argv)), argv, prog="python -m bench.measure_sdpa_determinism")


if __name__ == "__main__":
    main()
