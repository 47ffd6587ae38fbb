"""sdpa_split_kv: the split-KV decoding kernel (run on the CPU by Triton's interpreter) equals SDPA with the full mask,
reads no slot past a row's last visible one, keeps the compiled decode step one graph, and generates the dynamic
cache's tokens; without the kernel it is the packed SDPA fallback."""

import dataclasses
import sys
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import pytest
import torch
from torch.nn import functional as F
from transformers import StaticCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from models import SPLIT_KV
from models.fused_projections import fuse_projections
from models.kernels import KernelSelection, decode_attention
from models.kernels.attention import fast_attention, packed_decode_attention, packed_sdpa_attention
from models.kernels.decode_attention import (
    SplitKvKernel,
    runs_split_kv,
    split_kv_decode_attention,
    split_kv_sdpa_attention,
    visible_lengths,
)
from models.kernels.decode_launch import DEFAULT, KernelConfig
from models.kernels.plain import plain_apply_rotary_pos_emb

from .conftest import tiny_config, tiny_model
from .numerics import FLOAT32_UNIT_ROUNDOFF
from .test_static_cache import assert_decode_step_compiles_once, left_padded_batch

SLOTS, DIM = 150, 16  # 150 slots: three 64-slot tiles, the last one partial
NEW = 4  # generated tokens: each decoding step runs the interpreted kernel in every layer
# The float32 exp's relative error, in units of float32's unit roundoff u: within 2 ulps (4 u); measured at most 1.7 u
# for numpy's exp2 (the kernel's, under Triton's interpreter) and 1.05 u for ATen's CPU exp
EXP_ERROR = 4


