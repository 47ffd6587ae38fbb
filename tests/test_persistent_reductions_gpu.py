"""GPU checks of the one-pass row reductions (models/kernels/persistent_reductions.py; skipped without CUDA): inductor
compiles a decode step's RMSNorm with the residual add before it (Llama's arithmetic) into persistent kernels only at
hidden sizes of 2048-8192, where by default it loops over the row, and the results equal the looped kernel's and
eager's to bf16 rounding."""

import contextlib
import re

import pytest
import torch
from torch._inductor import config as inductor_config
from torch._inductor.utils import run_and_get_code
from torch._inductor.virtualized import V

from models.kernels.persistent_reductions import WidePersistentReductions

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
KERNEL = re.compile(r"def (triton_(?:per|red)_\w+)\(")


def residual_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5):
    """A decoder layer's ``residual + delta`` and the next RMSNorm of it, as transformers' Llama computes them."""
    hidden = residual + delta
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return hidden, weight * x.to(hidden.dtype)


@contextlib.contextmanager
def choices(wide: bool):
    handler = V.choices
    torch._dynamo.reset()
    with inductor_config.patch({"fx_graph_cache": False, "inductor_choices_class": None}):
        if wide:
            inductor_config.inductor_choices_class = WidePersistentReductions
            V.set_choices_handler(WidePersistentReductions())
        try:
            yield
        finally:
            V.set_choices_handler(handler)
            torch._dynamo.reset()


@pytest.mark.parametrize("rows, hidden", [(1, 2048), (128, 4096), (3, 6656), (1, 8192)])
def test_rms_norm_reads_its_rows_in_one_pass(rows, hidden):
    generator = torch.Generator("cuda").manual_seed(0)
    inputs = [torch.randn(rows, hidden, device="cuda", generator=generator, dtype=torch.bfloat16) for _ in range(3)]
    outputs, kernels = {}, {}
    for wide in (False, True):
        with choices(wide):
            out, code = run_and_get_code(torch.compile(residual_rms_norm), *inputs)
        outputs[wide], kernels[wide] = out, KERNEL.findall("\n".join(code))
    assert any(name.startswith("triton_red_") for name in kernels[False])  # the premise: a looped reduction
    assert kernels[True] and all(name.startswith("triton_per_") for name in kernels[True])
    eager = residual_rms_norm(*inputs)
    assert torch.equal(outputs[True][0], eager[0])  # the residual sum is elementwise
    for wide in (False, True):
        torch.testing.assert_close(outputs[wide][1], eager[1])  # bf16 tolerances: the mean square summed in its order
