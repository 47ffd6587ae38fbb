"""Attention-sink + recent-window KV cache for streaming past the position limit (StreamingLLM, Xiao et al. 2024).

Each KV-producing layer keeps the first ``num_sink_tokens`` tokens of the stream (the attention sinks) and the most
recent tokens, at most ``num_sink_tokens + window_size`` (the capacity) in all. Condensed layers read the target
layer's KVs, so they are marked "reuse" in ``config.kv_sharing_modes`` and get transformers' ``DummyLayer``: memory is
``capacity`` tokens of ``n_kv_layers`` layers, whatever the length of the stream.

Positions: every token takes the position of its *cache slot* (0 .. capacity-1), not its index in the stream, so
RoPE never leaves the trained range. Before each forward the model calls :meth:`SinkWindowCache.positions_for`, which
evicts the oldest window tokens to make room for the new ones and returns the new tokens' slots as ``position_ids``;
the model rotates their queries and keys there, as usual. Keys are stored as the model rotated them, together with the
slot they were rotated at. Eviction shifts later keys to lower slots; a read rotates each key by ``slot now - slot
written`` (RoPE rotations compose), in fp32 (fp64 for a fp64 model), from the stored key. So rounding never
accumulates over a long stream (re-rotating the stored keys at every eviction would, in bf16), and a cache that has
not evicted yet returns its keys untouched: with a window longer than the text the cache is exactly the ordinary
cached decoding.

Shapes: ``B`` batch, ``Hkv`` KV heads, ``n`` cached tokens, ``T`` new tokens, ``D`` head dim.
"""

import torch
from transformers.cache_utils import Cache, DummyLayer, DynamicLayer

from .kernels.plain import PlainRotaryEmbedding, compute_dtype, plain_rotate


