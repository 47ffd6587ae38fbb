"""Matrix products of a decode step at a few dozen to a few hundred rows: ``x (M, K) @ weight (N, K)^T -> (M, N)``.

Imported only where Triton can run (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); ``small_batch_linear``
decides, and runs it only for the shapes its measured table names.

At batch 128 a decode step's products are still bound by reading the weights (128 rows do 128 FLOPs per weight byte,
below an H200's ~206), yet cuBLAS ran them at about 0.37 of the bandwidth (docs/performance.md): its tiles leave
most multiprocessors idle on 2048-8192 out features. Here program ``(n, m, s)`` computes a ``BLOCK_M x BLOCK_N``
output tile over the ``s``-th of ``SPLIT_K`` slices of K with ``tl.dot``, in float32; with one slice it writes the
tile, with several each slice writes float32 partial sums that are added afterwards. Splitting K multiplies the
programs without reading the weight twice.
"""

import torch
from torch.library import custom_op
from transformers.utils.import_utils import is_triton_available

from .triton_gemv import on_device_of

# Always true where this module is imported; the guard keeps transformers' remote-code import check (which skips
# `if is_..._available()` blocks) from requiring Triton where an exported checkpoint is loaded.
if is_triton_available():
    import triton
    import triton.language as tl


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_os,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # This program's slice of K: whole BLOCK_K steps, the last slice shorter
    steps_per_slice = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    first = tl.program_id(2) * steps_per_slice * BLOCK_K
    columns = first + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + columns[None, :]
    w_ptrs = w_ptr + features[:, None].to(tl.int64) * stride_wn + columns[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, steps_per_slice):
        column_ok = columns < K - step * BLOCK_K
        x = tl.load(x_ptrs, mask=(rows[:, None] < M) & column_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=(features[:, None] < N) & column_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")  # float32 inputs: no TF32 rounding
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out_ptrs = (
        out_ptr + tl.program_id(2).to(tl.int64) * stride_os + rows[:, None].to(tl.int64) * stride_om + features[None, :]
    )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (features[None, :] < N))


@custom_op("lckv::skinny_gemm", mutates_args=())
def skinny_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    block_m: int,
    block_n: int,
    block_k: int,
    split_k: int,
    num_warps: int,
    num_stages: int,
) -> torch.Tensor:
    """``x (M, K)`` (unit stride along K) times ``weight (N, K)`` (contiguous) transposed -> ``(M, N)`` in x's dtype.

    The launch (``skinny_gemm_launch.SkinnyGemmLaunch``, fixed by the shapes): a ``block_m x block_n`` output tile and
    ``block_k`` columns per step (powers of two, each at least 16), K in ``split_k`` slices, ``num_warps``,
    ``num_stages``.
    """
    torch._check(x.stride(1) == 1 and weight.stride(1) == 1, lambda: "skinny_gemm: K must be the unit stride")
    rows, columns = x.shape
    features = weight.shape[0]
    # One slice writes the output; several write float32 partial sums (split_k, M, N), added below.
    out = x.new_empty((rows, features)) if split_k == 1 else x.new_empty((split_k, rows, features), dtype=torch.float32)
    grid = (triton.cdiv(features, block_n), triton.cdiv(rows, block_m), split_k)
    with on_device_of(x):
        _skinny_gemm_kernel[grid](
            x,
            weight,
            out,
            rows,
            features,
            columns,
            x.stride(0),
            weight.stride(0),
            out.stride(0) if split_k > 1 else 0,
            out.stride(-2),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            SPLIT_K=split_k,
            num_warps=num_warps,
            num_stages=num_stages,
        )
    return out if split_k == 1 else out.sum(0).to(x.dtype)


@skinny_gemm.register_fake
def _(x, weight, block_m, block_n, block_k, split_k, num_warps, num_stages):
    """Shapes for tracing (torch.compile): an opaque op, captured whole in the step's CUDA graph."""
    return x.new_empty((x.shape[0], weight.shape[0]))
