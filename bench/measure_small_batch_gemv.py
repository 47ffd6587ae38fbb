"""The linear layers of a decode step at a few rows: cuBLAS (``F.linear``) against the Triton GEMV of
``models/kernels/small_batch_linear.py``, per weight shape of each config and per row count, as fractions of the
memory bandwidth.

    python -m bench.measure_small_batch_gemv --configs configs/tinyllama.json configs/llama2_7b.json --search \\
        --apply --output_dir bench/results/small_batch_gemv_h200        # GPU, bf16
    python -m bench.measure_small_batch_gemv --smoke --output_dir /tmp/gemv   # CPU (Triton's interpreter): same code

Per shape ``(N, K)`` (the Q, K/V, O, gate/up, down and LM-head weights of the configs and their fused Q/K/V and
gate/up matrices, ``models/fused_projections.py``, each shape once) and row count
``M``: milliseconds per call of cuBLAS and of the GEMV at the launch ``gemv_launch`` picks now (``current``: the
table's or the rule's), and with ``--search`` of every launch in ``SEARCH`` (``best``). The table of the one-row
shapes (``TUNED`` of models/kernels/gemv_launch.py: per measured shape the best launch where it beats the
current one by ``--min_gain``, the unmeasured shapes' rows kept) is printed, and written into that module with
``--apply``. Timing by bench/kernel_tuning.py, as the decode kernel's tuner times:
calls captured in one CUDA graph, cycling through copies of the weight whose bytes exceed twice the L2, so that
every call reads its weight from HBM as a decode step does. ``bandwidth_fraction`` = weight bytes / time /
``--hbm_bandwidth``.
Writes ``<output_dir>/small_batch_gemv.json``; prints one line per shape.
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
from models.kernels import gemv_launch as launch_module
from models.kernels.gemv_launch import TUNED, GemvLaunch, gemv_launch
from models.kernels.small_batch_linear import GemvKernel, load_gemv_kernel
from tools.cli import ArgumentParser, parse_int_list

SMOKE_SEARCH = 2  # launches of SEARCH the interpreter times with --smoke --search
MAX_TILE = 8192  # float32 accumulators per program, at most
GEMV_LAUNCH = Path(launch_module.__file__)  # where --apply writes the table
SEARCH = [
    GemvLaunch(block_n, block_k, num_warps)
    for block_n, block_k, num_warps in itertools.product((2, 4, 8, 16, 32), (128, 256, 512, 1024), (2, 4, 8))
    if block_n * block_k <= MAX_TILE
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p, "bench/results/small_batch_gemv", warmup_ms=25.0, rep_ms=100.0)
    p.add_argument("--rows", default="1", help="comma-separated row counts (batch x tokens of a step)")
    p.add_argument("--search", action="store_true", help="also time every launch of SEARCH and report the best")
    p.add_argument(
        "--min_gain",
        type=float,
        default=0.1,
        help="a searched launch enters the table when it is this fraction faster than the current one (repeated "
        "timings of one launch of a few microseconds spread by up to ~9%%)",
    )
    p.add_argument(
        "--apply",
        action="store_true",
        help="with --search: write the table into models/kernels/gemv_launch.py (TUNED)",
    )
    args = p.parse_args(argv)
    check_shape_arguments(p, args)
    args.search_launches = SEARCH[:SMOKE_SEARCH] if args.smoke else SEARCH
    args.row_list = parse_int_list("--rows", args.rows)
    if args.apply and not args.search:
        p.error("--apply: writes the table of a --search; allowed only with --search")
    return args


def measure_shape(
    kernel: GemvKernel, n: int, k: int, rows: int, args, device: torch.device, dtype: torch.dtype
) -> dict:
    """cuBLAS, the current launch and (``--search``) the best of SEARCH for one ``(rows, K) @ (N, K)^T``."""
    timer = WeightTimer.build(n, k, rows, device, dtype, args)
    x, weight = timer.x, timer.weights[0]
    current = gemv_launch(rows, n, k, dtype.itemsize)
    expected = F.linear(x.float(), weight.float())
    error = (kernel.run(x, weight, *current).float() - expected).abs().max().item()
    row = {"N": n, "K": k, "rows": rows, "weight_bytes": timer.weight_bytes, "max_abs_error_vs_fp32": error}
    row["cublas_ms"] = timer.ms(lambda w: F.linear(x, w))
    row["current"] = current._asdict() | {"ms": timer.ms(lambda w: kernel.run(x, w, *current))}
    if args.search:
        launches = args.search_launches
        row["search"] = [
            launch._asdict() | {"ms": timer.ms(lambda w, c=launch: kernel.run(x, w, *c))} for launch in launches
        ]
        row["best"] = dict(min(row["search"], key=lambda r: r["ms"]))
    for key in ("current", "best"):
        if key in row:
            row[key]["bandwidth_fraction"] = timer.fraction(row[key]["ms"])
            row[key]["speedup_vs_cublas"] = row["cublas_ms"] / row[key]["ms"]
    row["cublas_bandwidth_fraction"] = timer.fraction(row["cublas_ms"])
    return row


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    kernel = load_gemv_kernel()
    if kernel is None:
        raise SystemExit("no GEMV kernel: needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on a CPU)")
    device, dtype = tuning_device(args.smoke)

    def line(row: dict) -> str:
        best = row.get("best", row["current"])
        return (
            f"current {row['current']['ms'] * 1e3:7.1f} us "
            f"({row['current']['bandwidth_fraction']:.2f}), best {best['ms'] * 1e3:7.1f} us "
            f"({best['bandwidth_fraction']:.2f}) {best['block_n']}x{best['block_k']}/{best['num_warps']}w"
        )

    rows = measure_config_shapes(
        args.configs, args.row_list, lambda n, k, count: measure_shape(kernel, n, k, count, args, device, dtype), line
    )
    table = gemv_table(rows, dtype.itemsize, args.min_gain, TUNED)
    return write_tuning(args, device, dtype, rows, table, table_literal, "small_batch_gemv", GEMV_LAUNCH)


def gemv_table(
    rows: list[dict], value_bytes: int, min_gain: float, current: dict[tuple[int, int, int], GemvLaunch]
) -> dict[tuple[int, int, int], GemvLaunch]:
    """``TUNED`` from the searched one-row shapes of ``rows``: per ``(N, K, value_bytes)`` the best launch where it is
    ``min_gain`` faster than the current one, else the current table's row if it had one (none: the rule stays); the
    rows of ``current`` for shapes not measured are kept."""
    table = dict(current)
    for row in rows:
        if row["rows"] != 1 or "best" not in row:
            continue
        key = (row["N"], row["K"], value_bytes)
        if row["best"]["ms"] < (1 - min_gain) * row["current"]["ms"]:
            table[key] = GemvLaunch(*(row["best"][field] for field in GemvLaunch._fields))
    return dict(sorted(table.items()))


def table_literal(table: dict[tuple[int, int, int], GemvLaunch], comment: str) -> str:
    """Python source of the ``TUNED`` assignment in ``models/kernels/gemv_launch.py``."""
    return launch_table_literal(table, comment, "tuple[int, int, int]", GemvLaunch)


if __name__ == "__main__":
    main()
