"""GPU checks of the GEMV with the RMSNorm before it and the residual add after it (models/kernels/gemv_fusion.py;
skipped without CUDA): in bf16 at model shapes the residual add equals the separate add bitwise and the normalised
input is Llama's RMSNorm to one bf16 ulp; captured generation (static cache, CUDA graphs) with the pass gives the
tokens of the model without it (fp32), for opt-llama and a Llama, and the pass does rewrite the decode step."""

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config

from models.fused_projections import fuse_projections
from models.kernels.gemv_fusion import COUNTER, enable_gemv_fusion
from models.kernels.gemv_launch import gemv_launch
from models.kernels.plain import PlainRMSNorm
from models.kernels.small_batch_linear import use_small_batch_linear

from .test_small_batch_linear_gpu import GENERATE, captured_generation

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BF16 = torch.bfloat16


def ops():
    from models.kernels import triton_gemv

    return triton_gemv.small_batch_gemv, triton_gemv.small_batch_gemv_fused


@pytest.mark.parametrize("features, columns", [(2048, 2048), (4096, 11008), (6656, 17920)])
def test_residual_add_equals_the_separate_add_bitwise(features, columns):
    """The product rounded to bf16, then added to the residual as a bf16 add rounds: the same bits."""
    gemv, fused = ops()
    generator = torch.Generator("cuda").manual_seed(0)
    x, weight, residual = (
        torch.randn(shape, device="cuda", generator=generator, dtype=BF16)
        for shape in ((1, columns), (features, columns), (1, features))
    )
    launch = gemv_launch(1, features, columns, 2)
    separate = residual + gemv(x, weight, *launch)
    assert torch.equal(fused(x, weight, None, 0.0, residual, False, *launch), separate)


@pytest.mark.parametrize("hidden", [2048, 4096, 6656, 8192])
def test_normalised_input_is_llamas_rms_norm_to_one_ulp(hidden):
    """The fused kernel's normalised bf16 input, read out through an identity weight (each output one product with
    1.0: exact), against ``PlainRMSNorm`` (Llama's arithmetic): equal but where the float32 mean square, summed in
    another order, rounds an element the other way, by one bf16 ulp."""
    _, fused = ops()
    generator = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, hidden, device="cuda", generator=generator, dtype=BF16) * 4
    norm = PlainRMSNorm(hidden, eps=1e-5).to("cuda", BF16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden, device="cuda", generator=generator) + 0.5)
        expected = norm(x)
    identity = torch.eye(hidden, device="cuda", dtype=BF16)
    out = fused(x, identity, norm.weight.detach(), 1e-5, None, False, *gemv_launch(1, hidden, hidden, 2))
    ulp = torch.finfo(BF16).eps * 2.0 ** torch.floor(torch.log2(expected.float().abs()))
    assert ((out.float() - expected.float()).abs() <= ulp).all()
    assert (out != expected).float().mean() < 0.01


@pytest.fixture
def fusion():
    with inductor_config.patch({"post_grad_custom_post_pass": None, "fx_graph_cache": False}):
        counters[COUNTER].clear()
        yield
        torch._dynamo.reset()


@pytest.mark.parametrize("name", ["test_tiny_opt.json", "llama_tiny.json"], ids=["opt-llama", "llama"])
def test_captured_generation_with_the_fusion_equals_without(name, fusion):
    model, ids, plain = captured_generation(name, 1)
    assert fuse_projections(model) > 0 and use_small_batch_linear(model) > 0
    unfused = model.generate(ids, **GENERATE)
    torch._dynamo.reset()
    enable_gemv_fusion()
    assert torch.equal(model.generate(ids, **GENERATE), unfused)
    assert torch.equal(unfused, plain)
    layers = model.config.num_hidden_layers
    rewrites = counters[COUNTER]
    assert rewrites["residual"] >= 2 * layers and rewrites["silu_gated_norm"] >= layers
    assert rewrites["norm"] >= layers + 1  # the final norm's into the LM head too
