"""The linear layers of a decode step at a few dozen to a few hundred rows: cuBLAS (``F.linear``) against the skinny
GEMM of ``models/kernels/triton_skinny_gemm.py``, per weight shape of each config and per row count, as fractions of
the memory bandwidth; the launch table of the shapes where the GEMM wins.

    python -m bench.measure_skinny_gemm --configs configs/tinyllama.json configs/llama2_7b.json --rows 128 \\
        --apply --output_dir bench/results/skinny_gemm_h200            # GPU, bf16
    python -m bench.measure_skinny_gemm --smoke --output_dir /tmp/gemm   # CPU (Triton's interpreter)

Per shape ``(N, K)`` (the weights of the configs and their fused Q/K/V and gate/up matrices, as
bench/measure_small_batch_gemv.py lists them) and row count ``M``: milliseconds per call of cuBLAS and of every
launch of ``search_launches`` (the best kept), timed as the GEMV's tuner times (bench/kernel_tuning.py: calls captured
in one CUDA graph, each reading its weight from HBM). The table (``TUNED`` of models/kernels/skinny_gemm_launch.py:
per shape the best launch where it beats cuBLAS by ``--min_gain``, the unmeasured shapes' rows kept) is printed, and
written into that module with ``--apply``; ``SmallBatchLinear`` runs the GEMM for exactly those shapes. Writes
``<output_dir>/skinny_gemm.json``; prints one line per shape.
"""

import argparse
import itertools
import json
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from bench.kernel_tuning import apply_table, input_copies, time_ms
from bench.measure_small_batch_gemv import SMOKE_CONFIGS, weight_shapes
from models.kernels import skinny_gemm_launch as launch_module
from models.kernels.decode_attention import processors
from models.kernels.skinny_gemm_launch import TUNED, SkinnyGemmLaunch
from models.kernels.small_batch_linear import load_gemv_kernel
from tools.cli import ArgumentParser, load_config, parse_int_list, parse_size

LAUNCH_MODULE = Path(launch_module.__file__)  # where --apply writes the table
MAX_BLOCK_M = 128


def _out_of_resources() -> type[Exception]:
    """Triton's error for a launch whose tiles do not fit (a class nothing raises where Triton is absent)."""
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:
        return type("OutOfResources", (Exception,), {})
    return OutOfResources


OutOfResources = _out_of_resources()


def search_launches(rows: int) -> list[SkinnyGemmLaunch]:
    """The launches timed for ``rows`` rows: one tile of rows (each weight tile read once; at most ``MAX_BLOCK_M``),
    and a grid over the features per tile, the columns per step, the slices of K and the warps."""
    block_m = min(MAX_BLOCK_M, max(16, 1 << (rows - 1).bit_length()))
    return [
        SkinnyGemmLaunch(block_m, block_n, block_k, split_k, num_warps, 3)
        for block_n, block_k, split_k, num_warps in itertools.product((32, 64, 128), (64, 128), (1, 2, 4, 8), (4, 8))
    ]


SMOKE_SEARCH = [SkinnyGemmLaunch(16, 32, 32, 1, 4, 1), SkinnyGemmLaunch(16, 16, 16, 2, 4, 1)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--configs",
        nargs="+",
        default=["configs/tinyllama.json", "configs/llama2_7b.json"],
        help="model config .json files whose weight shapes are measured",
    )
    p.add_argument("--rows", default="128", help="comma-separated row counts (the batch of a decode step), each > 1")
    p.add_argument(
        "--min_gain",
        type=float,
        default=0.1,
        help="a launch enters the table when it is this fraction faster than cuBLAS",
    )
    p.add_argument(
        "--apply", action="store_true", help="write the table into models/kernels/skinny_gemm_launch.py (TUNED)"
    )
    p.add_argument(
        "--hbm_bandwidth", default="4.8TB", help="memory bandwidth per second for the fractions (H200: 4.8TB)"
    )
    p.add_argument("--warmup_ms", type=float, default=10.0, help="do_bench warm-up per timing (CUDA)")
    p.add_argument("--rep_ms", type=float, default=30.0, help="do_bench repetition time per timing (CUDA)")
    p.add_argument("--smoke", action="store_true", help="CPU through Triton's interpreter, a tiny config, 2 launches")
    p.add_argument("--output_dir", default="bench/results/skinny_gemm", help="folder of the JSON")
    args = p.parse_args(argv)
    if args.smoke:
        args.configs = SMOKE_CONFIGS if args.configs == p.get_default("configs") else args.configs
        args.rows = "8" if args.rows == p.get_default("rows") else args.rows
    args.row_list = parse_int_list("--rows", args.rows)
    if min(args.row_list) < 2:
        p.error(f"--rows: {args.rows}; allowed are row counts > 1 (one row is the GEMV's)")
    args.bandwidth = parse_size("--hbm_bandwidth", args.hbm_bandwidth)
    return args


