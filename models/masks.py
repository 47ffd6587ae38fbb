"""Attention masks of the LCKV layers, built with transformers' mask interface.

Layers reading their own KVs or those of a lower layer use the ordinary causal mask (``kv <= q``).
Layers reading the KVs of a layer above use the strict mask (``kv < q``): the source's KV of the
current token does not exist yet when the reader runs on it. A query that then sees no key at all
(the first real token of a sequence) must output exactly zero; ``has_visible_key`` marks the others.
With ``LCKV_FLASH_ATTN`` on, a strict mask without padding or cached keys is handed over as the marker
``kernels.STRICT_CAUSAL``, which the attention runs as a shifted causal attention (no dense mask).
"""

import torch
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask

from . import kernels


def strictly_earlier(batch_idx: int, head_idx: int, q_idx: int, kv_idx: int) -> bool:
    """Mask function (transformers' signature, absolute positions): a key strictly before the query."""
    return kv_idx < q_idx


def is_plain_prefill(attention_mask: torch.Tensor | None, cache: Cache | None, query_length: int) -> bool:
    """Several tokens, no padding, no cached or preallocated keys: the strict mask is exactly ``kv < q``, keys = queries."""
    if query_length < 2 or (cache is not None and (cache.get_seq_length() > 0 or getattr(cache, "is_compileable", False))):
        return False
    return attention_mask is None or (attention_mask.dim() == 2 and bool(attention_mask.all()))


def build_masks(
    config,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    position_ids: torch.Tensor,
    need_strict: bool,
) -> dict[str, object]:
    """The causal and (when some layer reads from above) strict masks, in the attention backend's format."""
    kwargs = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, position_ids=position_ids)
    masks = {"causal": create_causal_mask(**kwargs)}
    if need_strict and kernels.fast_strict_mask() and is_plain_prefill(attention_mask, cache, inputs_embeds.shape[1]):
        masks["strict"] = kernels.STRICT_CAUSAL
    elif need_strict:
        masks["strict"] = create_causal_mask(**kwargs, and_mask_function=strictly_earlier)
    return masks


def has_visible_key(attention_mask: torch.Tensor | None, past_length: int, query_length: int, batch_size: int, device) -> torch.Tensor:
    """Which queries see at least one key under the strict mask.

    Args:
        attention_mask: 2D padding mask ``(batch, past_length + query_length)`` (1 = real token) or None.
        past_length: number of cached tokens before the queries.

    Returns:
        ``(batch, query_length, 1)`` float tensor, 1 where some real token precedes the query, else 0.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        positions = torch.arange(past_length, past_length + query_length, device=device)
        return (positions > 0).to(torch.float32).expand(batch_size, query_length)[..., None]
    real_before = attention_mask.long().cumsum(-1) - attention_mask.long()
    return (real_before[:, -query_length:] > 0).to(torch.float32)[..., None]
