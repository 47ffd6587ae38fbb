"""GPU checks of the exact forward (skipped without CUDA): ``sequential_forward`` without a cache runs into the
model's static scratch cache, the cyclic block's token step compiled and captured (CUDA graphs), the layers outside it
over segments; fp32 logits equal the eager token steps over a dynamic cache, and a second forward of the same shape
compiles and records nothing new."""

from unittest import mock

import pytest
import torch

from models import SPLIT_KV, sequential_prefill

from .conftest import tiny_config, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ATOL = 2e-4  # fp32 logits of two schedules of one computation (different kernels, reductions split differently)


def test_captured_exact_forward_equals_eager_token_steps():
    """120 tokens (segments of 64 and 56), one row left-padded: real tokens' logits as with every layer stepped
    eagerly over a dynamic cache; the second forward replays (no new dynamo graph) and gives the same logits."""
    torch._dynamo.reset()
    model = tiny_model(tiny_config(num_encoders=1, sequential_forward=True), attn_implementation=SPLIT_KV).cuda()
    ids = torch.randint(3, 256, (3, 120), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    segments = []
    runs_segments = sequential_prefill.runs_segments
    with torch.no_grad():
        with mock.patch.object(sequential_prefill, "scratch_cache", lambda *a: None):
            reference = model(ids, attention_mask=mask).logits
        with mock.patch.object(
            sequential_prefill,
            "runs_segments",
            lambda *a: segments.append(runs_segments(*a)) or segments[-1],
        ):
            first = model(ids, attention_mask=mask).logits
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            second = model(ids, attention_mask=mask).logits
    assert segments == [True, True] and graphs > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    # the first forward's first token ran eagerly (the step that allocates the cache), the second's captured
    torch.testing.assert_close(second, first, atol=ATOL, rtol=0)
    real = mask.bool()
    torch.testing.assert_close(first[real], reference[real], atol=ATOL, rtol=0)
