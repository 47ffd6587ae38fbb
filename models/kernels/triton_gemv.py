"""Matrix-vector products for a few rows (GEMV): ``x (M, K) @ weight (N, K)^T -> (M, N)``, M small.

Imported only where Triton can run (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``, set before this module
is first imported); ``small_batch_linear.py`` decides, and runs ``F.linear`` otherwise.

At one row a linear layer reads its weight once and does two FLOPs per weight value: its time is the weight's bytes
over the memory bandwidth. cuBLAS tiles such a product 64 output features per thread block, which leaves most of an
H200's 132 multiprocessors idle on a 2048-feature layer. Here program ``p`` computes row ``p % M`` of the output for
``BLOCK_N`` output features, reading ``BLOCK_N`` weight rows whole in ``BLOCK_K`` steps: ``M * ceil(N / BLOCK_N)``
programs, several per multiprocessor at the launches ``small_batch_linear.gemv_launch`` picks. Products accumulate in
float32 over each program's ``BLOCK_K`` columns and are summed once at the end.

``small_batch_swiglu_gemv`` is the same product whose input is SwiGLU of a fused gate/up product, computed as the row
is read: ``silu(gate) * up`` in float32, rounded once to the input dtype (as the compiled step's fused kernel rounds
it). At one row that elementwise kernel costs more than its bytes (about 1.1 us of a 1.1 ms TinyLlama step per layer,
docs/fast_decode.md); here each program recomputes the few thousand values it reads, from L2.
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
    SWIGLU: tl.constexpr,
):
    pid = tl.program_id(0)
    m = pid % M
    features = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    feature_ok = features < N
    columns = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + features[:, None].to(tl.int64) * stride_wn + columns[None, :]
    x_ptrs = x_ptr + m.to(tl.int64) * stride_xm + columns
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for step in range(0, tl.cdiv(K, BLOCK_K)):
        column_ok = columns < K - step * BLOCK_K
        w = tl.load(w_ptrs, mask=feature_ok[:, None] & column_ok[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=column_ok, other=0.0)
        if SWIGLU:  # x_ptr holds gate, and up K columns further along the row
            gate = x.to(tl.float32)
            up = tl.load(x_ptrs + K, mask=column_ok, other=0.0).to(tl.float32)
            x = (gate * tl.sigmoid(gate) * up).to(x_ptr.dtype.element_ty)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
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
    return _launch(x, weight, x.shape[1], block_n, block_k, num_warps, swiglu=False)


@custom_op("lckv::small_batch_swiglu_gemv", mutates_args=())
def small_batch_swiglu_gemv(
    gate_up: torch.Tensor, weight: torch.Tensor, block_n: int, block_k: int, num_warps: int
) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up (M, 2K)`` (gate then up, unit stride along the row) times ``weight (N, K)``
    transposed -> ``(M, N)`` in gate_up's dtype; the launch as ``small_batch_gemv``'s for ``(N, K)``."""
    torch._check(
        gate_up.shape[1] == 2 * weight.shape[1],
        lambda: f"small_batch_swiglu_gemv: gate_up {tuple(gate_up.shape)} is not gate and up of K={weight.shape[1]}",
    )
    return _launch(gate_up, weight, weight.shape[1], block_n, block_k, num_warps, swiglu=True)


def _launch(
    x: torch.Tensor, weight: torch.Tensor, columns: int, block_n: int, block_k: int, num_warps: int, swiglu: bool
) -> torch.Tensor:
    """The kernel over ``rows * ceil(features / block_n)`` programs, into a new ``(rows, features)`` output."""
    torch._check(x.stride(1) == 1 and weight.stride(1) == 1, lambda: "small_batch_gemv: K must be the unit stride")
    rows, features = x.shape[0], weight.shape[0]
    out = x.new_empty((rows, features))
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
            SWIGLU=swiglu,
            num_warps=num_warps,
        )
    return out


@small_batch_gemv.register_fake
@small_batch_swiglu_gemv.register_fake
def _(x, weight, block_n, block_k, num_warps):
    """Shapes for tracing (torch.compile): an opaque op, captured whole in the step's CUDA graph."""
    return x.new_empty((x.shape[0], weight.shape[0]))