class Float64Attention(NamedTuple):
    """Attention in float64 (KV heads repeated per group, scale ``D ** -0.5``) and the error bound of a float32
    computation of it: ``(B, Hq, L, S)`` per weight, ``(B, Hq, L, D)`` per output (``L`` queries, ``S`` keys)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    visible: torch.Tensor  # (B, 1, L, S) bool
    scores: torch.Tensor  # scaled q . k, -inf where masked
    weights: torch.Tensor  # the softmax, 0 where masked (and in a row without a visible key)
    out: torch.Tensor
    weight_error: torch.Tensor  # relative, of a weight exp(s_j - running max) before the normalisation
    bound: torch.Tensor  # absolute, of the output


def float64_attention(query, key, value, mask, rescales: int) -> Float64Attention:
    """``query`` ``(B, Hq, L, D)`` on ``key`` / ``value`` ``(B, Hkv, S, D)`` under the bool ``mask`` (broadcast to
    ``(B, 1, L, S)``; None: every slot visible), with the error bound of float32 attention. ``rescales``: how many times
    the float32 computation rescales a weight by a new running max (a later tile of its split, the merge of splits).
    First order in u (products of two errors are below 1e-9 relative here), any summation order; counts of roundings
    below are in units of u."""
    group = query.shape[1] // key.shape[1]
    query, key, value = query.double(), *(t.double().repeat_interleave(group, 1) for t in (key, value))
    dim = query.shape[-1]
    scale = dim**-0.5
    visible = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool) if mask is None else mask
    visible = visible.expand(query.shape[0], 1, *visible.shape[-2:])
    scores = (scale * query @ key.transpose(-1, -2)).masked_fill(~visible, float("-inf"))  # (B, Hq, L, S)
    weights = scores.softmax(-1).nan_to_num(0.0)  # a row without a visible key: NaN -> 0
    out = weights @ value
    # A score: a float32 dot product of D terms, the scaling (of the query or of the product) and the product's
    # rounding: at most D + 2 roundings, each of at most scale * sum_i |q_i k_i| (>= |score|).
    score_error = (dim + 2) * scale * (query.abs() @ key.abs().transpose(-1, -2))
    # A weight exp(s_j - running max), relative: the score's error; the subtraction, at most top - s_j; the exp. Each
    # rescale by exp(old max - new max): its subtraction, at most the scores' spread, and its exp.
    top = scores.amax(-1, keepdim=True)
    spread = top - scores.masked_fill(~visible, float("inf")).amin(-1, keepdim=True)
    weight_error = score_error + (top - scores) + EXP_ERROR + rescales * (spread + EXP_ERROR)
    weight_error = FLOAT32_UNIT_ROUNDOFF * torch.where(visible, weight_error, 0.0)
    # A weight's relative error is shared by the weighted sum and the normaliser (the sum of the weights): to first
    # order it moves the output by w_j * error_j * (v_j - output).
    shared = torch.einsum("bhls,bhlsd->bhld", weights * weight_error, (value[:, :, None] - out[:, :, :, None]).abs())
    # The weighted sum's and the normaliser's own roundings: T visible terms, at most T - 1 inexact additions on any
    # term's path (a masked slot adds an exact 0), the product p_j * v_j, one product per rescale, the normalisation
    # (a division, or a reciprocal and a product): relative to sum_j w_j |v_j| and to |output|.
    roundings = visible.sum(-1, keepdim=True) + rescales + 2
    sums = FLOAT32_UNIT_ROUNDOFF * roundings * (weights @ value.abs() + out.abs())
    return Float64Attention(query, key, value, visible, scores, weights, out, weight_error, shared + sums)


def attention_bound(query, key, value, mask, rescales: int) -> torch.Tensor:
    """``float64_attention``'s bound on |float32 attention - exact| per output element, laid out as SDPA's output
    transposed, ``(B, L, Hq, D)``."""
    return float64_attention(query, key, value, mask, rescales).bound.transpose(1, 2)


def assert_within_bound(got: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str = "") -> None:
    """``got`` (float32) within ``bound`` of ``expected`` (float64) element by element."""
    assert got.dtype == torch.float32 and expected.dtype == torch.float64
    error = (got.double() - expected).abs()
    assert (error <= bound).all(), f"{what} |float32 - float64| / bound up to {(error / bound).max():.3g}"


def decode_inputs(batch: int, heads: int, kv_heads: int, seed: int = 0, dim: int = DIM):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, 1, dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, SLOTS, dim, generator=generator) for _ in range(2))
    return query, key, value


def cache_mask(spans: list[tuple[int, int]], strict: bool = False) -> torch.Tensor:
    """``(B, 1, 1, SLOTS)`` bool mask of a static cache: row ``b`` holds tokens in slots ``[pad, filled)`` (left
    padding before, unfilled slots after); ``strict`` hides the current token's slot, ``filled - 1``."""
    mask = torch.zeros(len(spans), 1, 1, SLOTS, dtype=torch.bool)
    for row, (pad, filled) in enumerate(spans):
        mask[row, ..., pad : filled - 1 if strict else filled] = True
    return mask


def sdpa_reference(query, key, value, mask) -> torch.Tensor:
    """SDPA on the full cache with the full mask, KV heads expanded: ``(B, 1, Hq, D)``, in the inputs' dtype."""
    group = query.shape[1] // key.shape[1]
    expanded = [t.repeat_interleave(group, dim=1) for t in (key, value)]
    return F.scaled_dot_product_attention(query, *expanded, attn_mask=mask).transpose(1, 2)


