"""The GEMV with the RMSNorm before it and the residual add after it (models/kernels/gemv_fusion.py,
triton_gemv.small_batch_gemv_fused): the fused kernel against float64 references (run on the CPU by Triton's
interpreter), the pass rewriting every norm + GEMV and GEMV + residual add of a compiled batch-1 forward of an LCKV
model and a transformers Llama (the logits equal to float32 rounding), where it does not rewrite, its cache key and
its command-line switch. bf16 rounding is checked on a GPU (tests/test_gemv_fusion_gpu.py): Triton's interpreter
truncates float32 to bf16 where a GPU rounds to nearest."""

import argparse

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor.codecache import FxGraphHashDetails
from torch._inductor.custom_graph_pass import CustomGraphPass

from models.config_loading import llama_twin
from models.fused_projections import fuse_projections
from models.kernels.gemv_fusion import COUNTER, GemvFusion, enable_gemv_fusion, supports_gemv_fusion
from models.kernels.gemv_launch import GemvLaunch
from models.kernels.small_batch_linear import GemvKernel, load_gemv_kernel, use_small_batch_linear
from tests.conftest import load_interpreted, tiny_config, tiny_model
from tests.test_small_batch_linear import FP32_BOUND, silu_gated_reference
from tools.cli import UsageError, add_decode_kernel_options, set_decode_kernel_options

EPS = 1e-5
EPS32 = torch.finfo(torch.float32).eps
# The normalised input's float32 error: the sum of squares (a float32 partial sum per column slot, then a tree) and
# rsqrt, the scaling and the norm's weight, each a few ulps: within 16 ulps, an error of 16 eps times the products'
# scale, below FP32_BOUND (64 eps) again. Twice FP32_BOUND bounds both errors together.
NORMED_BOUND = 2 * FP32_BOUND


@pytest.fixture
def gemv() -> GemvKernel:
    """The kernels on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py)."""
    return load_interpreted(load_gemv_kernel, "tests/test_gemv_fusion_gpu.py")


@pytest.fixture
def fused(gemv):
    return torch.ops.lckv.small_batch_gemv_fused


@pytest.fixture
def restored():
    """Inductor's post-grad custom pass and the rewrite counter as they were; no compiled-graph cache (a cached graph
    is not rewritten again, so the counter would not see it)."""
    with inductor_config.patch({"post_grad_custom_post_pass": None, "fx_graph_cache": False}):
        counters[COUNTER].clear()
        yield
        torch._dynamo.reset()


def rms_normed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """RMSNorm of ``x``'s rows in float64."""
    x, weight = x.double(), weight.double()
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)


LAUNCHES = [GemvLaunch(2, 64, 4), GemvLaunch(4, 32, 4), GemvLaunch(8, 256, 2)]
SHAPES = [(1, 48, 64), (1, 37, 200), (3, 5, 513)]  # rows, out features (gated: per half), in features


@pytest.mark.parametrize("launch", LAUNCHES, ids=str)
@pytest.mark.parametrize("rows, features, columns", SHAPES)
@pytest.mark.parametrize("magnitude", [3.0, 3e-3], ids=["large", "eps-sized"])
def test_normed_product_equals_float64_reference(fused, launch, rows, features, columns, magnitude):
    """Rows of mean square 9 and 9e-6 (where ``eps`` = 1e-5 is most of the denominator: a kernel ignoring it would be
    off by 1.5x)."""
    x = torch.randn(rows, columns) * magnitude
    weight, norm_weight = torch.randn(features, columns), torch.rand(columns) + 0.5
    normed = rms_normed(x, norm_weight)
    expected = normed @ weight.double().T
    out = fused(x, weight, norm_weight, EPS, None, False, *launch)
    assert out.dtype == torch.float32 and out.shape == (rows, features)
    scale = (normed.abs() @ weight.double().abs().T).max()
    assert (out.double() - expected).abs().max() <= NORMED_BOUND * scale


@pytest.mark.parametrize("launch", LAUNCHES, ids=str)
@pytest.mark.parametrize("rows, half, columns", SHAPES)
def test_normed_silu_gated_product_equals_float64_reference(fused, launch, rows, half, columns):
    x, weight, norm_weight = torch.randn(rows, columns), torch.randn(2 * half, columns), torch.rand(columns) + 0.5
    normed = rms_normed(x, norm_weight)
    expected, bound = silu_gated_reference(normed, weight)  # bound at FP32_BOUND on the products: doubled here
    out = fused(x, weight, norm_weight, EPS, None, True, *launch)
    assert out.shape == (rows, half)
    assert ((out.double() - expected).abs() <= 2 * bound).all()


