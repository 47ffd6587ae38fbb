"""GPU checks of programmatic dependent launch (skipped without a Hopper or later GPU): with inductor's switch on, the
GEMV and the split-KV decode kernels launch as dependents, and batch-1 generation through the captured decode step
(fp32, the GEMV in every linear layer) gives exactly the tokens it gives without."""

import pytest
import torch
from torch._inductor import config as inductor_config

from models.kernels.dependent_launch import dependent_launch, supports_dependent_launch
from models.kernels.small_batch_linear import use_small_batch_linear

from .test_small_batch_linear_gpu import GENERATE, captured_generation

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
