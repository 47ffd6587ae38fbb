"""GPU checks of the skinny GEMM (skipped without CUDA): the compiled Triton kernel against a float32 product in bf16
and fp32 at model shapes and batch 128, a sample of the tuner's launches, and captured batch-4 generation through the
GEMM equal to it without (fp32)."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bench.measure_skinny_gemm import search_launches
from models.kernels import skinny_gemm_launch as launch_module
from models.kernels.skinny_gemm_launch import SkinnyGemmLaunch
from models.kernels.small_batch_linear import load_gemv_kernel, use_small_batch_linear

from .test_small_batch_linear import Recorder
from .test_small_batch_linear_gpu import GENERATE, captured_generation

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

KERNEL = load_gemv_kernel()  # compiled for the GPU (None without Triton: every test here fails loudly)
# A bf16 output is its float32 sums rounded (split-K partial sums added in float32 first); float32 inputs run the
# dot without TF32 rounding.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
SHAPES = [(2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632), (12288, 4096), (1000, 3000)]
LAUNCHES = [SkinnyGemmLaunch(128, 64, 64, 1, 4, 3), SkinnyGemmLaunch(128, 32, 64, 4, 8, 3)]  # fit fp32 tiles too


def product(rows: int, features: int, columns: int, dtype: torch.dtype):
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, columns, device="cuda", generator=generator).to(dtype)
    weight = (torch.randn(features, columns, device="cuda", generator=generator) / columns**0.5).to(dtype)
    return x, weight, F.linear(x.float(), weight.float())


@pytest.mark.parametrize("launch", LAUNCHES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("features, columns", SHAPES, ids=str)
def test_kernel_equals_float32_product(dtype, features, columns, launch):
    x, weight, expected = product(128, features, columns, dtype)
    out = KERNEL.skinny_gemm(x, weight, *launch)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("launch", search_launches(100)[::5], ids=str)
def test_a_sample_of_the_search_agrees(launch):
    """Launches the tuner may write into the table, compiled for this GPU, at a ragged batch (bf16)."""
    x, weight, expected = product(100, 5632, 2048, torch.bfloat16)
    torch.testing.assert_close(KERNEL.skinny_gemm(x, weight, *launch).float(), expected, **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("name", ["test_tiny_opt.json", "llama_tiny.json"], ids=["opt-llama", "llama"])
def test_captured_generation_with_the_gemm_equals_without(name, monkeypatch):
    """generate's captured batch-4 decode step with every product through the GEMM (a table naming them all) gives
    the tokens of the same model without it (fp32), and the kernel runs inside the step."""
    model, ids, plain = captured_generation(name, 4)
    shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, nn.Linear)}
    launch = SkinnyGemmLaunch(16, 32, 64, 2, 4, 3)
    monkeypatch.setattr(launch_module, "TUNED", {(4, n, k, 4): launch for n, k in shapes})
    counter = Recorder(KERNEL.skinny_gemm)
    assert use_small_batch_linear(model, KERNEL._replace(skinny_gemm=counter)) > 0
    assert torch.equal(model.generate(ids, **GENERATE), plain)
    assert counter.rows and set(counter.rows) == {4}
