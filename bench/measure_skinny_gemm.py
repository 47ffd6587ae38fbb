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
from pathlib import Path

import torch
from torch.nn import functional as F

from bench.kernel_tuning import (
    WeightTimer,
    add_shape_arguments,
    check_shape_arguments,
    launch_table_literal,
    measure_config_shapes,
    tuning_device,
    write_tuning,
)
from models.kernels import skinny_gemm_launch as launch_module
from models.kernels.skinny_gemm_launch import TUNED, SkinnyGemmLaunch
from models.kernels.small_batch_linear import load_gemv_kernel
from tools.cli import ArgumentParser, parse_int_list

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
    add_shape_arguments(p, "bench/results/skinny_gemm", warmup_ms=10.0, rep_ms=30.0)
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
    args = p.parse_args(argv)
    check_shape_arguments(p, args)
    if args.smoke and args.rows == p.get_default("rows"):
        args.rows = "8"
    args.row_list = parse_int_list("--rows", args.rows)
    if min(args.row_list) < 2:
        p.error(f"--rows: {args.rows}; allowed are row counts > 1 (one row is the GEMV's)")
    return args


def measure_shape(gemm, n: int, k: int, rows: int, args, device: torch.device, dtype: torch.dtype) -> dict:
    """cuBLAS and every launch of the search for one ``(rows, K) @ (N, K)^T``: a launch whose tiles do not fit the
    GPU is recorded with its error, and one whose product is off the float32 product by more than the output's
    rounding is recorded untimed (so it never enters the table)."""
    timer = WeightTimer.build(n, k, rows, device, dtype, args)
    x, weight = timer.x, timer.weights[0]
    row = {"N": n, "K": k, "rows": rows, "weight_bytes": timer.weight_bytes}
    row["cublas_ms"] = timer.ms(lambda w: F.linear(x, w))
    expected = F.linear(x.float(), weight.float())
    # The output's rounding (a unit in the last place of the largest output) plus float32 sums of K products in
    # another order (K units of float32 of the largest sum of absolute products).
    magnitude = F.linear(x.float().abs(), weight.float().abs()).max().item()
    tolerance = (2 * torch.finfo(dtype).eps + k * torch.finfo(torch.float32).eps) * magnitude
    search = []
    for launch in SMOKE_SEARCH if args.smoke else search_launches(rows):
        try:
            error = (gemm(x, weight, *launch).float() - expected).abs().max().item()
        except OutOfResources as failure:  # this launch's tiles do not fit the GPU's shared memory
            search.append(launch._asdict() | {"error": str(failure)})
            continue
        entry = launch._asdict() | {"max_abs_error_vs_fp32": error}
        if error <= tolerance:
            entry["ms"] = timer.ms(lambda w, c=launch: gemm(x, w, *c))
        search.append(entry)
    row["search"] = search
    timed_launches = [entry for entry in search if "ms" in entry]
    if not timed_launches:
        raise SystemExit(f"N={n} K={k} M={rows}: no launch of the search ran and agreed with the float32 product")
    row["best"] = dict(min(timed_launches, key=lambda entry: entry["ms"]))
    row["best"] |= {
        "bandwidth_fraction": timer.fraction(row["best"]["ms"]),
        "speedup_vs_cublas": row["cublas_ms"] / row["best"]["ms"],
    }
    row["cublas_bandwidth_fraction"] = timer.fraction(row["cublas_ms"])
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
    """Python source of the ``TUNED`` assignment in ``models/kernels/skinny_gemm_launch.py``."""
    return launch_table_literal(table, comment, "tuple[int, int, int, int]", SkinnyGemmLaunch)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    kernel = load_gemv_kernel()
    if kernel is None or kernel.skinny_gemm is None:
        raise SystemExit("no skinny GEMM: needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on a CPU)")
    device, dtype = tuning_device(args.smoke)

    def line(row: dict) -> str:
        best = row["best"]
        return (
            f"best {best['ms'] * 1e3:7.1f} us "
            f"({best['bandwidth_fraction']:.2f}) {SkinnyGemmLaunch(*(best[f] for f in SkinnyGemmLaunch._fields))}"
        )

    rows = measure_config_shapes(
        args.configs,
        args.row_list,
        lambda n, k, count: measure_shape(kernel.skinny_gemm, n, k, count, args, device, dtype),
        line,
    )
    table = gemm_table(rows, dtype.itemsize, args.min_gain, TUNED)
    return write_tuning(args, device, dtype, rows, table, table_literal, "skinny_gemm", LAUNCH_MODULE)


if __name__ == "__main__":
    main()
