"""Split-KV ("flash-decoding") Triton kernels for one query token over a (static) KV cache.

Imported only where Triton can run (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``, which must be
set before this module is first imported); ``decode_attention.py`` decides and falls back to SDPA otherwise.

Shapes: ``B`` batch, ``Hq``/``Hkv`` query/KV heads, ``G = Hq / Hkv``, ``S`` cache slots, ``D`` head dim,
``NS`` splits. Program ``(b, h, s)`` of the first kernel reads KV head ``h`` of row ``b`` once for all ``G``
query heads that share it, over the ``s``-th of ``NS`` equal parts of ``[0, lengths[b])``: slots at or after
the row's length (the unfilled cache) are never loaded. Its partial result is the unnormalised output,
running max and sum (base-2 logits, fp32). The second kernel merges the ``NS`` parts per query head; a row
with no visible key (a strict-mask query on the first real token) merges to exactly zero. With one split (large
batches) the first kernel normalises and writes the output itself, the merge's arithmetic for one part, and the
second kernel does not run.

With ``cos``/``sin`` given, the first kernel applies RoPE to the queries as it loads them (in float32, rounded once to
the queries' dtype, as ``triton_rotary_cache.py`` rotates): an LCKV condensed layer has no keys of its own to rotate,
and its query's rotation was otherwise a kernel of its own in every condensed layer of a decode step.

Where rows are split (a small batch), the keys and values are read with the L2 asked to keep them (``evict_last``):
an LCKV model's condensed layers all read the same target layer's cache in one step, and at a small batch it can stay
in the L2 between them (the batch-1 GEMVs read their weights ``evict_first``). At one split (a large batch) a layer's
KVs are gigabytes read once; lines the L2 keeps last in line for eviction could crowd out what the step's matrix
products reuse from it (their weight tiles). That was not measured, so there they are read as before.

``split_kv_mask_view`` makes what the first kernel reads of a bool mask, its rows and their lengths, in one more
kernel: a model hands the result to all the layers sharing that mask (a compiled step otherwise copied the rows of a
mask made inside the step into each layer's input: inductor recomputes an unrealized input for every op it feeds).
"""

import torch
from torch.library import custom_op
from transformers.utils.import_utils import is_triton_available

# Always true where this module is imported. The guard is for transformers' remote-code import check
# (dynamic_module_utils.get_imports skips `if is_..._available()` blocks): an exported checkpoint bundles this
# file, and must load where Triton is not installed.
if is_triton_available():
    import triton
    import triton.language as tl

from .decode_launch import MIN_DOT  # query heads and head dim are padded to it
from .dependent_launch import dependent_launch
from .triton_rotary_cache import batch_stride, rotary_row, rotate_heads

LOG2E = 1.4426950408889634


@triton.jit
def _kv_tile(pointers, mask, NUM_SPLITS: tl.constexpr):
    """A tile of keys or values (zeros where masked); where rows are split (a small batch) the L2 is asked to keep it
    (``evict_last``)."""
    if NUM_SPLITS > 1:
        tile = tl.load(pointers, mask=mask, other=0.0, eviction_policy="evict_last")
    else:
        tile = tl.load(pointers, mask=mask, other=0.0)
    return tile


