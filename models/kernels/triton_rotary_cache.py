"""RoPE on one token's queries and keys and its write into a static KV cache, in one Triton kernel.

Imported only where Triton can run (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``, which must be set before
this module is first imported); ``rotary_cache.py`` decides, and rotates and updates the cache as before otherwise.

A decode step's attention layer with its own KVs rotates its query and key and writes key and value into the cache:
compiled, that is three kernels of a few kilobytes each (rotary of Q; rotary of K and its write; the write of V), each
costing its launch. Here program ``(b, p)`` handles row ``b``'s ``p``-th block of heads (``rotary_cache_launch.py``
sets the blocks: a row's heads split over several programs up to 64 rows, whole from 65): its query heads, a
``(heads, D)`` tile, are rotated into the returned queries; its KV heads are rotated into the returned keys and into the
cache's slot ``level`` (the cache layer's fill level, read on the device), and its values are copied there. The last
program to finish advances the level by one, as ``StaticLayer.update`` does after its write: each program counts itself
in ``arrivals`` (an int32 counter, zero between launches) after it has read the level, and the one that brings the
count to the grid's size writes the new level and the zero back. That saves the compiled step a kernel per layer, the
level's ``add_``. Shapes: ``B`` batch, ``Hq``/``Hkv`` query/KV heads, ``D`` head dim (even), ``S`` cache slots. RoPE
as Llama's ``x * cos + rotate_half(x) * sin``, in float32.
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
from .rotary_cache_launch import rotary_cache_launch
from .triton_gemv import on_device_of


@triton.jit
def rotary_row(cos_ptr, sin_ptr, d, D):
    """One row's RoPE tables at lanes ``d`` (``D`` values from each pointer, unit stride; 0 past them), in float32."""
    cos = tl.load(cos_ptr + d, mask=d < D, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + d, mask=d < D, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def rotate_heads(x_ptr, stride_h, heads, cos, sin, d, D, ok):
    """``x * cos + rotate_half(x) * sin`` of the ``heads`` at ``x_ptr`` (stride ``stride_h`` between heads, unit stride
    along the head dim ``D``, even) at lanes ``d``: a ``(BLOCK_H, BLOCK_D)`` float32 tile; ``ok`` masks it."""
    half = D // 2
    partner = tl.where(d < half, d + half, d - half)
    sign = tl.where(d < half, -1.0, 1.0)
    rows = x_ptr + heads[:, None] * stride_h
    x = tl.load(rows + d[None, :], mask=ok, other=0.0).to(tl.float32)
    rotated_half = sign[None, :] * tl.load(rows + partner[None, :], mask=ok, other=0.0).to(tl.float32)
    return x * cos[None, :] + rotated_half * sin[None, :]


@triton.jit
def _rotary_cache_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    key_cache_ptr,
    value_cache_ptr,
    level_ptr,
    arrivals_ptr,
    q_out_ptr,
    k_out_ptr,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    stride_cos_b,
    stride_sin_b,
    stride_kcb,
    stride_kch,
    stride_kcs,
    stride_vcb,
    stride_vch,
    stride_vcs,
    stride_qob,
    stride_qoh,
    stride_kob,
    stride_koh,
    Hq,
    Hkv,
    D,
    S,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ADVANCE: tl.constexpr,
    PDL: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)  # of the row's heads
    if PDL:  # the query, key and value are the previous kernel's product
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    cos, sin = rotary_row(cos_ptr + b * stride_cos_b, sin_ptr + b * stride_sin_b, d, D)

    # int64 heads: a head's offset in the cache (head x S x D) passes 2**31 in a long cache with many KV heads
    query_heads = block * BLOCK_HQ + tl.arange(0, BLOCK_HQ).to(tl.int64)
    query_ok = (query_heads < Hq)[:, None] & d_ok[None, :]
    query = rotate_heads(q_ptr + b * stride_qb, stride_qh, query_heads, cos, sin, d, D, query_ok)
    query_out = q_out_ptr + b * stride_qob + query_heads[:, None] * stride_qoh + d[None, :]
    tl.store(query_out, query.to(q_out_ptr.dtype.element_ty), mask=query_ok)

    kv_heads = block * BLOCK_HKV + tl.arange(0, BLOCK_HKV).to(tl.int64)
    kv_ok = (kv_heads < Hkv)[:, None] & d_ok[None, :]
    level = tl.load(level_ptr + 0 * d)  # the fill level in every lane: a block, as the masks are
    write_ok = kv_ok & (level < S)[None, :]  # never past the cache's last slot
    key = rotate_heads(k_ptr + b * stride_kb, stride_kh, kv_heads, cos, sin, d, D, kv_ok)
    key = key.to(k_out_ptr.dtype.element_ty)
    tl.store(k_out_ptr + b * stride_kob + kv_heads[:, None] * stride_koh + d[None, :], key, mask=kv_ok)
    slot = kv_heads[:, None] * stride_kch + level[None, :] * stride_kcs + d[None, :]
    tl.store(key_cache_ptr + b * stride_kcb + slot, key, mask=write_ok)
    value = tl.load(v_ptr + b * stride_vb + kv_heads[:, None] * stride_vh + d[None, :], mask=kv_ok)
    slot = kv_heads[:, None] * stride_vch + level[None, :] * stride_vcs + d[None, :]
    tl.store(value_cache_ptr + b * stride_vcb + slot, value, mask=write_ok)
    if ADVANCE:  # the level grows once every row has read it: the last program to arrive advances it
        tl.debug_barrier()  # every lane's read of the level comes before the program's count (acq_rel orders the rest)
        counted = d == 0
        arrived = tl.atomic_add(arrivals_ptr + 0 * d, 1, mask=counted, sem="acq_rel")
        last = counted & (arrived == tl.num_programs(0) * tl.num_programs(1) - 1)
        tl.store(level_ptr + 0 * d, level + 1, mask=last)
        tl.store(arrivals_ptr + 0 * d, 0, mask=last)


