"""GPU checks of sdpa_split_kv (skipped without CUDA): the compiled Triton kernel against SDPA at TinyLlama's
attention shape (fp32 tight, bf16), and compiled static-cache generation against the dynamic cache."""

import pytest
import torch

from bench import tune_decode_attention as tune
from models import SPLIT_KV
from models.kernels.decode_attention import (
    load_split_kv_kernel,
    split_kv_decode_attention,
    split_kv_mask,
    visible_lengths,
)
from models.kernels.decode_launch import MAX_SPLITS, WAVES
from models.kernels.plain import plain_apply_rotary_pos_emb

from .conftest import tiny_config, tiny_model
from .test_decode_attention import run_kernel, sdpa_reference
from .test_static_cache import left_padded_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SLOTS = 4096
KERNEL = load_split_kv_kernel()  # compiled for the GPU (None without Triton: every test here fails loudly)
# (left padding, filled slots) per row: about half full, a short row, a padded row, a full row, a one-token row
SPANS = [(0, 2080), (0, 70), (300, 1500), (0, SLOTS), (2000, 2001)]
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def gpu_inputs(dtype: torch.dtype, heads: int, kv_heads: int, strict: bool):
    generator = torch.Generator(device="cuda").manual_seed(0)
    batch, dim = len(SPANS), 64
    query = torch.randn(batch, heads, 1, dim, device="cuda", generator=generator, dtype=dtype)
    key, value = (
        torch.randn(batch, kv_heads, SLOTS, dim, device="cuda", generator=generator, dtype=dtype) for _ in range(2)
    )
    mask = torch.zeros(batch, 1, 1, SLOTS, dtype=torch.bool, device="cuda")
    for row, (pad, filled) in enumerate(SPANS):
        mask[row, ..., pad : filled - 1 if strict else filled] = True
    return query, key, value, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads, kv_heads", [(32, 4), (8, 8)], ids=["gqa", "mha"])
@pytest.mark.parametrize("strict", [False, True], ids=["causal", "strict"])
def test_kernel_equals_sdpa(dtype, heads, kv_heads, strict):
    query, key, value, mask = gpu_inputs(dtype, heads, kv_heads, strict)
    out = split_kv_decode_attention(KERNEL.run, query, key, value, mask, 64**-0.5)
    expected = sdpa_reference(query.float(), key.float(), value.float(), mask)
    seen = mask.any(-1).flatten()  # the strict one-token row sees nothing: exactly zero (SDPA gives NaN)
    assert torch.equal(out[~seen], torch.zeros_like(out[~seen]))
    torch.testing.assert_close(out[seen].float(), expected[seen], **TOLERANCE[dtype])


@pytest.mark.parametrize("strict", [False, True], ids=["causal", "strict"])
def test_mask_view_op_equals_its_pytorch_twin(strict):
    """The mask view op (rows copied, lengths reduced: one kernel) equals the PyTorch view, per row and broadcast."""
    mask = gpu_inputs(torch.bfloat16, 8, 8, strict)[3]
    mask[2, ..., 1000] = False  # a hole inside the span
    for batch, attention_mask in ((len(SPANS), mask), (3, mask[:1])):
        viewed = split_kv_mask(attention_mask, batch, SLOTS, mask.device, KERNEL)
        expected = split_kv_mask(attention_mask, batch, SLOTS, mask.device)
        assert viewed.rows.equal(expected.rows) and viewed.lengths.equal(expected.lengths)


@pytest.mark.parametrize("splits", [1, 7, MAX_SPLITS])
def test_kernel_split_counts_agree(splits):
    query, key, value, mask = gpu_inputs(torch.float32, 32, 4, strict=False)
    out = run_kernel(KERNEL.run, query, key, value, mask, splits)
    torch.testing.assert_close(out, sdpa_reference(query, key, value, mask), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("config", tune.kernel_grid(tune.BLOCK_NS, tune.NUM_WARPS, tune.NUM_STAGES, (WAVES,)), ids=str)
def test_every_tuning_candidate_agrees(config):
    """Each tile / warps / stages the tuner may pick, compiled for this GPU, equals SDPA (bf16, 7 splits)."""
    query, key, value, mask = gpu_inputs(torch.bfloat16, 32, 4, strict=True)
    out = run_kernel(KERNEL.run, query, key, value, mask, 7, config)
    expected = sdpa_reference(query.float(), key.float(), value.float(), mask)
    seen = mask.any(-1).flatten()
    assert torch.equal(out[~seen], torch.zeros_like(out[~seen]))
    torch.testing.assert_close(out[seen].float(), expected[seen], **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("name", ["test_tiny_opt.json", "llama_tiny.json"], ids=["opt-llama", "llama"])
def test_compiled_generation_equals_dynamic_cache(name):
    """generate's compiled decode step (CUDA graph) through the kernel = dynamic cache + SDPA, left padding, fp32."""
    overrides = (
        {}
        if name == "test_tiny_opt.json"
        else {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "vocab_size": 256}
    )
    config = tiny_config(name, **overrides)
    ids, mask = (t.cuda() for t in left_padded_batch(config.vocab_size))
    kwargs = dict(attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    dynamic = tiny_model(config, attn_implementation="sdpa").cuda().generate(ids, **kwargs)
    torch._dynamo.reset()
    compiled = (
        tiny_model(config, attn_implementation=SPLIT_KV).cuda().generate(ids, cache_implementation="static", **kwargs)
    )
    assert torch.equal(compiled, dynamic)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("splits", [1, 7])
@pytest.mark.parametrize("tables_batch", [len(SPANS), 1], ids=["per-row-tables", "one-table"])
def test_kernel_rotates_the_queries(dtype, splits, tables_batch):
    """Given RoPE tables (an LCKV condensed layer's decode step; one table for all rows where positions are (1, T)),
    the compiled kernel's output is the attention of the rotated queries (rotated in float32; the kernel rounds them to
    the dtype once)."""
    query, key, value, mask = gpu_inputs(dtype, 32, 4, strict=True)
    angles = torch.rand(tables_batch, 1, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(1)) * 6.0
    cos, sin = (torch.cat([table] * 2, -1).to(dtype) for table in (angles.cos(), angles.sin()))
    rows = mask[:, 0, 0]
    out = KERNEL.run(query, key, value, rows, visible_lengths(rows), 64**-0.5, splits, 64, 4, 3, cos, sin)
    rotated, _ = plain_apply_rotary_pos_emb(query.float(), None, cos.float(), sin.float())
    expected = sdpa_reference(rotated.to(dtype).float(), key.float(), value.float(), mask)
    seen = mask.any(-1).flatten()
    assert torch.equal(out[~seen], torch.zeros_like(out[~seen]))
    torch.testing.assert_close(out[seen].float(), expected[seen], **TOLERANCE[dtype])
