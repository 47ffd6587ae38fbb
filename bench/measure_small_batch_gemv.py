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
import json
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from bench.kernel_tuning import apply_table, input_copies, time_ms
from models.kernels import gemv_launch as launch_module
from models.kernels.decode_attention import processors
from models.kernels.gemv_launch import TUNED, GemvLaunch, gemv_launch
from models.kernels.small_batch_linear import GemvKernel, load_gemv_kernel
from tools.cli import ArgumentParser, load_config, parse_int_list, parse_size

SMOKE_CONFIGS = ["configs/test_tiny_opt.json"]
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
    p.add_argument(
        "--configs",
        nargs="+",
        default=["configs/tinyllama.json", "configs/llama2_7b.json"],
        help="model config .json files whose weight shapes are measured",
    )
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
    p.add_argument(
        "--hbm_bandwidth", default="4.8TB", help="memory bandwidth per second for the fractions (H200: 4.8TB)"
    )
    p.add_argument("--warmup_ms", type=float, default=25.0, help="do_bench warm-up per timing (CUDA)")
    p.add_argument("--rep_ms", type=float, default=100.0, help="do_bench repetition time per timing (CUDA)")
    p.add_argument("--smoke", action="store_true", help="CPU through Triton's interpreter, a tiny config")
    p.add_argument("--output_dir", default="bench/results/small_batch_gemv", help="folder of the JSON")
    args = p.parse_args(argv)
    if args.smoke:
        args.configs = SMOKE_CONFIGS if args.configs == p.get_default("configs") else args.configs
    args.search_launches = SEARCH[:SMOKE_SEARCH] if args.smoke else SEARCH
    args.row_list = parse_int_list("--rows", args.rows)
    if args.apply and not args.search:
        p.error("--apply: writes the table of a --search; allowed only with --search")
    args.bandwidth = parse_size("--hbm_bandwidth", args.hbm_bandwidth)
    return args


def weight_shapes(config) -> list[tuple[str, int, int]]:
    """``(name, N, K)`` of a Llama-shaped config's linear layers, and of its fused Q/K/V and gate/up products
    (``models/fused_projections.py``), one entry per distinct shape (first name kept)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden, inter = config.hidden_size, config.intermediate_size
    queries, keys = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    named = [
        ("q_proj", queries, hidden),
        ("k_proj/v_proj", keys, hidden),
        ("o_proj", hidden, queries),
        ("gate_proj/up_proj", inter, hidden),
        ("down_proj", hidden, inter),
        ("lm_head", config.vocab_size, hidden),
        ("qkv_proj (fused)", queries + 2 * keys, hidden),
        ("gate_up_proj (fused)", 2 * inter, hidden),
    ]
    seen, shapes = set(), []
    for name, n, k in named:
        if (n, k) not in seen:
            seen.add((n, k))
            shapes.append((name, n, k))
    return shapes


def measure_shape(
    kernel: GemvKernel, n: int, k: int, rows: int, args, device: torch.device, dtype: torch.dtype
) -> dict:
    """cuBLAS, the current launch and (``--search``) the best of SEARCH for one ``(rows, K) @ (N, K)^T``."""
    weight_bytes = n * k * dtype.itemsize
    on_gpu = device.type == "cuda"
    copies = input_copies(weight_bytes, torch.cuda.get_device_properties(device).L2_cache_size) if on_gpu else 1
    weights = [torch.randn(n, k, device=device, dtype=dtype) / k**0.5 for _ in range(copies)]
    x = torch.randn(rows, k, device=device, dtype=dtype)

    def timed(fn) -> float:
        return time_ms([lambda w=w: fn(w) for w in weights], device.type, args.warmup_ms, args.rep_ms)

    def fraction(ms: float) -> float:
        return weight_bytes / (ms / 1e3) / args.bandwidth

    current = gemv_launch(rows, n, k, dtype.itemsize)
    expected = F.linear(x.float(), weights[0].float())
    error = (kernel.run(x, weights[0], *current).float() - expected).abs().max().item()
    row = {"N": n, "K": k, "rows": rows, "weight_bytes": weight_bytes, "max_abs_error_vs_fp32": error}
    row["cublas_ms"] = timed(lambda w: F.linear(x, w))
    row["current"] = current._asdict() | {"ms": timed(lambda w: kernel.run(x, w, *current))}
    if args.search:
        launches = args.search_launches
        row["search"] = [
            launch._asdict() | {"ms": timed(lambda w, c=launch: kernel.run(x, w, *c))} for launch in launches
        ]
        row["best"] = dict(min(row["search"], key=lambda r: r["ms"]))
    for key in ("current", "best"):
        if key in row:
            row[key]["bandwidth_fraction"] = fraction(row[key]["ms"])
            row[key]["speedup_vs_cublas"] = row["cublas_ms"] / row[key]["ms"]
    row["cublas_bandwidth_fraction"] = fraction(row["cublas_ms"])
    return row


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    kernel = load_gemv_kernel()
    if kernel is None:
        raise SystemExit("no GEMV kernel: needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on a CPU)")
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = {(n, k): name for path in args.configs for name, n, k in weight_shapes(load_config("--configs", path))}
    rows = []
    for ((n, k), name), count in tqdm(list(itertools.product(shapes.items(), args.row_list)), desc="shapes"):
        row = {"layer": name} | measure_shape(kernel, n, k, count, args, device, dtype)
        best = row.get("best", row["current"])
        tqdm.write(
            f"{name:18s} N={n:6d} K={k:6d} M={count}: cuBLAS {row['cublas_ms'] * 1e3:7.1f} us "
            f"({row['cublas_bandwidth_fraction']:.2f}), current {row['current']['ms'] * 1e3:7.1f} us "
            f"({row['current']['bandwidth_fraction']:.2f}), best {best['ms'] * 1e3:7.1f} us "
            f"({best['bandwidth_fraction']:.2f}) {best['block_n']}x{best['block_k']}/{best['num_warps']}w"
        )
        rows.append(row)
    setting = {
        "configs": args.configs,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "hbm_bandwidth": args.hbm_bandwidth,
        "multiprocessors": processors(device),
    }
    table = gemv_table(rows, dtype.itemsize, args.min_gain, TUNED)
    literal = table_literal(
        table, f"{setting['device']} ({setting['multiprocessors']} SMs), {dtype}, min_gain {args.min_gain}"
    )
    out = {"setting": setting, "shapes": rows, "table": {repr(key): launch._asdict() for key, launch in table.items()}}
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "small_batch_gemv.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"written: {path}")
    if args.search:
        print(literal)
    if args.apply:
        apply_table(GEMV_LAUNCH, literal)
    return out


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
    """Python source of the ``TUNED`` assignment in ``models/kernels/gemv_launch.py`` (as ruff formats it)."""
    head = f"# {comment}\nTUNED: dict[tuple[int, int, int], GemvLaunch] = {{"
    if not table:
        return head + "}\n"
    return "\n".join([head, *(f"    {key!r}: {launch!r}," for key, launch in table.items()), "}"]) + "\n"


if __name__ == "__main__":
    main()