def assert_equals_float64_sdpa(out, query, key, value, mask, block_n: int = DEFAULT.block_n):
    """``out``, the float32 kernel's, within ``attention_bound`` of SDPA in float64 (inputs upcast: exact to ~1e-16).
    The kernel rescales a weight once per later ``block_n``-slot tile of its split and once in the merge: at most
    ``ceil(S / block_n)`` times."""
    expected = sdpa_reference(query.double(), key.double(), value.double(), mask)
    assert_within_bound(out, expected, attention_bound(query, key, value, mask, rescales=-(-key.shape[2] // block_n)))


def run_kernel(kernel, query, key, value, mask, splits: int, config: KernelConfig = DEFAULT) -> torch.Tensor:
    """The op on a ``(B, 1, 1, S)`` mask with ``splits`` parts per row and ``config``'s tile, warps and stages."""
    rows = mask[:, 0, 0]
    return kernel(
        query,
        key,
        value,
        rows,
        visible_lengths(rows),
        query.shape[-1] ** -0.5,
        splits,
        config.block_n,
        config.num_warps,
        config.num_stages,
    )


def watched_split_kv(monkeypatch, kernel: SplitKvKernel, run: Callable) -> KernelSelection:
    """``kernel`` with ``run`` as its decode op on the CPU: in the returned selection (pass it to an LCKV model as
    ``kernel_selection``) and, for other models (Llama), in transformers' ``sdpa_split_kv`` registration."""
    kernel = dataclasses.replace(kernel, run=run)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, SPLIT_KV, partial(split_kv_sdpa_attention, kernel=kernel))
    return dataclasses.replace(KernelSelection.from_environ(), split_kv=kernel)


# spans per row: partly filled, different lengths, left padding, one filled up to the last slot
SPANS = [(0, 100), (5, 70), (0, SLOTS), (40, 41)]


@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("splits", [1, 3, 8])  # 8 > 3 tiles: some splits are empty
def test_kernel_equals_sdpa_with_full_mask(interpreted_kernel, heads, kv_heads, splits):
    query, key, value = decode_inputs(len(SPANS), heads, kv_heads)
    mask = cache_mask(SPANS)
    out = run_kernel(interpreted_kernel, query, key, value, mask, splits)
    assert_equals_float64_sdpa(out, query, key, value, mask)


@pytest.mark.parametrize("dim", [8, 24], ids=["below-16", "not-power-of-2"])
def test_kernel_pads_head_dim(interpreted_kernel, dim):
    query, key, value = decode_inputs(len(SPANS), 4, 2, dim=dim)
    mask = cache_mask(SPANS)
    out = split_kv_decode_attention(
        interpreted_kernel, query, key, value, mask, None
    )  # None: the default 1 / sqrt(dim)
    assert_equals_float64_sdpa(out, query, key, value, mask)


def test_kernel_strict_mask_first_token_outputs_exact_zero(interpreted_kernel):
    """Condensed layers: the current slot is hidden; a row whose only token is the current one sees nothing -> 0."""
    spans = [(0, 100), (3, 4), (7, 90)]  # row 1: its first real token is the query
    query, key, value = decode_inputs(len(spans), 4, 2, seed=1)
    mask = cache_mask(spans, strict=True)
    out = split_kv_decode_attention(interpreted_kernel, query, key, value, mask, DIM**-0.5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    seen = [0, 2]
    assert_equals_float64_sdpa(out[seen], query[seen], key[seen], value[seen], mask[seen])


def test_kernel_never_reads_slots_past_the_last_visible_one(interpreted_kernel):
    """NaN in every slot past each row's span (and in the keys of its masked left padding, which are loaded with
    their tile and masked before the softmax) leaves the output equal to SDPA on the clean cache."""
    query, key, value = decode_inputs(len(SPANS), 8, 2)
    mask = cache_mask(SPANS)
    poisoned_key, poisoned_value = key.clone(), value.clone()
    for row, (_, filled) in enumerate(SPANS):
        poisoned_key[row, :, filled:] = float("nan")
        poisoned_value[row, :, filled:] = float("nan")
    poisoned_key[1, :, :5] = float("nan")
    for splits in (1, 5):
        out = run_kernel(interpreted_kernel, query, poisoned_key, poisoned_value, mask, splits)
        assert_equals_float64_sdpa(out, query, key, value, mask)


def rope_tables(batch: int, dim: int = DIM, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``(B, 1, dim)``, at random angles, laid out as Llama's (each half the same angles)."""
    angles = torch.rand(batch, 1, dim // 2, generator=torch.Generator().manual_seed(seed)) * 6.0
    return torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)


def rotating_kernel(kernel, query, key, value, mask, splits: int, tables) -> torch.Tensor:
    """The op with RoPE tables ``(cos, sin)``: it rotates the queries as it reads them."""
    rows = mask[:, 0, 0]
    launch = (splits, *DEFAULT[:3])
    return kernel(query, key, value, rows, visible_lengths(rows), query.shape[-1] ** -0.5, *launch, *tables)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (6, 2), (4, 4)], ids=["gqa", "groups-of-3", "mha"])
@pytest.mark.parametrize("dim", [8, 16, 24], ids=["below-16", "16", "not-power-of-2"])
def test_kernel_rotates_the_queries(interpreted_kernel, splits, heads, kv_heads, dim):
    """Given RoPE tables, the kernel rotates the queries as it reads them: the attention of the rotated queries (padded
    head dims and query heads included)."""
    query, key, value = decode_inputs(len(SPANS), heads, kv_heads, dim=dim)
    mask = cache_mask(SPANS)
    tables = rope_tables(len(SPANS), dim)
    rotated, _ = plain_apply_rotary_pos_emb(query, None, *tables)
    out = rotating_kernel(interpreted_kernel, query, key, value, mask, splits, tables)
    assert_equals_float64_sdpa(out, rotated, key, value, mask)


def test_batch_one_tables_serve_every_row(interpreted_kernel):
    """Tables of batch 1 (positions ``(1, T)``: a forward without ``position_ids``, the streaming cache) rotate every
    row's queries alike; the kernel never reads past them (other values lie right after them in memory)."""
    query, key, value = decode_inputs(len(SPANS), 8, 2)
    mask = cache_mask(SPANS)
    after = [torch.full((3, 1, DIM), fill) for fill in (7.0, -5.0)]
    cos, sin = (torch.cat([table, rest])[:1] for table, rest in zip(rope_tables(1), after, strict=True))
    rotated, _ = plain_apply_rotary_pos_emb(query, None, cos, sin)
    out = split_kv_decode_attention(interpreted_kernel, query, key, value, mask, None, query_rotation=(cos, sin))
    assert_equals_float64_sdpa(out, rotated, key, value, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_rotation_is_rounded_once(interpreted_kernel, dtype):
    """The kernel rotates in float32 and rounds the rotated queries once to their dtype (as the RoPE + cache-write
    kernel and inductor do): its output equals, bit for bit, the kernel's on queries rotated that way beforehand."""
    query, key, value = (t.to(dtype) for t in decode_inputs(len(SPANS), 6, 2, dim=24))
    mask = cache_mask(SPANS)
    tables = tuple(t.to(dtype) for t in rope_tables(len(SPANS), 24))
    rotated, _ = plain_apply_rotary_pos_emb(query.float(), None, *(t.float() for t in tables))
    fused = rotating_kernel(interpreted_kernel, query, key, value, mask, 3, tables)
    assert torch.equal(fused, rotating_kernel(interpreted_kernel, rotated.to(dtype), key, value, mask, 3, ()))


def test_float64_queries_are_rotated_in_float64(interpreted_kernel):
    """The kernel rotates in float32; float64 queries handed over with their tables are rotated first, in float64, so
    a float64 decode keeps float64's accuracy (rotated in the kernel it was off by ~6e-8)."""
    query, key, value = (t.double() for t in decode_inputs(len(SPANS), 8, 2))
    mask = cache_mask(SPANS)
    tables = tuple(t.double() for t in rope_tables(len(SPANS)))
    rotated, _ = plain_apply_rotary_pos_emb(query, None, *tables)
    out = split_kv_decode_attention(interpreted_kernel, query, key, value, mask, None, query_rotation=tables)
    expected = split_kv_decode_attention(interpreted_kernel, rotated, key, value, mask, None)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_fast_attention_rotates_first_unless_base_runs():
    """``fast_attention`` (``LCKV_FLASH_ATTN``) hands ``query_rotation`` to ``base`` with the query unrotated, and
    applies it itself on its own paths (here the packed GQA decoding)."""
    query, key, value = decode_inputs(2, 8, 2)
    mask = cache_mask([(0, 100), (5, 70)])
    tables = rope_tables(2)
    rotated, _ = plain_apply_rotary_pos_emb(query, None, *tables)
    seen = []

    def base(module, given_query, key, value, mask, **kwargs):
        assert torch.equal(given_query, query)  # not rotated on the way: base rotates it (the kernel, or first)
        seen.append(kwargs.get("query_rotation"))
        return packed_sdpa_attention(module, given_query, key, value, mask, scaling=kwargs["scaling"])

    packed = [
        fast_attention(
            base, None, None, query, key, value, mask, 0.0, DIM**-0.5, pack_decode=pack, query_rotation=tables
        )
        for pack in (True, False)
    ]
    expected = packed_decode_attention(rotated, key, value, mask, 0.0, DIM**-0.5)
    torch.testing.assert_close(packed[0][0], expected)  # its own path: rotated first
    assert len(seen) == 1 and seen[0] is tables  # the base path: handed over (this base leaves it unapplied)


def test_query_rotation_off_the_kernel_is_applied_first(interpreted_split_kv):
    """Where the kernel does not run (two query tokens: a prefill), ``query_rotation`` rotates the queries before the
    SDPA fallback."""
    query, key, value = decode_inputs(2, 4, 4)
    query = torch.cat([query, query.flip(0)], dim=2)  # (B, Hq, 2, D)
    cos, sin = (table.expand(2, 2, DIM) for table in rope_tables(2))
    rotated, _ = plain_apply_rotary_pos_emb(query, None, cos, sin)
    kwargs = dict(scaling=DIM**-0.5, kernel=interpreted_split_kv)
    out, _ = split_kv_sdpa_attention(None, query, key, value, None, query_rotation=(cos, sin), **kwargs)
    expected, _ = split_kv_sdpa_attention(None, rotated, key, value, None, **kwargs)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_no_mask_reads_every_slot(interpreted_split_kv):
    query, key, value = decode_inputs(2, 8, 2)
    out, _ = split_kv_sdpa_attention(None, query, key, value, None, scaling=DIM**-0.5, kernel=interpreted_split_kv)
    assert_equals_float64_sdpa(out, query, key, value, None)


def test_visible_lengths_is_last_visible_slot_plus_one():
    mask = cache_mask([(0, 100), (5, 70), (0, 0), (149, 150)])[:, 0, 0]
    mask[0, 50] = False  # a hole inside the span does not shorten it
    assert visible_lengths(mask).tolist() == [100, 70, 0, 150]
    assert visible_lengths(mask).dtype == torch.int32


@pytest.mark.parametrize("slots", [150, 2500], ids=["one-block", "three-blocks"])  # 1,024 slots per block
def test_mask_view_op_equals_its_pytorch_twin(interpreted_split_kv, slots):
    """``split_kv_mask`` through the kernel's ``view_mask`` op (rows copied, lengths reduced in one kernel) equals
    the PyTorch view, for a mask per row (left padding, a hole, no visible slot, the last slot visible) and for one
    mask broadcast over the batch."""
    mask = torch.zeros(4, 1, 1, slots, dtype=torch.bool)
    mask[0, ..., :100] = True
    mask[1, ..., 5:slots] = True
    mask[1, ..., slots - 20] = False  # a hole inside the span does not shorten it
    mask[3, ..., slots - 1] = True
    for batch, attention_mask in ((4, mask), (3, mask[1:2])):
        viewed = decode_attention.split_kv_mask(attention_mask, batch, slots, mask.device, interpreted_split_kv)
        expected = decode_attention.split_kv_mask(attention_mask, batch, slots, mask.device)
        assert viewed.rows.dtype == torch.bool and viewed.rows.is_contiguous() and viewed.rows.equal(expected.rows)
        assert viewed.lengths.dtype == torch.int32 and viewed.lengths.equal(expected.lengths)
    assert decode_attention.split_kv_mask(mask, 4, slots, mask.device, interpreted_split_kv).lengths.tolist() == [
        100,
        slots,
        0,
        slots,
    ]


def test_dispatch_only_for_one_token_bool_masks(interpreted_split_kv):
    query, key, _ = decode_inputs(2, 8, 2)
    mask = cache_mask([(0, 10), (0, 20)])
    kernel = interpreted_split_kv
    assert runs_split_kv(kernel, query, key, mask, 0.0) and runs_split_kv(kernel, query, key, None, 0.0)
    assert runs_split_kv(kernel, query, key, mask[:1], 0.0)  # a batch-broadcast mask
    assert not runs_split_kv(kernel, query, key, mask, 0.1)  # dropout
    assert not runs_split_kv(kernel, query, key, torch.zeros(mask.shape), 0.0)  # additive float mask
    assert not runs_split_kv(kernel, query, key, mask[..., :-1], 0.0)  # mask shorter than the cache
    assert not runs_split_kv(kernel, torch.cat([query, query], dim=2), key, None, 0.0)  # two query tokens (prefill)
    assert not runs_split_kv(dataclasses.replace(kernel, devices=frozenset({"cuda"})), query, key, mask, 0.0)  # CPU
    assert not runs_split_kv(None, query, key, mask, 0.0)  # no kernel


def test_only_the_kernel_spares_a_strict_layer_its_zeroing(interpreted_split_kv):
    """``KernelSelection.split_kv_decodes``: the split-KV kernel outputs zero for a query without a visible key
    (``test_kernel_strict_mask_first_token_outputs_exact_zero``), so a strict layer skips its own zeroing exactly where
    the kernel runs."""
    query, key, _ = decode_inputs(2, 8, 2)
    mask = cache_mask([(0, 10), (0, 20)], strict=True)
    selection = KernelSelection(split_kv=interpreted_split_kv)
    assert selection.split_kv_decodes(SPLIT_KV, query, key, mask, 0.0)
    assert not selection.split_kv_decodes("sdpa", query, key, mask, 0.0)
    assert not selection.split_kv_decodes(SPLIT_KV, torch.cat([query, query], dim=2), key, mask, 0.0)
    assert not selection.split_kv_decodes(SPLIT_KV, query, key, mask, 0.1)
    assert not KernelSelection().split_kv_decodes(SPLIT_KV, query, key, mask, 0.0)


def test_without_kernel_it_is_the_packed_sdpa_fallback():
    """No Triton kernel for CPU tensors (no interpreter): every call is sdpa_packed_gqa, bit for bit."""
    from models.kernels.decode_attention import load_split_kv_kernel

    kernel = load_split_kv_kernel({})
    assert kernel is None or "cpu" not in kernel.devices
    query, key, value = decode_inputs(len(SPANS), 8, 2)
    mask = cache_mask(SPANS)
    fallback, _ = split_kv_sdpa_attention(None, query, key, value, mask, scaling=DIM**-0.5, kernel=kernel)
    packed, _ = packed_sdpa_attention(None, query, key, value, mask, scaling=DIM**-0.5)
    assert torch.equal(fallback, packed)


def test_fast_attention_leaves_decoding_to_split_kv(monkeypatch):
    """With LCKV_FLASH_ATTN on, the packed GQA decoding is used for every backend except sdpa_split_kv."""
    from models.kernels.flags import FLASH_ATTN

    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    selection = KernelSelection.from_environ({FLASH_ATTN: "1"})
    assert selection.attention_interface(SPLIT_KV).keywords == {"pack_decode": False}
    assert selection.attention_interface("sdpa").keywords == {"pack_decode": True}


def llama_mha_config():
    return tiny_config(
        "llama_tiny.json",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        vocab_size=256,
        num_attention_heads=4,
        num_key_value_heads=4,
    )


@pytest.mark.parametrize(
    "config_fn",
    [
        tiny_config,
        partial(tiny_config, iteration_style="previous", force_nodiag=True),
        llama_mha_config,
    ],
    ids=["opt-llama-gqa", "opt-llama-previous", "llama-mha"],
)
def test_generation_equals_dynamic_cache(interpreted_split_kv, monkeypatch, config_fn):
    """Greedy tokens and every step's logits through the kernel (static cache, left padding) = the dynamic cache with
    transformers' sdpa; an LCKV model's condensed layers hand their queries unrotated, with the RoPE tables, to the
    kernel (logits within float32 rounding: queries left unrotated would move them by ~1e-3)."""
    config = config_fn()
    rotating = []  # per call: whether the op got the RoPE tables (cos, sin after the ten other arguments)
    run = interpreted_split_kv.run
    selection = watched_split_kv(monkeypatch, interpreted_split_kv, lambda *a: rotating.append(len(a) > 10) or run(*a))
    model_kwargs = {"kernel_selection": selection} if config.model_type == "opt-llama" else {}
    ids, mask = left_padded_batch(config.vocab_size)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    kwargs |= dict(output_logits=True, return_dict_in_generate=True)
    dynamic = tiny_model(config, attn_implementation="sdpa").generate(ids, **kwargs)
    static = tiny_model(config, attn_implementation=SPLIT_KV, **model_kwargs).generate(
        ids, cache_implementation="static", **kwargs
    )
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), rtol=0, atol=2e-5)
    sources = getattr(config, "layer_kv_sources", range(config.num_hidden_layers))  # a Llama: every layer its own
    condensed = [source != layer for layer, source in enumerate(sources)]
    assert rotating == condensed * (NEW - 1)  # every layer of every decoding step
    assert any(condensed) == (config.model_type != "llama")
    assert torch.equal(static.sequences, dynamic.sequences)


def test_decoding_without_position_ids_equals_sdpa(interpreted_split_kv, monkeypatch):
    """A plain forward of one token per row without ``position_ids`` (the model makes them ``(1, T)``, so the RoPE
    tables have batch 1) through the kernel, at batch 2 after a prefill: the logits of SDPA."""
    rotating = []
    run = interpreted_split_kv.run
    selection = watched_split_kv(monkeypatch, interpreted_split_kv, lambda *a: rotating.append(len(a) > 10) or run(*a))
    ids = torch.randint(3, tiny_config().vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    logits = []
    models = (
        tiny_model(tiny_config(), attn_implementation=SPLIT_KV, kernel_selection=selection),
        tiny_model(tiny_config()),
    )
    for model in models:  # two configs: a model reads its attention implementation from its config at every call
        cache = StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            model(ids[:, :6], cache=cache, use_cache=True)
            logits.append(model(ids[:, 6:], cache=cache, use_cache=True).logits)
    assert any(rotating)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=2e-5)


def test_an_lckv_step_makes_each_masks_kernel_view_once(interpreted_split_kv, monkeypatch):
    """Layers sharing a mask share the kernel's view of it: one ``split_kv_mask`` per mask kind and decoding step (a
    compiled step ran its reduction and copy per layer on a GPU, 18 of each in a TinyLlama LCKV step), and every
    layer's kernel gets the lengths of its own mask; the tokens stay those of the dynamic cache."""
    from models import modeling_opt_llama

    config = tiny_config()
    lengths_calls, kernel_lengths = [], []
    monkeypatch.setattr(
        modeling_opt_llama,
        "split_kv_mask",
        lambda *args: lengths_calls.append(1) or decode_attention.split_kv_mask(*args),
    )

    def run(query, key, value, mask, lengths, *launch):
        kernel_lengths.append(lengths.tolist())
        assert mask is not None and lengths.equal(visible_lengths(mask))  # the lengths of this layer's own mask
        return interpreted_split_kv.run(query, key, value, mask, lengths, *launch)

    selection = watched_split_kv(monkeypatch, interpreted_split_kv, run)
    model = tiny_model(config, attn_implementation=SPLIT_KV, kernel_selection=selection)
    ids, mask = left_padded_batch(config.vocab_size)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert static.equal(tiny_model(config, attn_implementation="sdpa").generate(ids, **kwargs))
    kinds = len(set(model.model.mask_kinds))
    assert kinds < config.num_hidden_layers and len(lengths_calls) == (NEW - 1) * kinds
    assert len(kernel_lengths) == (NEW - 1) * config.num_hidden_layers


def test_compiled_decode_step_is_one_graph(interpreted_kernel):
    """The kernel is one op in the traced decode step: fullgraph, and no recompilation as the cache fills."""
    assert_decode_step_compiles_once(tiny_model(tiny_config(), attn_implementation=SPLIT_KV))


def compiled_step_kernel_sizes(model, slots: int) -> list[int]:
    """Elements each kernel that inductor generates for one decode step iterates over (the attention op and the
    matmuls are external kernels, not counted), after an 8-token prefill of a batch of 2 into ``slots`` slots."""
    import math

    from torch._inductor import config as inductor_config
    from torch._inductor import metrics
    from torch._inductor.scheduler import ExternKernelSchedulerNode, NopKernelSchedulerNode
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=slots)
    ids = torch.randint(3, model.config.vocab_size, (2, 8))
    torch._logging.set_logs(inductor_metrics=True)  # metrics.nodes_num_elem lists the scheduled kernels
    try:
        with torch.no_grad(), inductor_config.patch(fx_graph_cache=False):  # a cache hit would schedule nothing
            model(ids, past_key_values=cache, use_cache=True)
            torch._dynamo.reset()
            metrics.reset()
            step = torch.compile(model.forward, fullgraph=True)
            step(ids[:, -1:], past_key_values=cache, cache_position=torch.tensor([8]), use_cache=True)
    finally:
        torch._logging.set_logs()
    generated = [
        node
        for node, _ in metrics.nodes_num_elem
        if not isinstance(node, (ExternKernelSchedulerNode, NopKernelSchedulerNode))
    ]
    # node.group: (device, its iteration sizes), flat (numel, reduction numel) or per loop level
    return [math.prod(int(size) for size in torch.utils._pytree.tree_leaves(node.group[1])) for node in generated]


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused-projections"])
@pytest.mark.parametrize("config_fn", [tiny_config, llama_mha_config], ids=["opt-llama", "llama"])
def test_compiled_decode_step_writes_the_cache_in_place(interpreted_kernel, config_fn, fused):
    """No kernel of the compiled decode step runs over a whole cache layer: the new token's KVs are written in place,
    by ``index_copy_`` or (fused projections) by the RoPE + cache-write op, which inductor must not turn into a copy of
    the buffers it mutates. An LCKV step that staged its target's KVs and committed them after the block copied that
    layer whole (two K/V buffers read and written per step: 0.5 of 3.8 ms at TinyLlama batch 128 on an H200)."""
    config = config_fn()
    slots = 512
    layer_elements = 2 * config.num_key_value_heads * slots * config.head_dim  # batch 2
    model = tiny_model(config, attn_implementation=SPLIT_KV)
    if fused:
        assert fuse_projections(model) > 0 and model.model.layers[0].self_attn.rotary_cache is not None
    sizes = compiled_step_kernel_sizes(model, slots)
    assert sizes and max(sizes) < layer_elements, (max(sizes), layer_elements)


