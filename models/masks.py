"""Attention masks of the LCKV layers, built with transformers' mask interface.

Each layer's mask has a kind (``layer_mask_kinds``): causal (``kv <= q``) or strict (``kv < q``: a reader
of a layer above, whose KV of the current token does not exist yet, or any layer under ``force_nodiag``),
with or without a sliding window, sized by the cache layer it reads. A query that sees no key at all under
the strict mask (the first real token of a sequence) must output exactly zero; ``has_visible_key`` marks
the others. With ``LCKV_FLASH_ATTN`` on, a strict mask without window, padding or cached keys is handed
over as the marker ``STRICT_CAUSAL``, which the attention runs as a shifted causal attention.
"""

import torch
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .kernels import STRICT_CAUSAL

# Kind names: "causal" / "strict", "+window" for a sliding-window layer, "@window_cache" when it reads a window-only
# cache.
STRICT, CAUSAL, WINDOW, WINDOW_CACHE = "strict", "causal", "+window", "@window_cache"


def strictly_earlier(batch_idx: int, head_idx: int, q_idx: int, kv_idx: int) -> bool:
    """Mask function (transformers' signature, absolute positions): a key strictly before the query."""
    return kv_idx < q_idx


def layer_mask_kinds(
    kv_sources: list[int], strict: list[bool], window_layers: list[int], cache_layer_types: list[str]
) -> tuple[list[str], dict[str, int]]:
    """Each layer's mask kind, and for each kind the layer whose cache sizes it.

    A kind is ``causal`` or ``strict``, plus ``+window`` for a sliding-window layer, plus ``@window_cache`` when the
    layer it reads keeps only the window in its cache (transformers' ``sliding_attention`` cache layer).

    >>> layer_mask_kinds([0, 4, 4, 4, 4, 5], [False, True, True, True, False, False], [0, 5],
    ...                  ["sliding_attention", "full_attention", "full_attention", "full_attention", "full_attention",
    ...                   "sliding_attention"])
    (['causal+window@window_cache', 'strict', 'strict', 'strict', 'causal', 'causal+window@window_cache'], {'causal+window@window_cache': 0, 'strict': 4, 'causal': 4})
    """  # noqa: E501 (the doctest's expected output is one line)
    windows = set(window_layers)
    kinds, sizing = [], {}
    for i, source in enumerate(kv_sources):
        kind = (STRICT if strict[i] else CAUSAL) + (WINDOW if i in windows else "")
        if cache_layer_types[source] == "sliding_attention":
            kind += WINDOW_CACHE
        kinds.append(kind)
        sizing.setdefault(kind, source)
    return kinds, sizing


def is_strict_kind(kind: str) -> bool:
    return kind.startswith(STRICT)


def reads_window_cache(kind: str) -> bool:
    """The kind's keys come from a window-only cache layer, whose key count depends on the number of queries."""
    return kind.endswith(WINDOW_CACHE)


def is_plain_prefill(attention_mask: torch.Tensor | None, cache: Cache | None, query_length: int) -> bool:
    """Several tokens, no padding, no cached or preallocated keys: the strict mask is exactly ``kv < q``, keys =
    queries."""
    if query_length < 2 or (
        cache is not None and (cache.get_seq_length() > 0 or getattr(cache, "is_compileable", False))
    ):
        return False
    return attention_mask is None or (attention_mask.dim() == 2 and bool(attention_mask.all()))


def build_masks(
    config,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    position_ids: torch.Tensor,
    mask_sizing: dict[str, int],
    allow_is_causal_skip: bool = True,
    *,
    strict_as_causal: bool = False,
) -> dict[str, object]:
    """One mask per kind in ``mask_sizing`` (kind -> the cache layer that sizes it), in the attention backend's format.

    ``allow_is_causal_skip=False`` always materialises the masks (SDPA may otherwise leave a plain causal one out).
    ``strict_as_causal``: the model's attention runs ``STRICT_CAUSAL`` (``KernelSelection.strict_as_causal``)."""
    kwargs = dict(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        cache=cache,
        position_ids=position_ids,
    )
    plain_prefill = strict_as_causal and is_plain_prefill(attention_mask, cache, inputs_embeds.shape[1])
    masks = {}
    for kind, sizing_layer in mask_sizing.items():
        strict, window = is_strict_kind(kind), WINDOW in kind
        if strict and not window and plain_prefill:
            masks[kind] = STRICT_CAUSAL
            continue
        create = create_sliding_window_causal_mask if window else create_causal_mask
        layer_idx = sizing_layer if cache is not None and sizing_layer < len(cache.layers) else None
        masks[kind] = create(
            **kwargs,
            and_mask_function=strictly_earlier if strict else None,
            layer_idx=layer_idx,
            allow_is_causal_skip=allow_is_causal_skip,
        )
    return masks


def has_visible_key(
    attention_mask: torch.Tensor | None, past_length: int | torch.Tensor, query_length: int, batch_size: int, device
) -> torch.Tensor:
    """Which queries see at least one key under the strict mask.

    Args:
        attention_mask: 2D padding mask ``(batch, K)`` (1 = real token) over at least the ``past_length +
            query_length`` positions so far (a static cache's decoding may pass one spanning every slot), or None.
        past_length: number of cached tokens before the queries (a static cache's 0-d tensor fill level too).

    Returns:
        ``(batch, query_length, 1)`` bool tensor, True where some real token precedes the query (the model casts
        it to its own dtype).
    """
    positions = torch.arange(query_length, device=device) + past_length
    if attention_mask is None or attention_mask.dim() != 2:
        return (positions > 0).expand(batch_size, query_length)[..., None]
    real_before = attention_mask.long().cumsum(-1) - attention_mask.long()
    return (real_before.index_select(1, positions.to(attention_mask.device)) > 0)[..., None]


def lckv_masks(
    config,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    position_ids: torch.Tensor,
    past_length: int | torch.Tensor,
    mask_sizing: dict[str, int],
    allow_is_causal_skip: bool = True,
    *,
    strict_as_causal: bool = False,
) -> dict[str, object]:
    """The masks of every kind the layers use (``build_masks``) and, when some layer is strict, ``visible``
    ``(B, T, 1)`` (``has_visible_key``): what ``OptLlamaModel.forward_layers`` takes for ``inputs_embeds``
    ``(B, T, H)``."""
    batch_size, query_length = inputs_embeds.shape[:2]
    masks = build_masks(
        config,
        inputs_embeds,
        attention_mask,
        cache,
        position_ids,
        mask_sizing,
        allow_is_causal_skip,
        strict_as_causal=strict_as_causal,
    )
    if any(is_strict_kind(kind) for kind in mask_sizing):
        masks["visible"] = has_visible_key(attention_mask, past_length, query_length, batch_size, inputs_embeds.device)
    return masks
