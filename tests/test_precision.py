"""Precision: a float64 model computes in float64 throughout; float32, bfloat16 and float16 models compute exactly as
Llama does (its float32 steps, bitwise)."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, eager_attention_forward

from models.kernels.plain import PlainRMSNorm, PlainRotaryEmbedding, plain_eager_attention

from .conftest import tiny_config, tiny_model
from .numerics import LOW_PRECISION, LowPrecisionSpy

MODEL_TYPES = {
    "opt-llama": dict(layer_types="0_1_1_1_2_0", num_encoders=3),
    "lckv-llama": dict(
        model_type="lckv-llama", layer_types="0s_4_4_4_4_5s", sliding_window=3, forward_passes=2, backward_passes=2
    ),
}


def run_every_path(model, ids: torch.Tensor) -> None:
    """Iterative forward, token-by-token forward (``sequential_forward``), prefill then one-token cached decoding."""
    with torch.no_grad():
        model(ids)
        model.config.sequential_forward = True
        model(ids)
        model.config.sequential_forward = False
        cache = DynamicCache(config=model.config)
        model(ids[:, :5], cache=cache, use_cache=True)
        for t in range(5, ids.shape[1]):
            model(ids[:, t : t + 1], cache=cache, use_cache=True)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_float64_model_computes_in_float64_throughout(model_type, backend):
    model = tiny_model(tiny_config(**MODEL_TYPES[model_type]), backend, dtype=torch.float64)
    ids = torch.randint(3, 256, (2, 9))
    ids_padded_mask = torch.ones_like(ids)
    ids_padded_mask[1, :2] = 0
    spy = LowPrecisionSpy(model)
    with spy:
        run_every_path(model, ids)
        with torch.no_grad():
            model(ids, attention_mask=ids_padded_mask)
    assert not spy.found, f"float32/bf16/fp16 tensors before lm_head in a float64 forward: {dict(spy.found)}"


def _llama_config() -> LlamaConfig:
    return LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_below_float64_the_steps_are_llamas_bitwise(dtype):
    """RMSNorm, rotary tables and eager attention equal transformers' Llama ones bit for bit in float32/bf16/fp16."""
    hidden = torch.randn(2, 7, 64).to(dtype)
    ours, llama = PlainRMSNorm(64, eps=1e-5), LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(64) + 0.5)
        llama.weight.copy_(ours.weight)
    ours, llama = ours.to(dtype), llama.to(dtype)
    assert torch.equal(ours(hidden), llama(hidden))

    positions = torch.arange(3, 10)[None].expand(2, -1)
    tables = PlainRotaryEmbedding(_llama_config())(hidden, positions)
    assert all(
        torch.equal(a, b) for a, b in zip(tables, LlamaRotaryEmbedding(_llama_config())(hidden, positions), strict=True)
    )

    module = torch.nn.Module().eval()
    module.num_key_value_groups = 2
    query, key, value = (
        torch.randn(2, 4, 7, 16).to(dtype),
        torch.randn(2, 2, 7, 16).to(dtype),
        torch.randn(2, 2, 7, 16).to(dtype),
    )
    mask = torch.zeros(2, 1, 7, 7, dtype=dtype).masked_fill(
        torch.ones(7, 7, dtype=torch.bool).triu(1), torch.finfo(dtype).min
    )
    expected = eager_attention_forward(module, query, key, value, mask, scaling=0.25)
    actual = plain_eager_attention(module, query, key, value, mask, scaling=0.25)
    assert all(torch.equal(a, b) for a, b in zip(actual, expected, strict=True))


def test_float64_steps_are_float64():
    """The same steps in float64: no float32 rounding left (checked against formulas evaluated in float64)."""
    config = _llama_config()
    positions = torch.arange(0, 100)[None]
    cos, sin = PlainRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float64), positions)
    frequencies = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    angles = positions[0, :, None].double() * frequencies
    assert (
        cos.dtype == torch.float64
        and torch.equal(cos[0, :, :8], angles.cos())
        and torch.equal(sin[0, :, 8:], angles.sin())
    )
    hidden = torch.randn(3, 64, dtype=torch.float64) * 1e-3
    normed = PlainRMSNorm(64, eps=1e-5).double()(hidden)
    torch.testing.assert_close(
        normed, hidden / (hidden.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt(), atol=1e-15, rtol=1e-14
    )
