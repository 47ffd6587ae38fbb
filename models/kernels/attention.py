"""Attention on fast kernels, the strict (diagonal-dropped) mask of condensed layers included.

The strict mask ``kv < q`` over the current tokens with no padding and no cached keys is a causal mask
shifted by one: query ``t`` sees keys ``0..t-1``. So it runs as an ordinary causal attention of queries
``1..T-1`` on keys ``0..T-2``; query 0 sees no key and outputs zero. Causal attention is what flash
kernels do best (flash-attn, or torch SDPA's flash / memory-efficient backends), so no dense mask is built.
The mask builder hands ``STRICT_CAUSAL`` instead of a mask tensor for exactly that case.

Decoding (one query token) with grouped KV heads packs the ``G`` query heads of each KV head into ``G``
query rows of one SDPA head, so each layer reads its (shared) GQA keys and values once instead of
expanding them ``G`` times (``repeat_kv``), and any mask still applies (it is the same for every row).
transformers' own SDPA attention packs only outside ``torch.compile``; inside a compiled decode step
(static cache, CUDA graph) it expands with ``repeat_kv``. ``PACKED_SDPA`` names an attention
implementation, registered with transformers by ``import models`` and usable by any model (Llama
included), that packs in both cases and is transformers' SDPA attention otherwise.
"""

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .plain import plain_apply_rotary_pos_emb, plain_eager_attention

# (module, query (B, Hq, T, D), key (B, Hkv, T, D), value (B, Hkv, T, D), dropout, scaling) -> (B, T, Hq, D)
CausalAttention = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, float, float | None], torch.Tensor]


class StrictCausalMask:
    """Marker mask: ``kv < q`` over the current tokens, no padding, no cached keys (query and key lengths equal)."""

    def __repr__(self) -> str:
        return "STRICT_CAUSAL"


STRICT_CAUSAL = StrictCausalMask()


def sdpa_causal_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """Causal attention through torch SDPA (``is_causal``: flash / efficient backends, GQA without copies)."""
    return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True)[0]


def strict_causal_attention(
    causal: CausalAttention,
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """Attention under ``kv < q`` as a causal attention of ``query[1:]`` on ``key[:-1]``, ``value[:-1]``.

    Args:
        query: ``(B, Hq, T, D)`` with ``T > 1``; key, value: ``(B, Hkv, T, D)``.

    Returns:
        ``(B, T, Hq, D)``; row 0 (no visible key) is exactly zero.
    """
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"STRICT_CAUSAL: {key.shape[2]} keys for {query.shape[2]} queries; allowed only equal lengths")
    shifted = causal(module, query[:, :, 1:], key[:, :, :-1], value[:, :, :-1], dropout, scaling)
    return F.pad(shifted, (0, 0, 0, 0, 1, 0))


def packed_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """One query token, grouped KV heads: ``(B, Hq, 1, D)`` queries on ``(B, Hkv, S, D)`` keys -> ``(B, 1, Hq, D)``.

    Query head ``h`` reads KV head ``h // G`` (as ``repeat_kv`` lays them out), so ``(B, Hq, D)`` viewed as
    ``(B, Hkv, G, D)`` is an ordinary attention of ``G`` rows per KV head; the ``(B, 1, 1, S)`` mask broadcasts.
    """
    batch, num_heads, _, head_dim = query.shape
    packed = query.reshape(batch, key.shape[1], num_heads // key.shape[1], head_dim)
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.reshape(batch, num_heads, 1, head_dim).transpose(1, 2)


def is_packable_decode(query: torch.Tensor, key: torch.Tensor, attention_mask: object) -> bool:
    """One query token, fewer KV heads than query heads, and no mask or one 4D mask ``(B, 1, 1, S)`` for all heads."""
    mask_ok = attention_mask is None or (
        isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[1] == 1
    )
    return query.shape[2] == 1 and key.shape[1] < query.shape[1] and mask_ok


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with one-token GQA decoding packed also under ``torch.compile``."""
    if is_packable_decode(query, key, attention_mask):
        return packed_decode_attention(query, key, value, attention_mask, dropout, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


PACKED_SDPA = "sdpa_packed_gqa"


def register_packed_sdpa() -> None:
    """Make ``attn_implementation="sdpa_packed_gqa"`` available to every transformers model (SDPA's masks)."""
    ALL_ATTENTION_FUNCTIONS.register(PACKED_SDPA, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)


def fast_attention(
    base: Callable,
    causal: CausalAttention,
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | StrictCausalMask | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    pack_decode: bool = True,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature; ``causal`` runs the mask-free cases, ``base`` the rest.

    ``STRICT_CAUSAL`` runs the shifted causal attention; no mask with equal query and key lengths
    (transformers' "pure causal" case) runs ``causal``; one query token with grouped KV heads (decoding)
    runs the packed attention if ``pack_decode`` (off for a ``base`` with its own decoding kernel); any
    other mask (padding, cached keys) runs ``base``, the configured attention implementation. A
    ``query_rotation`` in ``kwargs`` (RoPE still to apply to the queries) goes to ``base``, which may
    take it into its kernel; every other path applies it first.
    """
    rotation = kwargs.pop("query_rotation", None)  # RoPE still to apply to the queries (``base`` may take it over)
    if attention_mask is STRICT_CAUSAL:
        rotated = with_query_rotation(query, rotation)
        return strict_causal_attention(causal, module, rotated, key, value, dropout, scaling), None
    if attention_mask is None and query.shape[2] == key.shape[2]:
        return causal(module, with_query_rotation(query, rotation), key, value, dropout, scaling), None
    if pack_decode and is_packable_decode(query, key, attention_mask):
        rotated = with_query_rotation(query, rotation)
        return packed_decode_attention(rotated, key, value, attention_mask, dropout, scaling), None
    if rotation is not None:
        kwargs["query_rotation"] = rotation
    return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def with_query_rotation(query: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``query`` ``(B, H, T, D)`` with RoPE ``rotation`` = ``(cos, sin)`` (each ``(B or 1, T, D)``) applied, as a
    condensed layer hands it to a backend that can rotate inside its kernel (``query_rotation``); as it is for None."""
    return query if rotation is None else plain_apply_rotary_pos_emb(query, None, *rotation)[0]


def configured_attention(implementation: str) -> Callable:
    """transformers' attention function for ``config._attn_implementation``; eager (unregistered) is
    ``plain_eager_attention``: transformers' eager, with a float64 softmax for float64 models."""
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, plain_eager_attention)
