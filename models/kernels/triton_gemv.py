"""Matrix-vector products for a few rows (GEMV): ``x (M, K) @ weight (N, K)^T -> (M, N)``, M small.

Imported only where Triton can run (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``, set before this module
is first imported); ``small_batch_linear.py`` decides, and runs ``F.linear`` otherwise.

At one row a linear layer reads its weight once and does two FLOPs per weight value: its time is the weight's bytes
over the memory bandwidth. cuBLAS tiles such a product 64 output features per thread block, which leaves most of an
H200's 132 multiprocessors idle on a 2048-feature layer. Here program ``p`` computes row ``p % M`` of the output for
``BLOCK_N`` output features, reading ``BLOCK_N`` weight rows whole in ``BLOCK_K`` steps: ``M * ceil(N / BLOCK_N)``
programs, several per multiprocessor at the launches ``small_batch_linear.gemv_launch`` picks. Products accumulate in
float32 over each program's ``BLOCK_K`` columns and are summed once at the end.

Under programmatic dependent launch (``dependent_launch.py``) a program reads its first weight tile before it waits for
the previous kernel's output (its input row): the weights never depend on it.
"""

import contextlib

import torch
from torch.library import custom_op
from transformers.utils.import_utils import is_triton_available

# Always true where this module is imported; the guard keeps transformers' remote-code import check (which skips
# `if is_..._available()` blocks) from requiring Triton where an exported checkpoint is loaded.
if is_triton_available():
    import triton
    import triton.language as tl

from .dependent_launch import dependent_launch


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    m = pid % M
    features = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    feature_ok = features < N
    columns = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + features[:, None].to(tl.int64) * stride_wn + columns[None, :]
    x_ptrs = x_ptr + m.to(tl.int64) * stride_xm + columns
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    # Each step multiplies the weight tile read one step earlier: the first is read before the input is waited for.
    w = tl.load(w_ptrs, mask=feature_ok[:, None] & (columns < K)[None, :], other=0.0)
    if PDL:  # the weights never depend on the previous kernel, the input does
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    for step in range(0, tl.cdiv(K, BLOCK_K)):
        column_ok = columns < K - step * BLOCK_K
        x = tl.load(x_ptrs, mask=column_ok, other=0.0)
        current = w
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        w = tl.load(w_ptrs, mask=feature_ok[:, None] & (columns < K - (step + 1) * BLOCK_K)[None, :], other=0.0)
        acc += current.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + features, y.to(y_ptr.dtype.element_ty), mask=feature_ok)


def on_device_of(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it ``tensor``'s for the launch (a model on cuda:1, eager)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@custom_op("lckv::small_batch_gemv", mutates_args=())
def small_batch_gemv(x: torch.Tensor, weight: torch.Tensor, block_n: int, block_k: int, num_warps: int) -> torch.Tensor:
    """``x (M, K)`` (unit stride along K) times ``weight (N, K)`` (contiguous) transposed -> ``(M, N)`` in x's dtype.

    The launch (``small_batch_linear.GemvLaunch``, fixed by the shapes): ``block_n`` output features and ``block_k``
    columns per program step (powers of two), ``num_warps``.
    """
    torch._check(x.stride(1) == 1 and weight.stride(1) == 1, lambda: "small_batch_gemv: K must be the unit stride")
    rows, columns = x.shape
    features = weight.shape[0]
    out = x.new_empty((rows, features))
    pdl = dependent_launch(x.device)
    with on_device_of(x):
        _gemv_kernel[(rows * triton.cdiv(features, block_n),)](
            x,
            weight,
            out,
            rows,
            features,
            columns,
            x.stride(0),
            weight.stride(0),
            out.stride(0),
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            PDL=pdl,
            num_warps=num_warps,
            launch_pdl=pdl,
        )
    return out


@small_batch_gemv.register_fake
def _(x, weight, block_n, block_k, num_warps):
    """Shapes for tracing (torch.compile): an opaque op, captured whole in the step's CUDA graph."""
    return x.new_empty((x.shape[0], weight.shape[0]))
