"""Offloaded KV cache on CPU: transformers' prefetch/offload schedule, emulated without a GPU.

An offloaded layer's tensors are moved to the ``meta`` device (any computation with them fails) and
restored by ``prefetch``, so a read of a layer that is not resident raises instead of silently
reading host memory. GPU runs (tests marked gpu) check the real thing.
"""

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .conftest import tiny_config, tiny_model


class _NoStream:
    """Stands in for a CUDA stream: a context manager that can wait on another stream."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, other) -> None:
        pass


class _EmulatedOffloadLayer(DynamicLayer):
    def offload(self):
        if self.is_initialized:
            self._host = (self.keys, self.values)
            self.keys, self.values = self.keys.to("meta"), self.values.to("meta")

    def prefetch(self):
        if self.is_initialized and self.keys.device.type == "meta":
            self.keys, self.values = self._host

    @property
    def resident(self) -> bool:
        return not self.is_initialized or self.keys.device.type != "meta"


def _offloaded_cache(config, monkeypatch) -> DynamicCache:
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: _NoStream())
    cache = DynamicCache(config=config)
    cache.layers = [_EmulatedOffloadLayer() if isinstance(layer, DynamicLayer) else layer for layer in cache.layers]
    cache.offloading, cache.only_non_sliding, cache.prefetch_stream = True, True, _NoStream()
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
LAYOUTS = {"lckv": dict(layer_types="0_1_1_1_2_0"), "standard_inside_block": dict(layer_types="0_1_1_0_2_0", target_layer=4)}


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
            model, ids, _offloaded_cache(config, monkeypatch), prompt_len=7,
            on_step=lambda cache: residency.append(cache.layers[target].resident),
        )
    torch.testing.assert_close(offloaded, resident, atol=0, rtol=0)
    assert residency == [False] * 5  # the shared target KVs go back to the host after every step
