"""The iterative prefill's per-forward work outside the attention kernels does not grow with the iterations: the
masks are built and cast once per forward, not per layer run (the cyclic block runs up to ``num_encoders + 1``
times)."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.cache_utils import DynamicCache

from .conftest import tiny_config, tiny_model

LENGTH = 40


class MaskWorkSpy(TorchDispatchMode):
    """Counts, per op, the bool ``(.., T, T)`` tensors made (the masks) and the ``(B, T, 1)`` casts (``visible``)."""

    def __init__(self, length: int):
        super().__init__()
        self.length, self.bool_square, self.visible_casts = length, Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (
            isinstance(out, torch.Tensor)
            and out.dim() >= 2
            and out.shape[-2:] == (self.length, self.length)
            and out.dtype == torch.bool
        ):
            self.bool_square[func.overloadpacket.__name__] += 1
        if (
            func is torch.ops.aten._to_copy.default
            and isinstance(out, torch.Tensor)
            and out.shape[1:] == (self.length, 1)
        ):
            self.visible_casts += 1
        return out


def mask_work(num_encoders: int, attn_implementation: str) -> MaskWorkSpy:
    model = tiny_model(tiny_config(num_encoders=num_encoders), attn_implementation)
    ids = torch.randint(3, model.config.vocab_size, (2, LENGTH))
    spy = MaskWorkSpy(LENGTH)
    with torch.no_grad(), spy:
        model(ids, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    return spy


@pytest.mark.parametrize("attn_implementation", ["sdpa", "sdpa_split_kv", "eager"])
def test_masks_are_built_and_cast_once_per_forward(attn_implementation):
    one, many = mask_work(1, attn_implementation), mask_work(8, attn_implementation)
    assert many.bool_square == one.bool_square and sum(one.bool_square.values()) > 0
    assert many.visible_casts == one.visible_casts
