"""Sliding-window layers (the lckv-llama ``s`` suffix): exact semantics, generation with both cache kinds (the
window bounds what a window-only layer caches), training and streaming."""

import pytest
import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicSlidingWindowLayer, StaticSlidingWindowLayer

from models.cache_streaming import SinkWindowCache

from .conftest import tiny_config, tiny_model
from .numerics import FLOAT64_ATOL
from .test_model_oracles import random_ids, sequential_logits

WINDOW = 3
# Layer 0 and 5 slide (only they read their KVs: window-only caches); layers 1-3 read layer 4 from below it.
SLIDING = dict(kv_sources=[0, 4, 4, 4, 4, 5], sliding_window_layers=[0, 5], sliding_window=WINDOW, num_encoders=12)


def sliding_model(backend: str = "sdpa", dtype: torch.dtype = torch.float32, **overrides):
    return tiny_model(tiny_config(**{**SLIDING, **overrides}), backend, dtype=dtype)


def test_window_limits_what_a_layer_sees():
    """With one layer, a sliding window layer equals a full layer on the last WINDOW tokens alone."""
    model = sliding_model(
        dtype=torch.float64,
        num_hidden_layers=1,
        kv_sources=[0],
        sliding_window_layers=[0],
        num_encoders=0,
        num_trained_encoders=0,
    )
    ids = random_ids(1, 8)
    with torch.no_grad():
        full = model(ids).logits
        for end in range(WINDOW, 9):
            window_only = model(ids[:, end - WINDOW : end], position_ids=torch.arange(end - WINDOW, end)[None]).logits
            torch.testing.assert_close(full[:, end - 1], window_only[:, -1], atol=FLOAT64_ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "sdpa_packed_gqa"])
def test_iterations_equal_the_token_by_token_model(backend, num_threads):
    """float64: enough iterations (13 for 11 tokens) equal the token-by-token model; two fewer than the tokens need
    do not (the oracle can fail)."""
    model = sliding_model(backend, dtype=torch.float64)
    ids = random_ids(2, 11)
    with torch.no_grad():
        parallel = model(ids).logits
    torch.testing.assert_close(parallel, sequential_logits(model, ids), atol=FLOAT64_ATOL, rtol=0)
    model.config.num_encoders = 8  # 9 iterations for 11 tokens
    with torch.no_grad():
        assert (model(ids).logits - parallel).abs().max() > 1e-6


def greedy_from_token_by_token_logits(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``(B, T)`` -> ``(B, T + new_tokens)``: greedy continuation from the token-by-token model's logits."""
    for _ in range(new_tokens):
        ids = torch.cat([ids, sequential_logits(model, ids)[:, -1:].argmax(-1)], dim=1)
    return ids


def test_generation_with_dynamic_and_static_cache_and_bounded_window_cache():
    model = sliding_model()
    ids = random_ids(2, 6)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dynamic = DynamicCache(config=model.config)
        by_dynamic = model.generate(ids, cache=dynamic, **kwargs)
        static = StaticCache(config=model.config, max_cache_len=16)
        by_static = model.generate(ids, cache=static, **kwargs)
    assert torch.equal(by_dynamic, by_static)
    assert isinstance(dynamic.layers[0], DynamicSlidingWindowLayer) and isinstance(
        static.layers[0], StaticSlidingWindowLayer
    )
    assert dynamic.layers[0].keys.shape[-2] == WINDOW - 1  # the window-only layer keeps WINDOW - 1 past tokens
    assert static.layers[0].keys.shape[-2] == WINDOW
    assert dynamic.layers[4].keys.shape[-2] == 15  # the shared target keeps everything its readers need
    # Greedy generation equals greedy decoding of the exact token-by-token logits.
    assert torch.equal(by_dynamic, greedy_from_token_by_token_logits(model, ids, 10))


def test_training_step_reaches_sliding_layers():
    model = sliding_model().train()
    ids = random_ids(2, 9)
    model(ids, labels=ids).loss.backward()
    for layer in (0, 5):
        assert model.model.layers[layer].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_streaming_with_sliding_layers():
    """A stream window larger than the text changes nothing; a smaller one (2 sinks + 8) streams past it: the
    tokens generated while everything fits (the first 11) are the ordinary ones, and evictions change later ones."""
    model = sliding_model()
    ids = random_ids(1, 6)
    kwargs = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ordinary = model.generate(ids, max_new_tokens=30, **kwargs)
        streamed = model.generate(
            ids, cache=SinkWindowCache(model.config, window_size=40, num_sink_tokens=2), max_new_tokens=30, **kwargs
        )
        evicting = model.generate(
            ids, cache=SinkWindowCache(model.config, window_size=8, num_sink_tokens=2), max_new_tokens=30, **kwargs
        )
    assert torch.equal(streamed, ordinary)
    assert evicting.shape == ordinary.shape and torch.equal(evicting[:, :11], ordinary[:, :11])
    assert not torch.equal(evicting, ordinary)


def test_sequential_prefill_with_window_only_caches():
    """The exact prefill through a static cache whose window-only layers fill past their window: the same tokens as
    the token-by-token model, and as the iterative prefill (exact here: enough iterations)."""
    model = sliding_model(prefill="sequential")
    ids = random_ids(2, 9)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        sequential = model.generate(ids, cache=StaticCache(config=model.config, max_cache_len=16), **kwargs)
        model.config.prefill = "iterative"
        iterative = model.generate(ids, cache=StaticCache(config=model.config, max_cache_len=16), **kwargs)
    assert torch.equal(sequential, iterative)


@pytest.mark.parametrize("cache_implementation", ["static", "dynamic"])
def test_sequential_prefill_of_left_padded_prompts_with_window_only_caches(cache_implementation):
    """Left-padded prompts of different lengths through the exact prefill, layers 0 and 5 reading window-only caches:
    each row continues as its prompt alone does token by token (float64). Over a static cache the padding once got
    lost: generate's prepared masks were replaced by unpadded ones where the masks are built per step."""
    model = sliding_model(dtype=torch.float64, prefill="sequential", num_encoders=1)
    prompts = [random_ids(1, length) for length in (9, 5, 7)]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, 9 - prompt.shape[1] :], mask[row, 9 - prompt.shape[1] :] = prompt[0], 1
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            cache_implementation=cache_implementation,
        )
    for row, prompt in enumerate(prompts):
        assert torch.equal(out[row, 9:], greedy_from_token_by_token_logits(model, prompt, 6)[0, prompt.shape[1] :]), row
