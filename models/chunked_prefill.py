"""Prefill a large batch a few sequences at a time into one preallocated (static) cache.

Prefill activations grow with batch x prompt length (and LCKV's iterative prefill keeps a cyclic block's worth
of them); decoding needs only the KV cache. Prefilling chunks of sequences into rows of a ``StaticCache`` makes
the KV cache, not the prefill, bound the batch that fits. Rows are independent, so the cache holds exactly what a
whole-batch prefill would have written.
"""

import torch
from transformers import DynamicCache, PreTrainedModel, StaticCache
from transformers.cache_utils import Cache, StaticIndexedLayer, StaticLayer, StaticSlidingWindowLayer


def set_cached_length(cache: Cache, length: int) -> Cache:
    """Make every static layer of ``cache`` report ``length`` cached tokens, in place; the values stay (a step's work
    depends on the length, not on them). Every counter a layer keeps is set: the length tensor, the sliding-window
    layer's Python int (its masks and updates read that), and an indexed layer's indexer length. Returns ``cache``.

    Timing runs rewind one cache with it instead of allocating another: the captured steps read a static cache at
    fixed addresses, and a new cache makes the next compiled call record its CUDA graphs again, as transformers
    avoids by keeping ``cache_implementation="static"``'s cache from one ``generate`` to the next."""
    for layer in cache.layers:
        if not isinstance(layer, StaticLayer):  # DummyLayer of a condensed layer, or a dynamic layer
            continue
        layer.cumulative_length.fill_(length)
        if isinstance(layer, StaticSlidingWindowLayer):
            layer.cumulative_length_int = length
        if isinstance(layer, StaticIndexedLayer) and layer.indexer_cumulative_length is not None:
            layer.indexer_cumulative_length.fill_(length)
    return cache


def static_slots(slots: int, stored: int, length: int) -> slice:
    """Where the ``stored`` KVs a dynamic layer kept of ``length`` prefilled tokens go in a static layer of ``slots``
    slots. All of them kept (a full layer, or a window not yet exceeded): the first ``stored`` slots. A sliding
    window layer keeps only its last ``window - 1``; the static one, full (``slots`` = window), rolls its slots left
    before it writes the next token at the end, so they go in the last ``stored`` slots.

    >>> static_slots(16, 7, 7), static_slots(3, 2, 7)
    (slice(0, 7, None), slice(1, 3, None))
    """
    return slice(0, stored) if stored == length else slice(slots - stored, slots)


@torch.no_grad()
def prefill_in_chunks(model: PreTrainedModel, input_ids: torch.Tensor, cache: StaticCache, chunk: int) -> None:
    """Prefill ``input_ids`` ``(B, P)`` (unpadded) ``chunk`` sequences at a time into rows of ``cache``.

    Afterwards ``generate(full_input_ids, cache=cache, ...)`` sees ``P`` cached tokens per row and continues from
    there; pass the prompt without its last token here so that ``generate`` computes the first new token's logits.
    """
    if chunk < 1:
        raise ValueError(f"chunk: {chunk}; allowed values are integers >= 1")
    batch, length = input_ids.shape
    for start in range(0, batch, chunk):
        part = DynamicCache(config=model.config)
        model(input_ids[start : start + chunk], cache=part, use_cache=True, logits_to_keep=1)
        for layer, source in zip(cache.layers, part.layers, strict=True):
            if not isinstance(layer, StaticLayer):  # DummyLayer of a condensed layer: nothing stored
                continue
            if not layer.is_initialized:  # allocates (batch, heads, max_cache_len, head_dim) from the shapes
                layer.lazy_initialization(
                    source.keys[:1].expand(batch, -1, -1, -1), source.values[:1].expand(batch, -1, -1, -1)
                )
            slots = static_slots(layer.max_cache_len, source.keys.shape[-2], length)
            layer.keys[start : start + chunk, :, slots].copy_(source.keys)
            layer.values[start : start + chunk, :, slots].copy_(source.values)
        del part
    set_cached_length(cache, length)
