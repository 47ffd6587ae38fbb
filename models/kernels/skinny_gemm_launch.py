"""Where the skinny GEMM (``triton_skinny_gemm.py``) runs, and how: a table measured against cuBLAS.

``small_batch_linear.py`` runs a product of more than one row through the skinny GEMM only where ``TUNED`` names its
shape, i.e. where ``bench/measure_skinny_gemm.py --apply`` measured the GEMM faster than cuBLAS on a GPU; every other
product stays with cuBLAS. The launch is a pure function of the shapes, so a compiled decode step captures one kernel
per layer. Shapes: ``M`` rows (batch x tokens of a decode step), ``N`` out features, ``K`` in features.
"""

from typing import NamedTuple


class SkinnyGemmLaunch(NamedTuple):
    """The ints ``skinny_gemm`` takes after the tensors, in its argument order."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


# (M, N, K, bytes per value) -> the launch measured fastest where it beat cuBLAS, written by
# bench/measure_skinny_gemm.py --apply (docs/fast_decode.md, "The skinny GEMM"); the line below says which run.
# NVIDIA H200 (132 SMs), torch.bfloat16, min_gain 0.1
TUNED: dict[tuple[int, int, int, int], SkinnyGemmLaunch] = {
    (128, 32000, 2048, 2): SkinnyGemmLaunch(128, 128, 64, 1, 8, 3),
}


def skinny_gemm_launch(rows: int, out_features: int, in_features: int, value_bytes: int) -> SkinnyGemmLaunch | None:
    """The measured launch for an ``(rows, in_features) @ (out_features, in_features)^T`` product of ``value_bytes``
    values, or None: cuBLAS runs it."""
    return TUNED.get((rows, out_features, in_features, value_bytes))