def measure_shape(gemm, n: int, k: int, rows: int, args, device: torch.device, dtype: torch.dtype) -> dict:
    """cuBLAS and every launch of the search for one ``(rows, K) @ (N, K)^T``: a launch whose tiles do not fit the
    GPU is recorded with its error, and one whose product is off the float32 product by more than the output's
    rounding is recorded untimed (so it never enters the table)."""
    weight_bytes = n * k * dtype.itemsize
    on_gpu = device.type == "cuda"
    copies = input_copies(weight_bytes, torch.cuda.get_device_properties(device).L2_cache_size) if on_gpu else 1
    weights = [torch.randn(n, k, device=device, dtype=dtype) / k**0.5 for _ in range(copies)]
    x = torch.randn(rows, k, device=device, dtype=dtype)

    def timed(fn) -> float:
        return time_ms([lambda w=w: fn(w) for w in weights], device.type, args.warmup_ms, args.rep_ms)

    def fraction(ms: float) -> float:
        return weight_bytes / (ms / 1e3) / args.bandwidth

    row = {"N": n, "K": k, "rows": rows, "weight_bytes": weight_bytes, "cublas_ms": timed(lambda w: F.linear(x, w))}
    expected = F.linear(x.float(), weights[0].float())
    # The output's rounding (a unit in the last place of the largest output) plus float32 sums of K products in
    # another order (K units of float32 of the largest sum of absolute products).
    magnitude = F.linear(x.float().abs(), weights[0].float().abs()).max().item()
    tolerance = (2 * torch.finfo(dtype).eps + k * torch.finfo(torch.float32).eps) * magnitude
    search = []
    for launch in SMOKE_SEARCH if args.smoke else search_launches(rows):
        try:
            error = (gemm(x, weights[0], *launch).float() - expected).abs().max().item()
        except OutOfResources as failure:  # this launch's tiles do not fit the GPU's shared memory
            search.append(launch._asdict() | {"error": str(failure)})
            continue
        entry = launch._asdict() | {"max_abs_error_vs_fp32": error}
        if error <= tolerance:
            entry["ms"] = timed(lambda w, c=launch: gemm(x, w, *c))
        search.append(entry)
    row["search"] = search
    timed_launches = [entry for entry in search if "ms" in entry]
    if not timed_launches:
        raise SystemExit(f"N={n} K={k} M={rows}: no launch of the search ran and agreed with the float32 product")
    row["best"] = dict(min(timed_launches, key=lambda entry: entry["ms"]))
    row["best"] |= {
        "bandwidth_fraction": fraction(row["best"]["ms"]),
        "speedup_vs_cublas": row["cublas_ms"] / row["best"]["ms"],
    }
    row["cublas_bandwidth_fraction"] = fraction(row["cublas_ms"])
    return row


def gemm_table(
    rows: list[dict], value_bytes: int, min_gain: float, current: dict[tuple[int, int, int, int], SkinnyGemmLaunch]
) -> dict[tuple[int, int, int, int], SkinnyGemmLaunch]:
    """``TUNED`` from the measured ``rows``: per ``(M, N, K, value_bytes)`` the best launch where it is ``min_gain``
    faster than cuBLAS (else no row: cuBLAS runs it); the rows of ``current`` for shapes not measured are kept."""
    table = dict(current)
    for row in rows:
        key = (row["rows"], row["N"], row["K"], value_bytes)
        table.pop(key, None)
        if row["best"]["ms"] < (1 - min_gain) * row["cublas_ms"]:
            table[key] = SkinnyGemmLaunch(*(row["best"][field] for field in SkinnyGemmLaunch._fields))
    return dict(sorted(table.items()))


def table_literal(table: dict[tuple[int, int, int, int], SkinnyGemmLaunch], comment: str) -> str:
    """Python source of the ``TUNED`` assignment in ``models/kernels/skinny_gemm_launch.py`` (as ruff formats it;
    launches by position, so that a row stays under 120 columns)."""
    head = f"# {comment}\nTUNED: dict[tuple[int, int, int, int], SkinnyGemmLaunch] = {{"
    if not table:
        return head + "}\n"
    rows = (f"    {key!r}: SkinnyGemmLaunch{tuple(launch)!r}," for key, launch in table.items())
    return "\n".join([head, *rows, "}"]) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    kernel = load_gemv_kernel()
    if kernel is None or kernel.skinny_gemm is None:
        raise SystemExit("no skinny GEMM: needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on a CPU)")
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = {(n, k): name for path in args.configs for name, n, k in weight_shapes(load_config("--configs", path))}
    rows = []
    for ((n, k), name), count in tqdm(list(itertools.product(shapes.items(), args.row_list)), desc="shapes"):
        row = {"layer": name} | measure_shape(kernel.skinny_gemm, n, k, count, args, device, dtype)
        best = row["best"]
        tqdm.write(
            f"{name:22s} N={n:6d} K={k:6d} M={count}: cuBLAS {row['cublas_ms'] * 1e3:7.1f} us "
            f"({row['cublas_bandwidth_fraction']:.2f}), best {best['ms'] * 1e3:7.1f} us "
            f"({best['bandwidth_fraction']:.2f}) {SkinnyGemmLaunch(*(best[f] for f in SkinnyGemmLaunch._fields))}"
        )
        rows.append(row)
    setting = {
        "configs": args.configs,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "hbm_bandwidth": args.hbm_bandwidth,
        "multiprocessors": processors(device),
    }
    table = gemm_table(rows, dtype.itemsize, args.min_gain, TUNED)
    literal = table_literal(
        table, f"{setting['device']} ({setting['multiprocessors']} SMs), {dtype}, min_gain {args.min_gain}"
    )
    out = {"setting": setting, "shapes": rows, "table": {repr(key): launch._asdict() for key, launch in table.items()}}
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "skinny_gemm.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"written: {path}")
    print(literal)
    if args.apply:
        apply_table(LAUNCH_MODULE, literal)
    return out


if __name__ == "__main__":
    main()
