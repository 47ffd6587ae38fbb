"""GPU checks of programmatic dependent launch (skipped without a Hopper or later GPU): with inductor's switch on, the
GEMV and the split-KV decode kernels launch as dependents, and batch-1 generation through the captured decode step
(fp32, the GEMV in every linear layer) gives exactly the tokens it gives without."""

import pytest
import torch
from torch._inductor import config as inductor_config

from models.kernels import gemv_launch as gemv_launch_module
from models.kernels.dependent_launch import dependent_launch, supports_dependent_launch
from models.kernels.gemv_launch import gemv_launch
from models.kernels.small_batch_linear import use_small_batch_linear

from .test_small_batch_linear_gpu import GENERATE, KERNEL, SHAPES, TOLERANCE, captured_generation, product

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not supports_dependent_launch(torch.device("cuda")),
        reason="needs a CUDA GPU of compute capability 9.0+",
    ),
]


@pytest.mark.parametrize("name", ["test_tiny_opt.json", "llama_tiny.json"], ids=["opt-llama", "llama"])
def test_captured_generation_with_dependent_launch_equals_without(name):
    model, ids, _ = captured_generation(name, 1)
    assert use_small_batch_linear(model) > 0
    plain = model.generate(ids, **GENERATE)
    torch._dynamo.reset()
    with inductor_config.patch({"triton.enable_pdl": True}):
        assert dependent_launch(ids.device)
        assert torch.equal(model.generate(ids, **GENERATE), plain)
    torch._dynamo.reset()


@pytest.mark.parametrize("budget", [0, gemv_launch_module.L2_PREFETCH_BYTES, 2**40], ids=["none", "rule", "every-tile"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("features, columns", SHAPES, ids=str)
def test_gemv_with_l2_prefetch_equals_float32_product(monkeypatch, budget, dtype, features, columns):
    """Under dependent launch the GEMV asks the L2 for tiles ahead (clamped into the weight at ragged shapes); with
    none, the rule's, or every tile of every program, the plain and the SiLU-gated product are still the float32
    one's."""
    monkeypatch.setattr(gemv_launch_module, "L2_PREFETCH_BYTES", budget)
    x, weight, expected = product(features, columns, dtype)
    launch = gemv_launch(1, features, columns, dtype.itemsize)
    with inductor_config.patch({"triton.enable_pdl": True}):
        assert dependent_launch(x.device)
        out = KERNEL.run(x, weight, *launch)
        gated = KERNEL.silu_gated(x, weight, *launch) if launch.block_n % 2 == 0 and features % 2 == 0 else None
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[dtype])
    if gated is not None:
        gate, up = expected.chunk(2, dim=-1)
        torch.testing.assert_close(gated.float(), torch.nn.functional.silu(gate) * up, **TOLERANCE[dtype])
