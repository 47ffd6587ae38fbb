"""Launch of the small-batch GEMV (``triton_gemv.py``): the one place where its features per program, columns per
step and warps are chosen, as a pure function of the shapes.

``small_batch_linear.py`` asks ``gemv_launch`` and hands the three ints to the ``small_batch_gemv`` op;
``bench/measure_small_batch_gemv.py --search --apply`` times a grid of launches on a GPU and writes ``TUNED`` here
(docs/fast_decode.md, "The small-batch GEMV"). Shapes: ``N`` out features, ``K`` in features.
"""

from typing import NamedTuple

# The rule for shapes the table does not hold, from the H200 sweep of bench/measure_small_batch_gemv.py: long steps
# along K (BLOCK_K columns), few features per program (many programs: several per multiprocessor), and fewer threads
# for the wider block.
BLOCK_K = 1024
WIDE_FEATURES = 4096  # from this many out features, blocks of 4 (else 2)


class GemvLaunch(NamedTuple):
    """The ints ``small_batch_gemv`` takes after the tensors, in its argument order."""

    block_n: int
    block_k: int
    num_warps: int


# (N, K, bytes per value) -> the launch measured best at one row, written by bench/measure_small_batch_gemv.py
# --apply (docs/fast_decode.md, "The small-batch GEMV"). Shapes without a key get the rule of ``gemv_launch``.
# NVIDIA H200 (132 SMs), torch.bfloat16: the rule's launch within timing noise of the best everywhere
TUNED: dict[tuple[int, int, int], GemvLaunch] = {}


def gemv_launch(rows: int, out_features: int, in_features: int, value_bytes: int) -> GemvLaunch:
    """The launch for an ``(rows, in_features) @ (out_features, in_features)^T`` product of ``value_bytes`` values:
    ``TUNED``'s at one row, else the rule."""
    tuned = TUNED.get((out_features, in_features, value_bytes)) if rows == 1 else None
    if tuned is not None:
        return tuned
    block_k = min(BLOCK_K, max(16, 1 << (in_features - 1).bit_length()))
    wide = out_features >= WIDE_FEATURES
    return GemvLaunch(block_n=4 if wide else 2, block_k=block_k, num_warps=2 if wide else 4)
