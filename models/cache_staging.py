"""Reading a cached layer's KVs together with KVs of the current tokens that are not committed yet.

During the iterative computation the source layer's KVs of the current tokens change each iteration,
so they are staged (visible to the readers) until the last iteration, in which each layer
commits its own KVs with ``Cache.update`` as it computes them. The layer's index stays the
model's; the cache classes are transformers' own.

With an offloaded cache (``cache_implementation="offloaded"`` / ``"offloaded_static"``) transformers
prefetches, in ``Cache.update`` of layer ``i``, the next KV-holding layer and sends layer ``i`` back to
the CPU. Condensed layers never call ``update`` and read the target, which runs after them, so a read
first makes sure the layer is resident (a no-op when the schedule already prefetched it); the target's
own ``update`` sends it back afterwards.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer


def offloaded(cache: Cache | None) -> bool:
    """Whether ``cache`` (or an encoder-decoder cache's self-attention cache) moves its layers to the CPU between
    uses."""
    return bool(getattr(getattr(cache, "self_attention_cache", cache), "offloading", False))


def ensure_resident(cache: Cache, layer_idx: int) -> None:
    """Make an offloaded layer's KVs usable on its device: prefetch on the side stream, then wait for it.

    As in transformers' ``Cache.update``, the copy first waits for the default stream, where the layer's last
    device-to-host offload was queued; its host buffer is only complete after that.
    """
    if not offloaded(cache) or not cache.layers[layer_idx].is_initialized:
        return
    layer = cache.layers[layer_idx]
    default_stream = torch.cuda.default_stream(layer.device)
    cache.prefetch_stream.wait_stream(default_stream)
    with cache.prefetch_stream:
        layer.prefetch()
    default_stream.wait_stream(cache.prefetch_stream)


def staged_kv(
    cache: Cache | None, layer_idx: int, keys: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached KVs of layer ``layer_idx`` followed by ``keys``/``values`` of the current tokens, cache unchanged.

    Args:
        cache: the model's cache, or None (then the current KVs are all there is).
        keys, values: ``(batch, kv_heads, q_len, head_dim)`` for the current tokens.

    Returns:
        ``(batch, kv_heads, kv_len, head_dim)`` key and value tensors, laid out as ``layer.update`` would
        return them, so the same attention mask applies.
    """
    if cache is None or layer_idx >= len(cache.layers):  # a cache without config grows its layers lazily
        return keys, values
    ensure_resident(cache, layer_idx)
    layer = cache.layers[layer_idx]
    if hasattr(layer, "stage"):
        return layer.stage(keys, values)
    if isinstance(layer, StaticLayer):
        if not layer.is_initialized:
            layer.lazy_initialization(keys, values)
        # Writing ahead of `cumulative_length` is invisible to committed state: the commit's `update`
        # rewrites these slots. No copy of the buffer, so a captured decode step stays static.
        slots = torch.arange(keys.shape[-2], device=layer.device) + layer.cumulative_length
        layer.keys.index_copy_(2, slots, keys)
        layer.values.index_copy_(2, slots, values)
        return layer.keys, layer.values
    if isinstance(layer, DynamicLayer):
        if not layer.is_initialized or layer.get_seq_length() == 0:
            return keys, values
        return torch.cat([layer.keys, keys], dim=-2), torch.cat([layer.values, values], dim=-2)
    raise TypeError(
        f"cache layer {type(layer).__name__} cannot stage KVs; "
        "supported: DynamicLayer, StaticLayer, layers with .stage()"
    )


def committed_kv(cache: Cache | None, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What layer ``layer_idx`` committed to a static cache: its ``(batch, kv_heads, slots, head_dim)`` buffers, laid
    out as ``layer.update`` returns them (the mask hides the slots not filled yet). For a reader that runs without its
    source: the sequential prefill runs the layers above the cyclic block apart from the block."""
    layer = cache.layers[layer_idx] if cache is not None and layer_idx < len(cache.layers) else None
    if not isinstance(layer, StaticLayer) or not layer.is_initialized:
        raise ValueError(
            f"layer {layer_idx}: its readers run apart from it, so they read its committed KVs, which only an "
            f"initialised static cache layer holds; got {type(layer).__name__}"
        )
    ensure_resident(cache, layer_idx)
    return layer.keys, layer.values