class SinkWindowLayer(DynamicLayer):
    """One KV layer of the sink + window cache: keys/values ``(B, Hkv, n, D)`` with ``n <= capacity``.

    Attributes:
        written_at: ``(n,)`` long, the slot at which each stored key was rotated.
    """

    is_croppable = False  # evicted tokens cannot be restored

    def __init__(self, num_sink_tokens: int, window_size: int, rotary: PlainRotaryEmbedding):
        super().__init__()
        self.num_sink_tokens = num_sink_tokens
        self.window_size = window_size
        self.capacity = num_sink_tokens + window_size
        self.rotary = rotary
        self.inv_freq: torch.Tensor | None = None  # (D / 2,) in the keys' compute dtype, set with the first keys
        self.written_at = torch.zeros(0, dtype=torch.long)
        self.shifted = False  # whether some stored key sits below the slot it was rotated at

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.inv_freq = self.rotary.inverse_frequencies(compute_dtype(key_states.dtype), self.device)

    def make_room(self, num_new: int) -> None:
        """Evict the oldest window tokens so that ``num_new`` more fit; the sinks stay."""
        held = self.get_seq_length()
        excess = held + num_new - self.capacity
        if excess <= 0:
            return
        if num_new > self.window_size:
            raise ValueError(
                f"window_size: {num_new} new tokens do not fit a full cache of window_size={self.window_size}; "
                f"feed at most window_size tokens per forward (generate(..., prefill_chunk_size={self.window_size}))"
            )
        keep = torch.cat([torch.arange(self.num_sink_tokens), torch.arange(self.num_sink_tokens + excess, held)])
        self.keys = self.keys[:, :, keep.to(self.device)]
        self.values = self.values[:, :, keep.to(self.device)]
        self.written_at = self.written_at[keep]
        self.shifted = True

    def _read_keys(self) -> torch.Tensor:
        """Stored keys rotated to their current slots, ``(B, Hkv, n, D)``."""
        if not self.shifted:
            return self.keys
        shift = torch.arange(len(self.written_at)) - self.written_at
        angles = shift.to(self.device, self.inv_freq.dtype)[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)[None]  # (1, n, D)
        return plain_rotate(self.keys.to(self.inv_freq.dtype), angles.cos(), angles.sin()).to(self.keys.dtype)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(B, Hkv, T, D)`` KVs rotated at the next ``T`` slots; return all ``(B, Hkv, n + T, D)`` KVs."""
        held = self.get_seq_length()
        if held + key_states.shape[-2] > self.capacity:
            raise RuntimeError(
                "SinkWindowCache: update past the capacity; the model must call cache.positions_for first"
            )
        keys, values = self.stage(key_states, value_states)
        # Stored keys stay as rotated when written (the returned ones may be re-rotated); values are returned as stored.
        self.keys, self.values = torch.cat([self.keys, key_states], dim=-2), values
        self.written_at = torch.cat([self.written_at, torch.arange(held, held + key_states.shape[-2])])
        return keys, values

    def stage(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What :meth:`update` would return, without storing anything (see ``models/cache_staging.py``)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.get_seq_length() == 0:
            return key_states, value_states
        return torch.cat([self._read_keys(), key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        super().reset()
        self.written_at = torch.zeros(0, dtype=torch.long)
        self.shifted = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SinkWindowCache cannot be cropped: evicted tokens are gone")


class SinkWindowCache(Cache):
    """StreamingLLM cache for ``opt-llama`` models (a Llama runs as an opt-llama with every layer standard).

    Args:
        config: the model config; its ``kv_sharing_modes`` (when present) marks the layers that hold no KVs.
        window_size: recent tokens kept per KV layer, the current ones included (>= 1).
        num_sink_tokens: first tokens of the stream kept for good (>= 0).

    Raises:
        ValueError: one line naming the field, for ``window_size < 1``, ``num_sink_tokens < 0`` or a capacity
            ``num_sink_tokens + window_size`` above ``max_position_embeddings``.
    """

    def __init__(self, config, window_size: int, num_sink_tokens: int = 4):
        if window_size < 1:
            raise ValueError(f"window_size: {window_size}; allowed values are integers >= 1")
        if num_sink_tokens < 0:
            raise ValueError(f"num_sink_tokens: {num_sink_tokens}; allowed values are integers >= 0")
        limit = config.max_position_embeddings
        if num_sink_tokens + window_size > limit:
            raise ValueError(
                f"window_size: num_sink_tokens + window_size = {num_sink_tokens + window_size} exceeds "
                f"max_position_embeddings={limit}; allowed is at most {limit}"
            )
        rotary = PlainRotaryEmbedding(config=config)  # its frequencies only: a pure rotation, no attention scaling
        modes = getattr(config, "kv_sharing_modes", None) or [None] * config.num_hidden_layers
        layers = [
            DummyLayer() if mode == "reuse" else SinkWindowLayer(num_sink_tokens, window_size, rotary) for mode in modes
        ]
        super().__init__(layers=layers)
        self.window_size = window_size
        self.num_sink_tokens = num_sink_tokens

    @property
    def kv_layers(self) -> list[SinkWindowLayer]:
        return [layer for layer in self.layers if isinstance(layer, SinkWindowLayer)]

    def positions_for(
        self, query_length: int, attention_mask: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Make room for ``query_length`` new tokens and return their ``(1, T)`` slot positions.

        Called by ``OptLlamaModel.forward`` before it builds masks. Streaming keeps no padding: a 2D all-ones
        ``attention_mask`` is dropped (returned as None); one with padding is an error.
        """
        if attention_mask is not None:
            if attention_mask.dim() != 2 or not bool(attention_mask.all()):
                raise ValueError(
                    "attention_mask: SinkWindowCache supports unpadded inputs only; allowed is None or all ones"
                )
            attention_mask = None
        for layer in self.kv_layers:
            layer.make_room(query_length)
        start = self.get_seq_length()
        return torch.arange(start, start + query_length, device=device).unsqueeze(0), attention_mask
