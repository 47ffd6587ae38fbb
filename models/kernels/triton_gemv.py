"""Matrix-vector products for a few rows (GEMV): ``x (M, K) @ weight (N, K)^T -> (M, N)``, M small.

Imported only where Triton can run (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``, set before this module
is first imported); ``small_batch_linear.py`` decides, and runs ``F.linear`` otherwise.

At one row a linear layer reads its weight once and does two FLOPs per weight value: its time is the weight's bytes
over the memory bandwidth. cuBLAS tiles such a product 64 output features per thread block, which leaves most of an
H200's 132 multiprocessors idle on a 2048-feature layer. Here program ``p`` computes row ``p % M`` of the output for
``BLOCK_N`` output features, reading ``BLOCK_N`` weight rows whole in ``BLOCK_K`` steps: ``M * ceil(N / BLOCK_N)``
programs, several per multiprocessor at the launches ``small_batch_linear.gemv_launch`` picks. Products accumulate in
float32 over each program's ``BLOCK_K`` columns and are summed once at the end.

At one row the weights are read once per step and pass through the L2 first in line for eviction (``evict_first``): what
the step reads again (an LCKV model's condensed layers all read the one target layer's KVs, which the attention asks
the L2 to keep, ``evict_last``) is then not pushed out by the hundreds of megabytes of weights between two layers.

Under programmatic dependent launch (``dependent_launch.py``) a program reads its first weight tile before it waits for
the previous kernel's output (its input row): the weights never depend on it. Without it, the plain loop.

The gated variant (``small_batch_silu_gated_gemv``) multiplies a fused gate/up weight ``(2I, K)`` (gate rows, then up
rows) and writes ``silu(gate) * up`` ``(M, I)``: each program reads gate row ``j`` next to up row ``j`` (its
``BLOCK_N`` rows interleave them), so SwiGLU is applied to its own sums, with no extra bytes read and no kernel after.

The fused variant (``small_batch_gemv_fused``, put into compiled steps by ``gemv_fusion.py``) also takes in the
RMSNorm before the product (each program reads its row once for the mean square, then normalises the input as it
reads it: ``NORM``) and the residual add after it (``RESIDUAL``), with Llama's roundings.
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
def _inverse_rms(row_ptr, K, eps, ROW_BLOCK: tl.constexpr):
    """``1 / sqrt(mean(x^2) + eps)`` of the row of ``K`` values at ``row_ptr`` (``ROW_BLOCK``: a power of two of at
    least ``K``, so the row arrives in one load), summed in float32: RMSNorm's statistics."""
    columns = tl.arange(0, ROW_BLOCK)
    x = tl.load(row_ptr + columns, mask=columns < K, other=0.0).to(tl.float32)
    return tl.rsqrt(tl.sum(x * x, axis=0) / K + eps)


