"""The static cache an exact forward without cached tokens runs into (``sequential_forward`` or
``prefill="sequential"``: lm-eval's loglikelihoods, ``run_clm.py --eval_sequential``, a prefill into an empty dynamic
cache).

Such a forward used to step every layer eagerly over a dynamic cache. Over a static cache its masks are built once
per segment, its token step is compiled and captured (CUDA) and the layers outside the cyclic block run over segments
(``models.sequential_prefill``). The model keeps the cache for the next forward of the same shape: a new cache's
buffers would make the captured step record its CUDA graph again, as transformers avoids by keeping ``generate``'s
static cache. A forward that was handed the empty dynamic cache gets the committed KVs copied into it afterwards.

Shapes: ``B`` batch, ``T`` tokens, ``S`` slots.
"""

from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, DummyLayer, DynamicCache, DynamicLayer, StaticCache, StaticLayer

MIN_SLOTS = 64  # the smallest scratch cache (one segment of the sequential prefill)


class ScratchCache(NamedTuple):
    """The static cache a sequential forward without cached tokens runs into, kept on the model for the next one of
    the same shape (``OptLlamaModel.scratch_cache``): a new cache's buffers would make the captured step record its
    CUDA graph again, as transformers avoids by keeping ``generate``'s static cache."""

    shape: tuple  # (batch, slots, dtype, device, inference mode)
    cache: StaticCache


def scratch_cache(model, inputs_embeds: torch.Tensor, cache: Cache | None) -> StaticCache | None:
    """A static cache for a sequential forward that starts from no cached tokens: none given, or the empty dynamic
    cache the forward made (``use_cache``), which then gets the committed KVs (``copy_committed``). Its masks are
    built once per segment, its token step is captured (CUDA), and the layers outside the cyclic block run over
    segments. Its slots: the prompt rounded up to a power of two (at least ``MIN_SLOTS``), so that prompts of
    similar lengths share it and its compiled step; the model keeps the last one (``ScratchCache``; setting
    ``model.model.scratch_cache = None`` frees it), zeroed for each use. None (keep ``cache``) where gradients are
    recorded (in-place writes into one buffer), under autocast, where a layer keeps only a window, under flex attention
    (its masks are not cut per token) or when the cache is anything else."""
    plain_layers = (DynamicLayer, DummyLayer)  # DummyLayer: a condensed layer's (it stores nothing)
    plain_dynamic = type(cache) is DynamicCache and all(type(layer) in plain_layers for layer in cache.layers)
    if torch.is_grad_enabled() or not (cache is None or (plain_dynamic and cache.get_seq_length() == 0)):
        return None
    # Under autocast keys and values may come in different dtypes, which one static layer's buffers cannot hold.
    if torch.is_autocast_enabled(inputs_embeds.device.type):
        return None
    config = model.config
    # flex attention's masks are BlockMasks, which cannot be cut into one row per token step
    if config._attn_implementation == "flex_attention" or "sliding_attention" in config.cache_layer_types:
        return None
    batch_size, query_length = inputs_embeds.shape[:2]
    slots = max(MIN_SLOTS, 1 << (query_length - 1).bit_length())
    # Buffers made under inference mode cannot be written outside it: one cache per mode.
    shape = (batch_size, slots, inputs_embeds.dtype, inputs_embeds.device, torch.is_inference_mode_enabled())
    if model.scratch_cache is None or model.scratch_cache.shape != shape:
        model.scratch_cache = ScratchCache(shape, StaticCache(config=config, max_cache_len=slots))
    # Zeroed, not only rewound: a padding query sees no key, and eager attention averages every slot it spans, so its
    # (meaningless) output would otherwise depend on earlier forwards.
    model.scratch_cache.cache.reset()
    return model.scratch_cache.cache


def copy_committed(source: StaticCache, destination: Cache) -> None:
    """Commit to ``destination`` every token the static cache ``source`` holds, layer by layer."""
    for layer_idx, layer in enumerate(source.layers):
        if isinstance(layer, StaticLayer) and layer.is_initialized:
            filled = int(layer.cumulative_length)
            destination.update(layer.keys[:, :, :filled], layer.values[:, :, :filled], layer_idx)
