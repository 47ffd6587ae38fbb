"""Offloaded KV cache on CPU: transformers' prefetch/offload schedule, emulated without a GPU.

An offloaded layer's tensors are moved to the ``meta`` device (any computation with them fails) and
restored by ``prefetch``, so a read of a layer that is not resident raises instead of silently
reading host memory; emulated streams check that no prefetch overtakes the layer's queued offload.
GPU runs (tests/test_gpu.py) check the real thing.
"""

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .conftest import tiny_config, tiny_model


class _Stream:
    """Stands in for a CUDA stream and tracks one ordering rule: a layer's host-to-device copy (prefetch, side
    stream) may only start after the side stream has waited for the default stream, where the layer's
    device-to-host copy (offload) was queued; otherwise it would read an incomplete host buffer."""

    queued_offloads: set[int] = set()  # layers offloaded since the side stream last waited for the default one

    def __init__(self, side: bool):
        self.side = side

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, other: "_Stream") -> None:
        if self.side and not other.side:
            _Stream.queued_offloads.clear()


class _EmulatedOffloadLayer(DynamicLayer):
    def offload(self):
        if self.is_initialized:
            self._host = (self.keys, self.values)
            self.keys, self.values = self.keys.to("meta"), self.values.to("meta")
            _Stream.queued_offloads.add(id(self))

    def prefetch(self):
        if self.is_initialized and self.keys.device.type == "meta":
            assert id(self) not in _Stream.queued_offloads, "prefetch before the side stream waited for the offload"
            self.keys, self.values = self._host

    @property
    def resident(self) -> bool:
        return not self.is_initialized or self.keys.device.type != "meta"


def _offloaded_cache(config, monkeypatch) -> DynamicCache:
    default_stream = _Stream(side=False)
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: default_stream)
    _Stream.queued_offloads.clear()
    cache = DynamicCache(config=config)
    cache.layers = [_EmulatedOffloadLayer() if isinstance(layer, DynamicLayer) else layer for layer in cache.layers]
    cache.offloading, cache.only_non_sliding, cache.prefetch_stream = True, True, _Stream(side=True)
    return cache


def _prefill_and_decode(model, ids, cache, prompt_len: int, on_step=None) -> torch.Tensor:
    logits = [model(ids[:, :prompt_len], cache=cache, use_cache=True).logits]
    for t in range(prompt_len, ids.shape[1]):
        logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
        if on_step is not None:
            on_step(cache)
    return torch.cat(logits, dim=1)


# Bottom standard layers, a condensed block with a standard layer inside it, the target, a top layer:
# transformers' schedule prefetches layer 3 after layer 0, not the target the condensed layers read.
# "target_last": every layer reads the last one, so each step starts by reading what the last step offloaded.
LAYOUTS = {
    "lckv": dict(layer_types="0_1_1_1_2_0"),
    "standard_inside_block": dict(layer_types="0_1_1_0_2_0", target_layer=4),
    "target_last": dict(kv_sources=[5] * 6),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_offloaded_cache_matches_resident_and_keeps_target_offloaded(layout, monkeypatch):
    config = tiny_config(num_encoders=3, **LAYOUTS[layout])
    model = tiny_model(config)
    ids = torch.randint(3, 256, (2, 12))
    with torch.no_grad():
        resident = _prefill_and_decode(model, ids, DynamicCache(config=config), prompt_len=7)
        target = config.layer_kv_sources[1]
        residency = []
        offloaded = _prefill_and_decode(
            model,
            ids,
            _offloaded_cache(config, monkeypatch),
            prompt_len=7,
            on_step=lambda cache: residency.append(cache.layers[target].resident),
        )
    torch.testing.assert_close(offloaded, resident, atol=0, rtol=0)
    assert residency == [False] * 5  # the shared target KVs go back to the host after every step
