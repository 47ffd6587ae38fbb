"""Launch configuration of the RoPE + cache-write kernel (``triton_rotary_cache.py``): its grid and tiles, a pure
function of the decode shapes (as ``gemv_launch.py`` and ``decode_launch.py`` are for the other decode kernels).

Program ``(b, p)`` handles row ``b``'s ``p``-th block of heads. From 65 rows on (no room for two programs per row
within ``WHOLE_ROWS``) a program takes a row's heads whole: at batch 4,096 a program per head (147,456 programs of one
warp for TinyLlama) made the step's three calls take 0.54 ms on an H200, one per row 0.06 ms. Below, a row's heads are
split over several programs: at batch 1 one program doing all of Llama-2-7B's 32 heads took 5.6 us per call, a program
per head 2.6 us (one H200, docs/fast_decode.md, "Batch 1 at Llama-2-7B"; batch 1 is the one split measured).
"""

from typing import NamedTuple

WHOLE_ROWS = 128  # rows from which a program takes a row's heads whole (about one program per multiprocessor)
ONE_WARP_TILE = 256  # values of a program's tile up to which it has one warp (a head or two: the split blocks),
FOUR_WARP_TILE = 4096  # 4 up to this many (every whole row of TinyLlama and 7B), 8 above (fewer registers per thread)


class RotaryCacheLaunch(NamedTuple):
    """The kernel's grid and tiles: ``(B, programs_per_row)`` programs, each with ``block_hq`` query heads,
    ``block_hkv`` KV heads (padded: the last programs' heads may be past the row's), ``block_d`` values per head."""

    programs_per_row: int
    block_hq: int
    block_hkv: int
    block_d: int
    num_warps: int


def rotary_cache_launch(batch: int, query_heads: int, kv_heads: int, head_dim: int) -> RotaryCacheLaunch:
    """The launch for ``batch`` rows of ``query_heads`` / ``kv_heads`` heads of ``head_dim`` (each padded to a power of
    two): one program per row from ``WHOLE_ROWS`` rows on; below, a row's heads in equal power-of-two blocks over the
    most programs per row that keep the grid within ``WHOLE_ROWS`` programs (one from 65 rows), at most one per padded
    query head.

    >>> rotary_cache_launch(1, 32, 32, 128)  # Llama-2-7B at batch 1: a program per head
    RotaryCacheLaunch(programs_per_row=32, block_hq=1, block_hkv=1, block_d=128, num_warps=1)
    >>> rotary_cache_launch(4096, 32, 4, 64)  # TinyLlama at batch 4,096: a program per row
    RotaryCacheLaunch(programs_per_row=1, block_hq=32, block_hkv=4, block_d=64, num_warps=4)
    """
    padded_q, padded_kv, block_d = (1 << (n - 1).bit_length() for n in (query_heads, kv_heads, head_dim))
    programs = min(1 << (max(1, WHOLE_ROWS // batch).bit_length() - 1), padded_q)  # a power of two, rounded down
    block_hq, block_hkv = padded_q // programs, max(1, padded_kv // programs)
    tile = max(block_hq, block_hkv) * block_d
    num_warps = 1 if tile <= ONE_WARP_TILE else 4 if tile <= FOUR_WARP_TILE else 8
    return RotaryCacheLaunch(programs, block_hq, block_hkv, block_d, num_warps)