@triton.jit
def _partial_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    len_ptr,
    cos_ptr,
    sin_ptr,
    acc_ptr,
    max_ptr,
    sum_ptr,
    out_ptr,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_mb,
    stride_ms,
    stride_ob,
    stride_oh,
    stride_od,
    stride_cos_b,
    stride_sin_b,
    G,
    D,
    scale_log2,
    NUM_SPLITS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ROTATE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # int64: batch x cache strides exceed 2**31 at large batch
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    if PDL:  # everything read here is written by the kernels before (the query, the cache, the lengths)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    length = tl.load(len_ptr + b)
    # Equal parts of the filled span, whole tiles each: the grid is fixed by shapes, the work follows the length.
    chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < G
    d_ok = d < D
    heads = h * G + g
    q_ok = g_ok[:, None] & d_ok[None, :]
    if ROTATE:  # RoPE on the queries (unit stride along D), in float32, rounded once to their dtype
        cos, sin = rotary_row(cos_ptr + b * stride_cos_b, sin_ptr + b * stride_sin_b, d, D)
        q = rotate_heads(q_ptr + b * stride_qb, stride_qh, heads, cos, sin, d, D, q_ok).to(q_ptr.dtype.element_ty)
    else:
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd, mask=q_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    running_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for first in range(start, end, BLOCK_N):
        n = first + tl.arange(0, BLOCK_N)
        ok = n < end
        key_pointers = k_base + n[None, :] * stride_ks + d[:, None] * stride_kd
        keys = _kv_tile(key_pointers, ok[None, :] & d_ok[:, None], NUM_SPLITS)
        logits = tl.dot(q, keys, input_precision=PRECISION) * scale_log2  # (BLOCK_G, BLOCK_N), base-2
        if HAS_MASK:  # left padding and the strict mask: masked slots inside the span
            ok = ok & (tl.load(mask_ptr + b * stride_mb + n * stride_ms, mask=ok, other=0) != 0)
        logits = tl.where(ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, 1))
        # A tile (and everything before it) fully masked keeps the max at -inf: shift by 0 so exp2 gives 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp2(running_max - shift)
        p = tl.exp2(logits - shift[:, None])
        running_sum = running_sum * rescale + tl.sum(p, 1)
        value_pointers = v_base + n[:, None] * stride_vs + d[None, :] * stride_vd
        values = _kv_tile(value_pointers, ok[:, None] & d_ok[None, :], NUM_SPLITS)
        acc = acc * rescale[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
        running_max = new_max

    if NUM_SPLITS == 1:  # the merge of one part: weight 1, no visible key gives 0 / 1 = 0
        out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
        out_offsets = b * stride_ob + heads[:, None] * stride_oh + d[None, :] * stride_od
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        part = (b * G * tl.num_programs(1) + heads) * NUM_SPLITS + split  # partials laid out (B, Hq, NS[, D])
        tl.store(max_ptr + part, running_max, mask=g_ok)
        tl.store(sum_ptr + part, running_sum, mask=g_ok)
        tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_kernel(
    acc_ptr,
    max_ptr,
    sum_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    stride_od,
    Hq,
    D,
    NUM_SPLITS: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    if PDL:  # the partials are the previous kernel's
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    s = tl.arange(0, BLOCK_SPLITS)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < NUM_SPLITS
    part = (b * Hq + h) * NUM_SPLITS + s
    maxes = tl.load(max_ptr + part, mask=s_ok, other=float("-inf"))
    sums = tl.load(sum_ptr + part, mask=s_ok, other=0.0)
    accs = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=s_ok[:, None] & (d < D)[None, :], other=0.0)
    top = tl.max(maxes, 0)
    weights = tl.exp2(maxes - tl.where(top == float("-inf"), 0.0, top))  # empty splits weigh 0
    total = tl.sum(weights * sums, 0)
    out = tl.sum(weights[:, None] * accs, 0) / tl.where(total > 0, total, 1.0)  # no visible key: 0 / 1 = 0
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d * stride_od, out.to(out_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _mask_view_kernel(mask_ptr, rows_ptr, len_ptr, stride_mb, stride_ms, S, BLOCK: tl.constexpr, PDL: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    if PDL:  # the mask is the previous kernel's
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    n = tl.arange(0, BLOCK)
    length = tl.zeros((BLOCK,), tl.int32)  # per lane: the last visible slot + 1 it saw
    for start in range(0, S, BLOCK):
        slots = start + n
        ok = slots < S
        visible = tl.load(mask_ptr + b * stride_mb + slots * stride_ms, mask=ok, other=0) != 0
        tl.store(rows_ptr + b * S + slots, visible, mask=ok)
        length = tl.maximum(length, tl.where(visible, slots + 1, 0))
    tl.store(len_ptr + b + 0 * n, tl.max(length, 0) + 0 * n, mask=n == 0)


@custom_op("lckv::split_kv_mask_view", mutates_args=())
def split_kv_mask_view(mask: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``split_kv_decode`` reads of ``mask``, a bool ``(B or 1, 1, 1, S)`` mask, for ``batch`` rows: its rows
    ``(B, S)`` bool, contiguous, and each row's length ``(B,)`` int32 (the last visible slot + 1, 0 when none)."""
    slots = mask.shape[-1]
    rows = mask.new_empty((batch, slots))
    lengths = torch.empty(batch, dtype=torch.int32, device=mask.device)
    pdl = dependent_launch(mask.device)
    _mask_view_kernel[(batch,)](
        mask,
        rows,
        lengths,
        batch_stride(mask),
        mask.stride(3),
        slots,
        BLOCK=min(1024, triton.next_power_of_2(slots)),
        PDL=pdl,
        num_warps=4,
        launch_pdl=pdl,
    )
    return rows, lengths


@split_kv_mask_view.register_fake
def _(mask, batch):
    """Shapes for tracing (torch.compile)."""
    return mask.new_empty((batch, mask.shape[-1])), mask.new_empty((batch,), dtype=torch.int32)


@custom_op("lckv::split_kv_decode", mutates_args=())
def split_kv_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    lengths: torch.Tensor,
    scaling: float,
    num_splits: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, Hq, 1, D)`` queries on ``(B, Hkv, S, D)`` keys/values -> ``(B, 1, Hq, D)``.

    ``mask``: ``(B, S)`` bool (True = visible) or None; ``lengths``: ``(B,)`` int32, slots past it are not read
    (every slot at or after it must be masked). The launch (``decode_launch.LaunchConfig``, fixed by the shapes):
    ``num_splits`` parts of each row's span, ``block_n`` KV slots per tile (a power of two >= 16), ``num_warps``
    and ``num_stages`` of the first kernel. ``cos``/``sin``: ``(B or 1, 1, D)`` RoPE tables (unit stride along D, as
    the queries), or None: the queries are rotated by the kernel as it reads them, or taken as they are.
    """
    batch, num_heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    group = num_heads // kv_heads
    out = query.new_empty((batch, 1, num_heads, head_dim))
    if num_splits == 1:  # the first kernel writes ``out`` itself: no partials (their pointers are never used)
        acc = maxes = sums = out
    else:
        parts = (batch, num_heads, num_splits)
        acc = query.new_empty((*parts, head_dim), dtype=torch.float32)
        maxes = query.new_empty(parts, dtype=torch.float32)
        sums = query.new_empty(parts, dtype=torch.float32)
    mask_arg = mask if mask is not None else lengths  # never read when HAS_MASK is off
    mask_strides = mask.stride() if mask is not None else (0, 0)
    rotate = cos is not None
    if rotate:
        torch._check(
            query.stride(3) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1,
            lambda: "split_kv_decode: the queries and the RoPE tables need D as the unit stride",
        )
        torch._check(cos.shape[0] in (1, batch), lambda: f"split_kv_decode: RoPE tables of batch {cos.shape[0]}")
    # a batch-1 table (positions (1, T): a forward without position_ids, the streaming cache) serves every row
    tables, table_strides = ((cos, sin), (batch_stride(cos), batch_stride(sin))) if rotate else ((lengths,) * 2, (0, 0))
    block_d = max(MIN_DOT, triton.next_power_of_2(head_dim))
    pdl = dependent_launch(query.device)
    _partial_kernel[(batch, kv_heads, num_splits)](
        query,
        key,
        value,
        mask_arg,
        lengths,
        *tables,  # unread without ROTATE
        acc,
        maxes,
        sums,
        out,
        query.stride(0),
        query.stride(1),
        query.stride(3),
        *key.stride(),
        *value.stride(),
        *mask_strides,
        out.stride(0),
        out.stride(2),
        out.stride(3),
        *table_strides,
        group,
        head_dim,
        scaling * LOG2E,
        NUM_SPLITS=num_splits,
        HAS_MASK=mask is not None,
        ROTATE=rotate,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # exact fp32; bf16/fp16 ignore it
        BLOCK_G=max(MIN_DOT, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        PDL=pdl,
        num_warps=num_warps,
        num_stages=num_stages,
        launch_pdl=pdl,
    )
    if num_splits == 1:
        return out
    _merge_kernel[(batch, num_heads)](
        acc,
        maxes,
        sums,
        out,
        out.stride(0),
        out.stride(2),
        out.stride(3),
        num_heads,
        head_dim,
        NUM_SPLITS=num_splits,
        BLOCK_SPLITS=triton.next_power_of_2(num_splits),
        BLOCK_D=block_d,
        PDL=pdl,
        num_warps=1,
        launch_pdl=pdl,
    )
    return out


@split_kv_decode.register_fake
def _(query, key, value, mask, lengths, scaling, num_splits, block_n, num_warps, num_stages, cos=None, sin=None):
    """Shapes for tracing (torch.compile): an opaque op, captured whole in the step's CUDA graph."""
    return query.new_empty((query.shape[0], 1, query.shape[1], query.shape[3]))
