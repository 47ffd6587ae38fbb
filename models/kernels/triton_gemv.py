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
the previous kernel's output (its input row): the weights never depend on it. Without it, the plain loop.

The gated variant (``small_batch_silu_gated_gemv``) multiplies a fused gate/up weight ``(2I, K)`` (gate rows, then up
rows) and writes ``silu(gate) * up`` ``(M, I)``: each program reads gate row ``j`` next to up row ``j`` (its
``BLOCK_N`` rows interleave them), so SwiGLU is applied to its own sums, with no extra bytes read and no kernel after.
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
    SILU_GATED: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    m = pid % M
    local = tl.arange(0, BLOCK_N)
    if SILU_GATED:  # N outputs from 2N weight rows: local rows 2i and 2i+1 are gate row j and up row j (= N + j)
        outputs = (pid // M) * (BLOCK_N // 2) + local // 2
        rows = outputs + (local % 2) * N
    else:
        outputs = (pid // M) * BLOCK_N + local
        rows = outputs
    row_ok = outputs < N
    columns = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + columns[None, :]
    x_ptrs = x_ptr + m.to(tl.int64) * stride_xm + columns
    if PDL:  # the first step peeled: its weight tile is read before the wait for the input (the previous kernel's)
        w = tl.load(w_ptrs, mask=row_ok[:, None] & (columns < K)[None, :], other=0.0)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
        x = tl.load(x_ptrs, mask=columns < K, other=0.0)
        acc = w.to(tl.float32) * x.to(tl.float32)[None, :]
        first_step = 1
    else:  # the plain loop pipelines its loads better than the peeled one (docs/fast_decode.md)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        first_step = 0
    for step in range(first_step, tl.cdiv(K, BLOCK_K)):
        column_ok = columns < K - step * BLOCK_K
        x = tl.load(x_ptrs + step * BLOCK_K, mask=column_ok, other=0.0)
        w = tl.load(w_ptrs + step * BLOCK_K, mask=row_ok[:, None] & column_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if SILU_GATED:
        gate, up = tl.split(tl.reshape(y, (BLOCK_N // 2, 2)))
        y = gate * tl.sigmoid(gate) * up
        outputs = (pid // M) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        row_ok = outputs < N
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + outputs, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def on_device_of(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it ``tensor``'s for the launch (a model on cuda:1, eager)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def launch_gemv(
    x: torch.Tensor, weight: torch.Tensor, outputs: int, block_n: int, block_k: int, num_warps: int, silu_gated: bool
) -> torch.Tensor:
    """``_gemv_kernel`` on ``x (M, K)`` and ``weight (N, K)`` -> ``(M, outputs)`` in x's dtype; ``block_n`` weight rows
    per program."""
    torch._check(x.stride(1) == 1 and weight.stride(1) == 1, lambda: "small_batch_gemv: K must be the unit stride")
    rows, columns = x.shape
    out = x.new_empty((rows, outputs))
    pdl = dependent_launch(x.device)
    with on_device_of(x):
        _gemv_kernel[(rows * triton.cdiv(weight.shape[0], block_n),)](
            x,
            weight,
            out,
            rows,
            outputs,
            columns,
            x.stride(0),
            weight.stride(0),
            out.stride(0),
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            SILU_GATED=silu_gated,
            PDL=pdl,
            num_warps=num_warps,
            launch_pdl=pdl,
        )
    return out


@custom_op("lckv::small_batch_gemv", mutates_args=())
def small_batch_gemv(x: torch.Tensor, weight: torch.Tensor, block_n: int, block_k: int, num_warps: int) -> torch.Tensor:
    """``x (M, K)`` (unit stride along K) times ``weight (N, K)`` (contiguous) transposed -> ``(M, N)`` in x's dtype.

    The launch (``small_batch_linear.GemvLaunch``, fixed by the shapes): ``block_n`` output features and ``block_k``
    columns per program step (powers of two), ``num_warps``.
    """
    return launch_gemv(x, weight, weight.shape[0], block_n, block_k, num_warps, silu_gated=False)


@small_batch_gemv.register_fake
def _(x, weight, block_n, block_k, num_warps):
    """Shapes for tracing (torch.compile): an opaque op, captured whole in the step's CUDA graph."""
    return x.new_empty((x.shape[0], weight.shape[0]))


@custom_op("lckv::small_batch_silu_gated_gemv", mutates_args=())
def small_batch_silu_gated_gemv(
    x: torch.Tensor, weight: torch.Tensor, block_n: int, block_k: int, num_warps: int
) -> torch.Tensor:
    """``silu(x @ gate^T) * (x @ up^T)`` for ``x (M, K)`` and a fused ``weight (2I, K)`` (gate rows, then up rows;
    contiguous) -> ``(M, I)`` in x's dtype, the sums in float32 up to the product. The launch as
    ``small_batch_gemv``'s for ``weight``, ``block_n`` (even) counting gate and up rows together."""
    return launch_gemv(x, weight, weight.shape[0] // 2, block_n, block_k, num_warps, silu_gated=True)


@small_batch_silu_gated_gemv.register_fake
def _(x, weight, block_n, block_k, num_warps):
    return x.new_empty((x.shape[0], weight.shape[0] // 2))
