"""Reading a cached layer's KVs together with KVs of the current tokens that are not committed yet.

During the iterative computation the source layer's KVs of the current tokens change each iteration,
so they are staged (visible to the readers) and only committed with ``Cache.update`` after the last
iteration. The layer's index stays the model's; the cache classes are transformers' own.
"""

import torch
from transformers.cache_utils import DynamicLayer, StaticLayer


def staged_kv(layer, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached KVs of ``layer`` followed by ``keys``/``values`` of the current tokens, cache left unchanged.

    Args:
        layer: a transformers cache layer (or ``None`` for no cache).
        keys, values: ``(batch, kv_heads, q_len, head_dim)`` for the current tokens.

    Returns:
        ``(batch, kv_heads, kv_len, head_dim)`` key and value tensors, laid out as ``layer.update`` would
        return them, so the same attention mask applies.
    """
    if layer is None:
        return keys, values
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
    raise TypeError(f"cache layer {type(layer).__name__} cannot stage KVs; supported: DynamicLayer, StaticLayer, layers with .stage()")