@pytest.mark.parametrize("launch", LAUNCHES, ids=str)
@pytest.mark.parametrize("rows, features, columns", SHAPES)
def test_residual_add_equals_float64_reference(fused, launch, rows, features, columns):
    x, weight, residual = torch.randn(rows, columns), torch.randn(features, columns), torch.randn(rows, features)
    expected = residual.double() + x.double() @ weight.double().T
    out = fused(x, weight, None, 0.0, residual, False, *launch)
    scale = (x.double().abs() @ weight.double().abs().T).max()
    bound = FP32_BOUND * scale + torch.finfo(torch.float32).eps * expected.abs()  # the product's, then the sum's
    assert ((out.double() - expected).abs() <= bound).all()


def test_fused_kernel_reads_strided_rows(fused):
    """Rows of the input and of the residual slices of wider tensors (unit stride along the row only), at the float64
    references' bounds."""
    wide_x, wide_residual = torch.randn(3, 96), torch.randn(3, 40)
    x, residual, weight = wide_x[:, :64], wide_residual[:, :24], torch.randn(24, 64)
    scale = (x.double().abs() @ weight.double().abs().T).max()
    out = fused(x, weight, None, 0.0, residual, False, *GemvLaunch(4, 32, 4))
    expected = residual.double() + x.double() @ weight.double().T
    assert ((out.double() - expected).abs() <= FP32_BOUND * scale + EPS32 * expected.abs()).all()
    norm_weight = torch.rand(64) + 0.5
    normed = rms_normed(x, norm_weight)
    out = fused(x, weight, norm_weight, EPS, None, False, *GemvLaunch(4, 32, 4))
    scale = (normed.abs() @ weight.double().abs().T).max()
    assert (out.double() - normed @ weight.double().T).abs().max() <= NORMED_BOUND * scale


def test_fused_op_refuses_what_its_kernel_cannot_read(fused):
    """The kernel reads the norm's weight and the residual with unit stride, at the shapes the product gives."""
    x, weight = torch.randn(1, 64), torch.randn(24, 64)
    for norm_weight, residual in [
        ((torch.rand(128) + 0.5)[::2], None),  # strided weight
        (torch.rand(16), None),  # not the row's length
        (None, torch.randn(1, 48)[:, ::2]),  # strided residual row
        (None, torch.randn(1, 8)),  # not the product's shape
    ]:
        with pytest.raises(RuntimeError, match="small_batch_gemv: the (norm's weight|residual) must be"):
            fused(x, weight, norm_weight, EPS, residual, False, *GemvLaunch(4, 32, 4))


def batch_one_logits(model: nn.Module, logits_to_keep: int = 0) -> torch.Tensor:
    """The compiled (inductor) forward of one token, no cache: a batch-1 step's norms, GEMVs and residual adds.
    ``logits_to_keep=1`` as ``generate`` asks: the LM head then reads a slice of the final norm's output."""
    torch._dynamo.reset()
    with torch.no_grad():
        step = torch.compile(lambda ids: model(ids, use_cache=False, logits_to_keep=logits_to_keep).logits)
        return step(torch.tensor([[3]]))


def swapped(model: nn.Module, gemv: GemvKernel) -> nn.Module:
    fuse_projections(model)
    use_small_batch_linear(model, gemv)
    return model


def test_pass_fuses_every_norm_and_residual_add_of_a_step(gemv, restored):
    """An LCKV model's step as ``generate`` runs it (the LM head reads the final norm's last position): each layer's
    input norm (into Q/K/V or Q) and post-attention norm (into the gated gate/up GEMV), the final norm (into the LM
    head, through the slice), and both residual adds of each layer (after the output and down projections) become
    fused GEMVs; the logits equal the unfused step's to float32 rounding (the statistics summed in another order). A
    transformers Llama, every position's logits: the next test."""
    config = tiny_config(num_hidden_layers=4, layer_types="0_1_2_0")  # each kind of layer once: a shorter compile
    model = swapped(tiny_model(config), gemv)
    unfused = batch_one_logits(model, logits_to_keep=1)
    assert not counters[COUNTER]
    enable_gemv_fusion()
    fused_logits = batch_one_logits(model, logits_to_keep=1)
    layers = config.num_hidden_layers
    assert dict(counters[COUNTER]) == {"norm": layers + 1, "silu_gated_norm": layers, "residual": 2 * layers}
    # The two steps differ in the order of each norm's float32 mean square only (the products are the same kernel's):
    # each of the 2 * layers + 1 norms scales its row by 1 / rms within a few ulps of the other's (a sum of at most
    # 64 squares, then rsqrt: 8 eps), so the logits, a product of the tiny model's near-unit-gain layers, within
    # (2 * layers + 1) * 8 eps of their largest value.
    bound = (2 * layers + 1) * 8 * EPS32 * unfused.abs().max()
    assert (fused_logits - unfused).abs().max() <= bound


