"""GPU checks of the small-batch GEMV (skipped without CUDA): the compiled Triton kernel against a float32 product in
bf16 and fp32 at ragged and model shapes (its SiLU-gated variant as well), every launch of the tuner's search grid,
and batch-1 generation through the captured decode step with the GEMV equal to it without (fp32)."""

import pytest
import torch
from torch.nn import functional as F

from bench.measure_small_batch_gemv import SEARCH
from models import SPLIT_KV
from models.kernels.gemv_launch import gemv_launch
from models.kernels.small_batch_linear import load_gemv_kernel, use_small_batch_linear

from .conftest import tiny_config, tiny_model
from .test_small_batch_linear import Recorder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

KERNEL = load_gemv_kernel()  # compiled for the GPU (None without Triton: every test here fails loudly)
# A bf16 output is its float32 product rounded: one ulp of the largest output, plus float32 summation order.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
SHAPES = [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632), (4096, 11008), (37, 513), (1000, 3000)]


def product(features: int, columns: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row ``x (1, K)``, a weight ``(N, K)`` scaled so outputs are about 1, and their float32 product."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, columns, device="cuda", generator=generator).to(dtype)
    weight = (torch.randn(features, columns, device="cuda", generator=generator) / columns**0.5).to(dtype)
    return x, weight, F.linear(x.float(), weight.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("features, columns", SHAPES, ids=str)
def test_kernel_equals_float32_product(dtype, features, columns):
    x, weight, expected = product(features, columns, dtype)
    out = KERNEL.run(x, weight, *gemv_launch(1, features, columns, dtype.itemsize))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[dtype])


def test_kernel_reads_a_row_of_a_wider_tensor():
    """x a slice at an offset of a wider tensor (unit stride along K, misaligned start)."""
    x, weight, _ = product(2048, 2048, torch.bfloat16)
    wide = torch.randn(3, 2048 + 7, device="cuda", dtype=torch.bfloat16)
    wide[1, 7:] = x[0]
    out = KERNEL.run(wide[1:2, 7:], weight, *gemv_launch(1, 2048, 2048, 2))
    torch.testing.assert_close(out.float(), F.linear(x.float(), weight.float()), **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("half, columns", [(5632, 2048), (11008, 4096), (37, 513)], ids=str)
def test_silu_gated_kernel_equals_float32_reference(dtype, half, columns):
    """The gated GEMV of a fused gate/up weight (TinyLlama's, 7B's, ragged) against ``silu(gate) * up`` of a float32
    product, at the launch ``SmallBatchLinear.silu_gated`` picks."""
    x, weight, product_fp32 = product(2 * half, columns, dtype)
    gate, up = product_fp32.chunk(2, dim=-1)
    out = KERNEL.silu_gated(x, weight, *gemv_launch(1, 2 * half, columns, dtype.itemsize))
    assert out.dtype == dtype and out.shape == (1, half)
    torch.testing.assert_close(out.float(), F.silu(gate) * up, **TOLERANCE[dtype])


@pytest.mark.parametrize("launch", SEARCH, ids=str)
def test_every_search_launch_agrees(launch):
    """Each launch the tuner may write into the table, compiled for this GPU, gives the product (bf16)."""
    x, weight, expected = product(5632, 2048, torch.bfloat16)
    torch.testing.assert_close(KERNEL.run(x, weight, *launch).float(), expected, **TOLERANCE[torch.bfloat16])


GENERATE = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0, cache_implementation="static")


def captured_generation(name: str, batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny fp32 model of configs/``name`` on the GPU (split-KV attention), ``batch`` random prompts, and the tokens
    ``generate(**GENERATE)`` gives through its captured decode step; dynamo is reset, so the next generate compiles
    the model as it is then."""
    llama = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "vocab_size": 256}
    config = tiny_config(name, **({} if name == "test_tiny_opt.json" else llama))
    ids = torch.randint(3, config.vocab_size, (batch, 9), device="cuda")
    model = tiny_model(config, attn_implementation=SPLIT_KV).cuda()
    plain = model.generate(ids, **GENERATE)
    torch._dynamo.reset()
    return model, ids, plain


@pytest.mark.parametrize("name", ["test_tiny_opt.json", "llama_tiny.json"], ids=["opt-llama", "llama"])
def test_captured_generation_with_the_gemv_equals_without(name):
    """generate's captured batch-1 decode step (static cache, CUDA graphs) with the GEMV in every linear layer gives
    the tokens of the same model without it (fp32), and the kernel does run inside the step."""
    model, ids, plain = captured_generation(name, 1)
    counter = Recorder(KERNEL.run)
    assert use_small_batch_linear(model, KERNEL._replace(run=counter)) > 0
    assert torch.equal(model.generate(ids, **GENERATE), plain)
    assert counter.rows and set(counter.rows) == {1}
