"""GPU checks of the fused projections (skipped without CUDA): captured generation with Q/K/V and gate/up fused gives
the tokens of the unfused model (fp32), for opt-llama and a Llama, with and without the GEMV; liger's SwiGLU reading
the fused gate/up product gives the unfused MLP's output."""

import pytest
import torch

from models.fused_projections import fuse_projections
from models.kernels.small_batch_linear import use_small_batch_linear

from .conftest import tiny_config
from .test_small_batch_linear_gpu import GENERATE, captured_generation

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("gemv", [False, True], ids=["cublas", "gemv"])
@pytest.mark.parametrize("name", ["test_tiny_opt.json", "llama_tiny.json"], ids=["opt-llama", "llama"])
def test_captured_generation_fused_equals_unfused(name, gemv):
    model, ids, plain = captured_generation(name, 1 if gemv else 2)  # the GEMV takes one row
    assert fuse_projections(model) > 0
    if gemv:
        assert use_small_batch_linear(model) > 0
    assert torch.equal(model.generate(ids, **GENERATE), plain)


def test_liger_swiglu_reads_the_fused_product():
    pytest.importorskip("liger_kernel")
    from models.kernels.swiglu import FusedSwiGLUMLP

    config = tiny_config(intermediate_size=96)
    torch.manual_seed(0)
    mlp = FusedSwiGLUMLP(config).cuda()
    x = torch.randn(3, 5, config.hidden_size, device="cuda")
    with torch.no_grad():
        expected = mlp(x)
        assert fuse_projections(mlp) == 1
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)
