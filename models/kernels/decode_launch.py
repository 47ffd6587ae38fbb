"""Launch configuration of the split-KV decode kernel (``triton_decode.py``): the one place where its KV tile, warps,
pipeline stages and number of splits are chosen, as a pure function of the decode shapes.

``decode_attention.py`` asks ``launch_config`` and hands the four ints to the ``split_kv_decode`` op, which launches
with them; ``bench/tune_decode_attention.py`` times candidate configurations on a GPU and prints a ``TUNED`` table in
the form read here. With ``TUNED`` empty every shape gets the defaults below.

Shapes: ``B`` batch, ``Hkv`` KV heads, ``G`` query heads per KV head, ``D`` head dim, ``S`` cache slots. A
"KV row" is one ``(b, h)`` pair: ``B * Hkv`` of them, each the work of ``NS`` programs (``NS`` splits).
"""

from typing import NamedTuple

MIN_DOT = 16  # tl.dot needs at least 16 along each dimension: query heads and head dim are padded to it, tiles >= it
TILE = 64  # KV slots per inner step of the kernel: one TILE x D tile of keys and of values
NUM_WARPS = 4
NUM_STAGES = 2  # software-pipelining depth of the tile loop
WAVES = 2  # aim for this many programs per streaming multiprocessor
MAX_SPLITS = 64  # beyond this the merge costs more than the parallelism brings


class KernelConfig(NamedTuple):
    """What a tuning table stores per shape; ``waves`` becomes a split count per batch (``num_kv_splits``)."""

    block_n: int
    num_warps: int
    num_stages: int
    waves: int


class LaunchConfig(NamedTuple):
    """The ints ``split_kv_decode`` takes after ``scaling``, in its argument order."""

    num_splits: int
    block_n: int
    num_warps: int
    num_stages: int


DEFAULT = KernelConfig(block_n=TILE, num_warps=NUM_WARPS, num_stages=NUM_STAGES, waves=WAVES)

# Rows of a table key: (first KV row count, config), ascending; a shape takes the row of the largest first count at
# most its ``B * Hkv`` (the first row below that).
TableRows = tuple[tuple[int, KernelConfig], ...]
# (G, D, bytes per value) -> rows: measured configs, written by bench/tune_decode_attention.py (see
# docs/fast_decode.md, "The decode kernel's launch configuration"). Shapes without a key get DEFAULT.
# NVIDIA H200 (132 SMs), bfloat16, min_gain 0.03, over the table before; the TinyLlama rows from 512 KV rows on: the
# fastest measured at batches 128, 512 and 2048 (bench/results/decode_launch_h200/retune_tinyllama/)
TUNED: dict[tuple[int, int, int], TableRows] = {
    (8, 64, 2): (
        (4, KernelConfig(block_n=32, num_warps=4, num_stages=3, waves=2)),
        (128, KernelConfig(block_n=64, num_warps=4, num_stages=3, waves=4)),
        (512, KernelConfig(block_n=64, num_warps=2, num_stages=4, waves=2)),
        (8192, KernelConfig(block_n=128, num_warps=2, num_stages=3, waves=2)),
    ),
    (1, 128, 2): (
        (32, KernelConfig(block_n=64, num_warps=4, num_stages=3, waves=2)),
        (1024, KernelConfig(block_n=32, num_warps=4, num_stages=4, waves=2)),
        (1664, KernelConfig(block_n=128, num_warps=4, num_stages=2, waves=2)),
        (16384, KernelConfig(block_n=64, num_warps=4, num_stages=3, waves=2)),
        (26624, KernelConfig(block_n=64, num_warps=4, num_stages=2, waves=2)),
    ),
}


def num_kv_splits(
    batch: int, kv_heads: int, slots: int, processors: int, waves: int = WAVES, block_n: int = TILE
) -> int:
    """How many parts each row's span is split into: enough programs for ``waves`` per processor, at most one
    tile per part and ``MAX_SPLITS`` parts. Shapes only, so a compiled step keeps one graph as the cache fills."""
    wanted = -(-waves * processors // (batch * kv_heads))
    return max(1, min(wanted, -(-slots // block_n), MAX_SPLITS))


def resolve_launch(config: KernelConfig, batch: int, kv_heads: int, slots: int, processors: int) -> LaunchConfig:
    """``config`` at a batch: its waves target turned into a split count."""
    splits = num_kv_splits(batch, kv_heads, slots, processors, config.waves, config.block_n)
    return LaunchConfig(splits, config.block_n, config.num_warps, config.num_stages)


def table_config(rows: TableRows, kv_rows: int) -> KernelConfig:
    """The config of the last row whose first KV row count is at most ``kv_rows`` (the first row below them all)."""
    chosen = rows[0][1]
    for first, config in rows:  # a plain loop: torch.compile traces it to a constant
        if first <= kv_rows:
            chosen = config
    return chosen


def launch_config(
    batch: int,
    kv_heads: int,
    group: int,
    head_dim: int,
    slots: int,
    value_bytes: int,
    processors: int,
    table: dict[tuple[int, int, int], TableRows] | None = None,
) -> LaunchConfig:
    """The kernel's launch for ``B`` rows of ``Hkv`` KV heads, ``G`` query heads each, head dim ``D``, ``S`` cache
    slots of ``value_bytes`` bytes per value, on a GPU of ``processors`` streaming multiprocessors: ``table``'s
    (default ``TUNED``) config for ``(G, D, value_bytes)`` at ``B * Hkv`` KV rows, ``DEFAULT`` for a shape it does
    not list."""
    rows = (TUNED if table is None else table).get((group, head_dim, value_bytes))
    config = DEFAULT if rows is None else table_config(rows, batch * kv_heads)
    return resolve_launch(config, batch, kv_heads, slots, processors)


def check_kernel_config(config: KernelConfig) -> None:
    """ValueError naming the field of a config the kernel cannot launch with."""
    power_of_two = {"block_n": config.block_n, "num_warps": config.num_warps}
    for field, value in power_of_two.items():
        if value < 1 or value & (value - 1):
            raise ValueError(f"{field}: {value}; allowed are powers of two")
    if config.block_n < MIN_DOT:
        raise ValueError(f"block_n: {config.block_n}; allowed are powers of two >= {MIN_DOT} (tl.dot's minimum)")
    for field in ("num_stages", "waves"):
        if getattr(config, field) < 1:
            raise ValueError(f"{field}: {getattr(config, field)}; allowed are integers >= 1")


def check_table(table: dict[tuple[int, int, int], TableRows]) -> None:
    """ValueError unless every key has rows with strictly ascending first counts (the first >= 1) of valid configs."""
    for key, rows in table.items():
        firsts = [first for first, _ in rows]
        if not rows or firsts[0] < 1 or firsts != sorted(set(firsts)):
            raise ValueError(f"TUNED[{key}]: first KV row counts {firsts}; allowed are strictly ascending counts >= 1")
        for _, config in rows:
            check_kernel_config(config)