@triton.jit
def _input_step(x_ptrs, norm_ptr, step, K, inverse_rms, BLOCK_K: tl.constexpr, NORM: tl.constexpr):
    """Columns ``[step * BLOCK_K, (step + 1) * BLOCK_K)`` of the product's input row, as float32. With ``NORM`` the
    row is RMSNorm's input and this is its output, rounded as Llama's: the normalised values in the row's dtype, times
    the norm's weight, in that dtype again."""
    columns = tl.arange(0, BLOCK_K)
    column_ok = columns < K - step * BLOCK_K
    x = tl.load(x_ptrs + step * BLOCK_K, mask=column_ok, other=0.0)
    if NORM:
        normalised = (x.to(tl.float32) * inverse_rms).to(x.dtype)
        scale = tl.load(norm_ptr + step * BLOCK_K + columns, mask=column_ok, other=0.0)
        x = (scale.to(tl.float32) * normalised.to(tl.float32)).to(x.dtype)
    return x.to(tl.float32)


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    norm_ptr,
    residual_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    stride_rm,
    eps,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SILU_GATED: tl.constexpr,
    NORM: tl.constexpr,
    ROW_BLOCK: tl.constexpr,
    RESIDUAL: tl.constexpr,
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
    inverse_rms = 1.0
    if PDL:  # the first step peeled: its weight tile is read before the wait for the input (the previous kernel's)
        w = tl.load(w_ptrs, mask=row_ok[:, None] & (columns < K)[None, :], other=0.0, eviction_policy="evict_first")
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
        if NORM:
            inverse_rms = _inverse_rms(x_ptr + m.to(tl.int64) * stride_xm, K, eps, ROW_BLOCK)
        x = _input_step(x_ptrs, norm_ptr, 0, K, inverse_rms, BLOCK_K, NORM)
        acc = w.to(tl.float32) * x[None, :]
        first_step = 1
    else:  # the plain loop pipelines its loads better than the peeled one (docs/fast_decode.md)
        if NORM:
            inverse_rms = _inverse_rms(x_ptr + m.to(tl.int64) * stride_xm, K, eps, ROW_BLOCK)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        first_step = 0
    for step in range(first_step, tl.cdiv(K, BLOCK_K)):
        column_ok = columns < K - step * BLOCK_K
        x = _input_step(x_ptrs, norm_ptr, step, K, inverse_rms, BLOCK_K, NORM)
        w = tl.load(
            w_ptrs + step * BLOCK_K, mask=row_ok[:, None] & column_ok[None, :], other=0.0, eviction_policy="evict_first"
        )
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if SILU_GATED:
        gate, up = tl.split(tl.reshape(y, (BLOCK_N // 2, 2)))
        y = gate * tl.sigmoid(gate) * up
        outputs = (pid // M) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        row_ok = outputs < N
    if RESIDUAL:  # as `residual + product` of two tensors of the output's dtype: the product rounded first
        residual = tl.load(residual_ptr + m.to(tl.int64) * stride_rm + outputs, mask=row_ok, other=0.0)
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + residual.to(tl.float32)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + outputs, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def on_device_of(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it ``tensor``'s for the launch (a model on cuda:1, eager)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def launch_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    outputs: int,
    launch: tuple[int, int, int],
    silu_gated: bool = False,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``_gemv_kernel`` on ``x (M, K)`` and ``weight (N, K)`` -> ``(M, outputs)`` in x's dtype; ``launch`` is
    ``(block_n, block_k, num_warps)``, ``block_n`` weight rows per program. With ``norm_weight`` ``(K,)`` the product's
    input is ``RMSNorm(x)`` (that weight, ``eps``); with ``residual`` ``(M, outputs)`` the output is
    ``residual + product``."""
    torch._check(x.stride(1) == 1 and weight.stride(1) == 1, lambda: "small_batch_gemv: K must be the unit stride")
    block_n, block_k, num_warps = launch
    rows, columns = x.shape
    if norm_weight is not None:
        torch._check(
            norm_weight.shape == (columns,) and norm_weight.stride(0) == 1,
            lambda: f"small_batch_gemv: the norm's weight must be ({columns},) with unit stride",
        )
    if residual is not None:
        torch._check(
            residual.shape == (rows, outputs) and residual.stride(1) == 1,
            lambda: f"small_batch_gemv: the residual must be ({rows}, {outputs}) with unit stride along a row",
        )
    out = x.new_empty((rows, outputs))
    pdl = dependent_launch(x.device)
    with on_device_of(x):
        _gemv_kernel[(rows * triton.cdiv(weight.shape[0], block_n),)](
            x,
            weight,
            out,
            x if norm_weight is None else norm_weight,  # a pointer the kernel does not read without NORM
            out if residual is None else residual,
            rows,
            outputs,
            columns,
            x.stride(0),
            weight.stride(0),
            out.stride(0),
            0 if residual is None else residual.stride(0),
            eps,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            SILU_GATED=silu_gated,
            NORM=norm_weight is not None,
            ROW_BLOCK=triton.next_power_of_2(columns) if norm_weight is not None else 1,
            RESIDUAL=residual is not None,
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
    return launch_gemv(x, weight, weight.shape[0], (block_n, block_k, num_warps))


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
    return launch_gemv(x, weight, weight.shape[0] // 2, (block_n, block_k, num_warps), silu_gated=True)


@small_batch_silu_gated_gemv.register_fake
def _(x, weight, block_n, block_k, num_warps):
    return x.new_empty((x.shape[0], weight.shape[0] // 2))


@custom_op("lckv::small_batch_gemv_fused", mutates_args=())
def small_batch_gemv_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    silu_gated: bool,
    block_n: int,
    block_k: int,
    num_warps: int,
) -> torch.Tensor:
    """``small_batch_gemv`` (or, ``silu_gated``, ``small_batch_silu_gated_gemv``) with the RMSNorm of its input before
    it and a residual add after it, in one kernel (``gemv_fusion.py`` puts it in a compiled step's graph):
    ``residual + (RMSNorm(x) @ weight^T)``, each part optional. ``x (M, K)``; ``norm_weight (K,)`` or None (no norm),
    with ``eps``; ``residual (M, N)`` or None; out ``(M, N)`` in x's dtype (``N``: weight rows, or half of them
    ``silu_gated``), rounded where Llama's separate steps round."""
    outputs = weight.shape[0] // 2 if silu_gated else weight.shape[0]
    launch = (block_n, block_k, num_warps)
    return launch_gemv(x, weight, outputs, launch, silu_gated, norm_weight, eps, residual)


@small_batch_gemv_fused.register_fake
def _(x, weight, norm_weight, eps, residual, silu_gated, block_n, block_k, num_warps):
    return x.new_empty((x.shape[0], weight.shape[0] // 2 if silu_gated else weight.shape[0]))
