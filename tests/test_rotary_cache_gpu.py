"""GPU checks of the RoPE + cache-write kernel and the RoPE tables kernel (skipped without CUDA): the compiled Triton
kernels against the plain rotary and ``StaticLayer.update``, and against the rotary modules' eager tables, at
TinyLlama's and 7B's head shapes in bf16 and fp32 (captured generation with them: ``test_fused_projections_gpu.py``)."""

import copy

import pytest
import torch
from transformers import LlamaConfig
from transformers.cache_utils import StaticCache
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from models.fused_projections import TABLED_SUBCLASSES
from models.kernels.plain import PlainRotaryEmbedding, plain_rotate
from models.kernels.rotary_cache import load_rotary_cache_kernel, rotate_and_cache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

KERNEL = load_rotary_cache_kernel()  # compiled for the GPU (None without Triton: every test here fails loudly)
# float32 RoPE rounded once to the dtype, against the plain rotary (in the dtype for bf16: up to three roundings)
TOLERANCE = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("layer_idx", [0, 1], ids=["level-after", "level-in-kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 4, 64), (32, 32, 128)], ids=["tinyllama", "7b"])
def test_kernel_equals_rotary_then_cache_update(dtype, heads, kv_heads, head_dim, layer_idx):
    config = LlamaConfig(
        hidden_size=heads * head_dim,
        intermediate_size=64,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=2,
        vocab_size=256,
    )
    batch, slots, filled = 3, 64, 17
    product = torch.randn(batch, 1, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=dtype)
    queries, keys, values = (
        part.view(batch, 1, -1, head_dim).transpose(1, 2)
        for part in product.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    )
    cos, sin = PlainRotaryEmbedding(config=config).cuda()(product, torch.tensor([[filled], [filled + 3], [40]]).cuda())
    cache = StaticCache(config=config, max_cache_len=slots)
    layer = cache.layers[layer_idx]
    layer.lazy_initialization(keys, values)
    layer.keys.normal_()
    layer.cumulative_length.fill_(filled)
    reference = copy.deepcopy(cache)
    rotated_queries, rotated_keys = plain_rotate(queries, cos, sin), plain_rotate(keys, cos, sin)
    expected_keys, expected_values = reference.update(rotated_keys, values, layer_idx)

    arrivals = torch.zeros(1, dtype=torch.int32, device="cuda")
    written = rotate_and_cache(KERNEL, arrivals, cache, layer_idx, queries, keys, values, cos, sin)
    assert written is not None
    torch.testing.assert_close(written[0], rotated_queries, **TOLERANCE[dtype])
    torch.testing.assert_close(written[1], rotated_keys, **TOLERANCE[dtype])
    torch.testing.assert_close(written[2], expected_keys, **TOLERANCE[dtype])
    assert written[3].equal(expected_values)
    assert int(layer.cumulative_length) == filled + 1 and arrivals.item() == 0


@pytest.mark.parametrize("batch", [1, 3, 127, 256])
def test_many_programs_advance_the_level_once_per_step(batch):
    """Every program counts itself in each launch (32 per row at batch 1 and 3, one per row at 127 and 256); over 16
    steps every row's values land in the slot of their step, and the level grows by exactly 16."""
    config = LlamaConfig(
        hidden_size=2048, intermediate_size=64, num_attention_heads=32, num_key_value_heads=4, num_hidden_layers=2
    )
    slots, steps = 32, 16
    cache = StaticCache(config=config, max_cache_len=slots)
    rotary = PlainRotaryEmbedding(config=config).cuda()
    written_values, arrivals = [], torch.zeros(1, dtype=torch.int32, device="cuda")
    for step in range(steps):
        queries = torch.randn(batch, 32, 1, 64, device="cuda", dtype=torch.bfloat16)
        keys, values = (torch.randn(batch, 4, 1, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        if step == 0:
            cache.layers[1].lazy_initialization(keys, values)
        cos, sin = rotary(queries, torch.full((batch, 1), step, device="cuda"))
        assert rotate_and_cache(KERNEL, arrivals, cache, 1, queries, keys, values, cos, sin) is not None
        written_values.append(values[:, :, 0])
    layer = cache.layers[1]
    assert int(layer.cumulative_length) == steps and arrivals.item() == 0
    assert layer.values[:, :, :steps].equal(torch.stack(written_values, dim=2))
    assert not layer.values[:, :, steps:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rotary_class", [LlamaRotaryEmbedding, PlainRotaryEmbedding], ids=["llama", "lckv"])
def test_tables_equal_eager_cuda(dtype, rotary_class):
    """The tables kernel against the module's own eager CUDA forward, positions up to 2**17 (TinyLlama's head dim
    and 7B's): the same float32 products, libdevice cosines and sines, scaling and round-to-nearest cast, so bit for
    bit (all equal on an H200, 2026-12-01)."""
    for head_dim in (64, 128):
        config = LlamaConfig(hidden_size=32 * head_dim, num_attention_heads=32, max_position_embeddings=1 << 17)
        plain = rotary_class(config=config).cuda()
        module = TABLED_SUBCLASSES[rotary_class](config=config).cuda()
        module.rotary_cache = KERNEL
        positions = torch.randint(0, 1 << 17, (64, 256), device="cuda")
        x = torch.zeros(1, device="cuda", dtype=dtype)
        for got, expected in zip(module(x, positions), plain(x, positions), strict=True):
            assert got.dtype == expected.dtype == dtype and got.equal(expected), (got - expected).abs().max()