def test_compiled_decode_step_has_no_kernel_per_layer_for_shared_inputs(interpreted_kernel):
    """What every layer reads the same of in a step is made once: an LCKV step runs no kernel over its masks' slots
    beyond one per mask kind (the copy of the mask its view op reads; each layer's copy of the rows had been a kernel
    of its own), and with the RoPE + cache-write kernel only layer 0 runs a kernel to advance its cache's fill level
    (the step's positions read it; the kernel advances the others'). (That no kernel but the RoPE tables op computes
    the tables is tests/test_rotary_tables.py's.)"""
    slots = 512
    lckv = tiny_model(tiny_config(), attn_implementation=SPLIT_KV)
    fuse_projections(lckv)
    sizes = compiled_step_kernel_sizes(lckv, slots)
    kinds = len(set(lckv.model.mask_kinds))
    assert sum(size >= slots for size in sizes) <= kinds < lckv.config.num_hidden_layers, sorted(sizes)
    own_kv_layers = sum(layer.self_attn.has_own_kv for layer in lckv.model.layers)
    # one-element kernels: layer 0's level, and the step's position (the input of the RoPE tables op, which inductor
    # must make a buffer)
    assert sizes.count(1) <= 2 < own_kv_layers, sorted(sizes)


def test_a_model_holding_the_kernel_pickles(interpreted_kernel, tmp_path):
    """``torch.save`` of a whole opt-llama model with the split-KV kernel selected: the kernel is loaded again."""
    model = tiny_model(tiny_config(), attn_implementation=SPLIT_KV)
    assert model.model.kernel_selection.split_kv is not None
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert loaded.model.kernel_selection.split_kv.devices == model.model.kernel_selection.split_kv.devices
    ids = torch.randint(3, 256, (1, 6))
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(loaded.generate(ids, **kwargs), model.generate(ids, **kwargs))