def test_pass_fuses_a_bf16_llama_step_too(gemv, restored):
    """A transformers Llama in bf16, its norms between their casts: the same rewrites; values to bf16 rounding against
    its eager forward (the interpreter truncates to bf16, so not the GPU's rounding: tests/test_gemv_fusion_gpu.py,
    where captured generation with the pass equals it without, fp32)."""
    config = llama_twin(tiny_config())
    config.num_hidden_layers = 2  # a shorter compile
    model = swapped(tiny_model(config, dtype=torch.bfloat16), gemv)
    with torch.no_grad():
        unfused = model(torch.tensor([[3]]), use_cache=False).logits
    enable_gemv_fusion()
    fused_logits = batch_one_logits(model)
    layers = config.num_hidden_layers
    assert dict(counters[COUNTER]) == {"norm": layers + 1, "silu_gated_norm": layers, "residual": 2 * layers}
    # A sanity check, not the oracle of bf16 values (tests/test_gemv_fusion_gpu.py is): the interpreter truncates
    # each of the fused kernels' bf16 roundings where eager PyTorch rounds to nearest, up to one bf16 ulp (2^-8 of a
    # value) per rounding, through 2 * layers + 1 norms and 2 * layers adds; 5% of the largest logit bounds that.
    assert (fused_logits.float() - unfused.float()).abs().max() <= 0.05 * unfused.float().abs().max()


class ScaledNorm(nn.Module):
    """Not Llama's RMSNorm: the statistics over the row without the cast back before the weight."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(size) + 0.5)

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * 2


def test_what_is_not_llamas_norm_or_a_plain_add_stays(gemv, restored):
    """A norm of other arithmetic (a scale after it, a mean given a dtype), a norm whose output has another user, and a
    residual add that broadcasts or scales (``alpha``) are left to inductor: no rewrite, the same values."""
    linear = use_small_batch_linear_layer(gemv, 32, 48)
    norm, weight, rows_of_residual = ScaledNorm(32), torch.rand(32) + 0.5, torch.randn(4, 1, 48)

    def other_norm(x):
        return linear(norm(x))

    def shared_norm_output(x):
        normed = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))
        return linear(normed), normed.sum()

    def broadcast_add(x):
        return rows_of_residual + linear(x)  # (4, 1, 48) + the product's (1, 1, 48)

    def scaled_add(x):
        return torch.add(rows_of_residual[:1], linear(x), alpha=2.0)

    def mean_given_a_dtype(x):
        variance = x.pow(2).mean(-1, keepdim=True, dtype=torch.float32)  # the same value: kept out all the same
        return linear(weight * (x * torch.rsqrt(variance + EPS)))

    enable_gemv_fusion()
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        for fn in (other_norm, shared_norm_output, broadcast_add, scaled_add, mean_given_a_dtype):
            torch._dynamo.reset()
            torch.testing.assert_close(torch.compile(fn)(x), fn(x), rtol=1e-5, atol=1e-5)
    assert not counters[COUNTER]


def use_small_batch_linear_layer(gemv: GemvKernel, columns: int, features: int) -> nn.Linear:
    layer = nn.Linear(columns, features, bias=False)
    assert use_small_batch_linear(layer, gemv) == 1
    return layer


def test_enable_reaches_inductor_and_its_cache_key(restored):
    """Inductor's compiled-graph key takes a ``CustomGraphPass``'s ``uuid`` for the post-grad custom pass (and
    bypasses the cache for any other callable): the hash of the pass's and the kernel's sources."""
    assert supports_gemv_fusion()
    enable_gemv_fusion()
    installed = inductor_config.post_grad_custom_post_pass
    assert isinstance(installed, GemvFusion) and isinstance(installed, CustomGraphPass)
    key = FxGraphHashDetails._get_custom_pass_detail(None, installed)  # what inductor's key records of the pass
    assert isinstance(key, bytes) and key == GemvFusion().uuid()
    assert supports_gemv_fusion()
    enable_gemv_fusion()  # enabling twice is fine
    assert isinstance(inductor_config.post_grad_custom_post_pass, GemvFusion)


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_decode_kernel_options(parser)
    return parser.parse_args(flags)


def test_flag_needs_the_gemv_and_a_free_pass(gemv, restored, monkeypatch):
    with pytest.raises(UsageError, match=r"^--gemv_fusion: fuses into the batch-1 GEMV, so allowed with --small_b"):
        set_decode_kernel_options(nn.Linear(4, 4), parse("--gemv_fusion"))
    assert inductor_config.post_grad_custom_post_pass is None  # nothing half set
    monkeypatch.setattr("models.kernels.small_batch_linear.load_gemv_kernel", lambda: gemv)
    set_decode_kernel_options(nn.Linear(4, 4), parse("--small_batch_gemv", "--gemv_fusion"))
    assert isinstance(inductor_config.post_grad_custom_post_pass, GemvFusion)
    inductor_config.post_grad_custom_post_pass = lambda graph: None  # another library's pass
    with pytest.raises(UsageError, match="not already another library's"):
        set_decode_kernel_options(nn.Linear(4, 4), parse("--small_batch_gemv", "--gemv_fusion"))