def batch_stride(tensor: torch.Tensor) -> int:
    """The stride between ``tensor``'s rows along dim 0; 0 for one row that serves every row of the batch (RoPE tables
    of positions ``(1, T)``, a mask broadcast over the batch)."""
    return tensor.stride(0) if tensor.shape[0] > 1 else 0


def _rotate_and_write(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    level: torch.Tensor,
    arrivals: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's launch for both ops below; with ``arrivals`` the level grows by one too."""
    torch._check(
        all(t.stride(-1) == 1 for t in (query, key, value, cos, sin, key_cache, value_cache)),
        lambda: "rotary_cache_write: D must be the unit stride",
    )
    batch, query_heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    query_out, key_out = query.new_empty(query.shape), key.new_empty(key.shape)
    launch = rotary_cache_launch(batch, query_heads, kv_heads, head_dim)
    pdl = dependent_launch(query.device)
    with on_device_of(query):
        _rotary_cache_kernel[(batch, launch.programs_per_row)](
            query,
            key,
            value,
            cos,
            sin,
            key_cache,
            value_cache,
            level,
            level if arrivals is None else arrivals,  # never read without ADVANCE
            query_out,
            key_out,
            query.stride(0),
            query.stride(1),
            key.stride(0),
            key.stride(1),
            value.stride(0),
            value.stride(1),
            batch_stride(cos),
            batch_stride(sin),
            *key_cache.stride()[:3],
            *value_cache.stride()[:3],
            query_out.stride(0),
            query_out.stride(1),
            key_out.stride(0),
            key_out.stride(1),
            query_heads,
            kv_heads,
            head_dim,
            key_cache.shape[2],
            BLOCK_HQ=launch.block_hq,
            BLOCK_HKV=launch.block_hkv,
            BLOCK_D=launch.block_d,
            ADVANCE=arrivals is not None,
            PDL=pdl,
            num_warps=launch.num_warps,
            launch_pdl=pdl,
        )
    return query_out, key_out


@custom_op("lckv::rotary_cache_write", mutates_args=("key_cache", "value_cache"))
def rotary_cache_write(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    level: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on ``query (B, Hq, 1, D)`` and ``key (B, Hkv, 1, D)`` with ``cos``/``sin`` ``(B or 1, 1, D)``; the rotated
    key and ``value (B, Hkv, 1, D)`` written into ``key_cache``/``value_cache`` ``(B, Hkv, S, D)`` at slot ``level``
    (a 0-d int64 tensor, the cache layer's fill level, read only; at ``S`` or beyond nothing is written). Every last
    dim has unit stride. Returns the rotated queries and keys, ``(B, Hq, 1, D)`` and ``(B, Hkv, 1, D)``."""
    return _rotate_and_write(query, key, value, cos, sin, key_cache, value_cache, level, None)


@custom_op("lckv::rotary_cache_write_advance", mutates_args=("key_cache", "value_cache", "level", "arrivals"))
def rotary_cache_write_advance(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    level: torch.Tensor,
    arrivals: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary_cache_write``, and the level then grows by one, advanced by the kernel's last program: ``arrivals``
    is a 1-element int32 counter on the device, zero before and after."""
    return _rotate_and_write(query, key, value, cos, sin, key_cache, value_cache, level, arrivals)


def _rotated_like(query, key, *written):
    """Shapes for tracing (torch.compile): both ops are opaque; they write ``written`` (the cache tensors, and for the
    advancing op the level and its counter) in place and return tensors like ``query`` and ``key``."""
    return query.new_empty(query.shape), key.new_empty(key.shape)


rotary_cache_write.register_fake(_rotated_like)
rotary_cache_write_advance.register_fake(_rotated_like)
