"""GPU checks of the fused projections (skipped without CUDA): captured generation with Q/K/V and gate/up fused gives
the tokens of the unfused model (fp32), for opt-llama and a Llama, with and without the GEMV; liger's SwiGLU reading
the fused gate/up product gives the unfused MLP's output."""

import pytest
import torch

from models import SPLIT_KV
from models.fused_projections import fuse_projections
from models.kernels.small_batch_linear import use_small_batch_linear

from .conftest import tiny_config, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("gemv", [False, True], ids=["cublas", "gemv"])
@pytest.mark.parametrize("name", ["test_tiny_opt.json", "llama_tiny.json"], ids=["opt-llama", "llama"])
def test_captured_generation_fused_equals_unfused(name, gemv):
    llama = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "vocab_size": 256}
    config = tiny_config(name, **({} if name == "test_tiny_opt.json" else llama))
    ids = torch.randint(3, config.vocab_size, (1 if gemv else 2, 9), device="cuda")  # the GEMV takes one row
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0, cache_implementation="static")
    model = tiny_model(config, attn_implementation=SPLIT_KV).cuda()
    plain = model.generate(ids, **kwargs)
    torch._dynamo.reset()
    assert fuse_projections(model) > 0
    if gemv:
        assert use_small_batch_linear(model) > 0
    assert torch.equal(model.generate(ids, **kwargs), plain)


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
