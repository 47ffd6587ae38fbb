"""A step's RoPE tables (cos, sin) in one Triton kernel, as a buffer every layer reads.

Imported only where Triton can run (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``, which must be set before
this module is first imported); ``rotary_cache.py`` decides.

Llama's rotary embedding computes ``cos`` and ``sin`` of ``position * inverse frequency`` once per forward, and every
layer reads them. Compiled, inductor does not keep those tables: they read two small inputs, so its heuristics fuse
their computation into each kernel that uses them, and a layer that hands them to an opaque op (the RoPE + cache-write
kernel) gets its own copy. So a decode step recomputed the tables in each condensed layer's query rotation (at batch
4,096 of TinyLlama LCKV, 0.43 ms of an H200 step where the same kernels took 0.21 ms with the tables as an input) and
copied them for the Llama's cache-write kernels. An opaque op's output is a buffer: computed here once, read by every
layer.

The values are Llama's: ``angle = float32(position) * inv_freq`` (one rounded product, as the float32 outer product
``inv_freq @ position`` gives), ``cos(angle) * scaling`` and ``sin(angle) * scaling`` in float32 (libdevice, as eager
CUDA and inductor compute them), cast to the output dtype, the ``head_dim / 2`` values repeated for the two halves
(``cat((freqs, freqs))``). Shapes: ``B`` rows, ``T`` positions per row, ``D`` head dim (even).
"""

import torch
from torch.library import custom_op
from transformers.utils.import_utils import is_triton_available

# Always true where this module is imported; the guard keeps transformers' remote-code import check (which skips
# `if is_..._available()` blocks) from requiring Triton where an exported checkpoint is loaded.
if is_triton_available():
    import triton
    import triton.language as tl

from .dependent_launch import dependent_launch
from .triton_gemv import on_device_of

TILE = 2048  # table values per program: (positions x half the head dim)


@triton.jit
def _rotary_tables_kernel(
    positions_ptr,
    inv_freq_ptr,
    cos_ptr,
    sin_ptr,
    scaling,
    stride_pb,
    stride_pt,
    T,
    N,
    HALF,
    BLOCK_N: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # the positions are the previous kernels' output
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # flat (b, t) over B x T
    row_ok = rows < N
    position = tl.load(positions_ptr + (rows // T) * stride_pb + (rows % T) * stride_pt, mask=row_ok, other=0)
    half = tl.arange(0, BLOCK_HALF)
    half_ok = half < HALF
    inv_freq = tl.load(inv_freq_ptr + half, mask=half_ok, other=0.0)
    angle = position.to(tl.float32)[:, None] * inv_freq[None, :]
    cos = (tl.cos(angle) * scaling).to(cos_ptr.dtype.element_ty)
    sin = (tl.sin(angle) * scaling).to(sin_ptr.dtype.element_ty)
    ok = row_ok[:, None] & half_ok[None, :]
    first_half = rows[:, None] * (2 * HALF) + half[None, :]
    for offset in tl.static_range(2):  # the halves repeat: cat((freqs, freqs))
        tl.store(cos_ptr + first_half + offset * HALF, cos, mask=ok)
        tl.store(sin_ptr + first_half + offset * HALF, sin, mask=ok)


@custom_op("lckv::rotary_tables", mutates_args=())
def rotary_tables(
    positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` ``(B, T, D)`` in ``dtype`` (contiguous) for integer ``positions (B, T)`` and float32 ``inv_freq
    (D / 2,)``, scaled by ``scaling`` (the rotary module's ``attention_scaling``); see the module docstring."""
    batch, length = positions.shape
    half = inv_freq.shape[0]
    cos = torch.empty((batch, length, 2 * half), dtype=dtype, device=positions.device)
    sin = torch.empty_like(cos)
    rows = batch * length
    if rows == 0:
        return cos, sin
    block_half = triton.next_power_of_2(half)
    block_n = max(1, TILE // block_half)
    pdl = dependent_launch(positions.device)
    with on_device_of(positions):
        _rotary_tables_kernel[(triton.cdiv(rows, block_n),)](
            positions,
            inv_freq,
            cos,
            sin,
            scaling,
            positions.stride(0),
            positions.stride(1),
            length,
            rows,
            half,
            BLOCK_N=block_n,
            BLOCK_HALF=block_half,
            PDL=pdl,
            num_warps=4,
            launch_pdl=pdl,
        )
    return cos, sin


@rotary_tables.register_fake
def _tables_like(positions, inv_freq, scaling, dtype):
    """Shapes for tracing (torch.compile): two new ``(B, T, D)`` tensors of ``dtype``."""
    shape = (*positions.shape, 2 * inv_freq.shape[0])
    return positions.new_empty(shape, dtype=dtype), positions.new_empty(shape, dtype=dtype)
