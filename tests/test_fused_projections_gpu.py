"""GPU checks of the fused projections (skipped without CUDA): captured generation with Q/K/V and gate/up fused gives
the tokens of the unfused model (fp32), for opt-llama and a Llama, with and without the GEMV; liger's SwiGLU reading
the fused gate/up product gives the unfused MLP's output; the down projection's GEMV reading SwiGLU of the fused
product (the compiled kernel against a float32 reference in bf16 and fp32, inside the captured step, and under
liger's SwiGLU)."""

import pytest
import torch

from models.fused_projections import fuse_projections
from models.kernels.gemv_launch import gemv_launch
from models.kernels.small_batch_linear import load_gemv_kernel, use_small_batch_linear

from .conftest import tiny_config
from .test_small_batch_linear import Recorder
from .test_small_batch_linear_gpu import GENERATE, captured_generation

KERNEL = load_gemv_kernel()  # compiled for the GPU (None without Triton: every test using it fails loudly)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("gemv", [False, True], ids=["cublas", "gemv"])
@pytest.mark.parametrize("name", ["test_tiny_opt.json", "llama_tiny.json"], ids=["opt-llama", "llama"])
def test_captured_generation_fused_equals_unfused(name, gemv):
    model, ids, plain = captured_generation(name, 1 if gemv else 2)  # the GEMV takes one row
    assert fuse_projections(model) > 0
    if gemv:
        assert use_small_batch_linear(model) > 0
    assert torch.equal(model.generate(ids, **GENERATE), plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("features, columns", [(2048, 5632), (4096, 11008), (100, 300)], ids=str)
def test_swiglu_gemv_equals_float32_reference(dtype, features, columns):
    """SwiGLU in float32 rounded once to the dtype, then the product: against the same in float32 (bf16: within
    the output's rounding and the one-ulp differences of the rounded activation)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    gate_up = torch.randn(1, 2 * columns, device="cuda", generator=generator).to(dtype)
    weight = (torch.randn(features, columns, device="cuda", generator=generator) / columns**0.5).to(dtype)
    gate, up = gate_up.float().chunk(2, dim=-1)
    expected = (torch.nn.functional.silu(gate) * up).to(dtype).float() @ weight.float().T
    out = KERNEL.swiglu(gate_up, weight, *gemv_launch(1, features, columns, dtype.itemsize))
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.float(), expected, **tolerance)


@pytest.mark.parametrize("name", ["test_tiny_opt.json", "llama_tiny.json"], ids=["opt-llama", "llama"])
def test_captured_generation_runs_the_swiglu_gemv(name):
    """Fused projections and the GEMV: each captured batch-1 step's MLPs run the SwiGLU GEMV, same tokens (fp32)."""
    model, ids, plain = captured_generation(name, 1)
    counter = Recorder(KERNEL.swiglu)
    assert fuse_projections(model) > 0 and use_small_batch_linear(model, KERNEL._replace(swiglu=counter)) > 0
    assert torch.equal(model.generate(ids, **GENERATE), plain)
    assert counter.rows and set(counter.rows) == {1}


@pytest.mark.parametrize("gemv", [False, True], ids=["liger", "swiglu-gemv"])
def test_liger_swiglu_mlp_with_the_fused_product(gemv):
    """liger's SwiGLU reads the fused gate/up product in place; at one row under the GEMV, the down projection's
    SwiGLU GEMV runs instead. Both give the unfused MLP's output."""
    pytest.importorskip("liger_kernel")
    from models.kernels.swiglu import FusedSwiGLUMLP

    config = tiny_config(intermediate_size=96)
    torch.manual_seed(0)
    mlp = FusedSwiGLUMLP(config).cuda()
    x = torch.randn(*((1, 1) if gemv else (3, 5)), config.hidden_size, device="cuda")
    counter = Recorder(KERNEL.swiglu)
    with torch.no_grad():
        expected = mlp(x)
        assert fuse_projections(mlp) == 1
        if gemv:
            assert use_small_batch_linear(mlp, KERNEL._replace(swiglu=counter)) == 4  # the three parts and gate_up
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)
    assert counter.rows == ([1] if gemv else [])
