"""The down projection's GEMV reading SwiGLU of the fused gate/up product (triton_gemv.small_batch_swiglu_gemv,
SmallBatchLinear.swiglu_forward, grouped_linear.swiglu_down): the kernel against a float64 product (Triton's
interpreter on the CPU), where the MLPs run it (one row, fused gate/up, a SiLU gate) and where they do not, and greedy
decoding through it equal to the plain model's, for opt-llama and a Llama."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from models.config_loading import llama_twin
from models.fused_projections import fuse_projections
from models.kernels import small_batch_linear
from models.kernels.gemv_launch import GemvLaunch
from models.kernels.grouped_linear import swiglu_down
from models.kernels.small_batch_linear import GemvKernel, use_small_batch_linear
from tests.conftest import tiny_config, tiny_model
from tests.test_small_batch_linear import FP32_BOUND, Recorder, gemv  # noqa: F401  (gemv: a fixture)


def swiglu_reference(gate_up: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 product of ``silu(gate) * up`` computed in float32 and rounded to ``dtype`` (the kernel's input)."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(dtype).double() @ weight.double().T


@pytest.mark.parametrize("rows, features, columns", [(1, 64, 48), (1, 37, 513), (3, 100, 200)])
def test_kernel_equals_float64_product(gemv, rows, features, columns):  # noqa: F811
    gate_up, weight = torch.randn(rows, 2 * columns), torch.randn(features, columns)
    out = gemv.swiglu(gate_up, weight, *GemvLaunch(4, 64, 4))
    assert out.dtype == torch.float32 and out.shape == (rows, features)
    expected = swiglu_reference(gate_up, weight, torch.float32)
    gate, up = gate_up.double().chunk(2, dim=-1)
    scale = ((F.silu(gate) * up).abs() @ weight.double().abs().T).max()
    assert (out.double() - expected).abs().max() <= FP32_BOUND * scale


def test_half_precision_input_is_rounded_once(gemv):  # noqa: F811
    """fp16: SwiGLU in float32 rounded once to fp16 (as the compiled step's fused kernel), not after the activation
    too (eager PyTorch's two roundings): through an identity weight the output is exactly that rounded input."""
    columns = 160
    gate_up = torch.randn(1, 2 * columns).half()
    out = gemv.swiglu(gate_up, torch.eye(columns).half(), *GemvLaunch(4, 64, 4))
    gate, up = gate_up.float().chunk(2, dim=-1)
    assert out.dtype == torch.float16 and out.equal((F.silu(gate) * up).half())
    assert not out.equal(F.silu(gate).half() * up.half())  # the two roundings differ somewhere on 160 values


def test_kernel_reads_a_strided_row(gemv):  # noqa: F811
    wide, weight = torch.randn(2, 130), torch.randn(16, 48)
    gate_up = wide[:, :96]
    out = gemv.swiglu(gate_up, weight, *GemvLaunch(4, 64, 4))
    torch.testing.assert_close(out.double(), swiglu_reference(gate_up, weight, torch.float32), rtol=1e-5, atol=1e-5)


@pytest.fixture
def recorded(gemv, monkeypatch) -> tuple[Recorder, Recorder]:  # noqa: F811
    """The real GEMV and SwiGLU GEMV, each wrapped in a recorder, as ``load_gemv_kernel`` returns them."""
    plain, swiglu = Recorder(gemv.run), Recorder(gemv.swiglu)
    kernel = GemvKernel(plain, gemv.devices, None, swiglu)
    monkeypatch.setattr(small_batch_linear, "load_gemv_kernel", lambda: kernel)
    return plain, swiglu


def swapped(model: nn.Module, fused: bool = True) -> nn.Module:
    if fused:
        assert fuse_projections(model) > 0
    assert use_small_batch_linear(model) > 0
    return model


@pytest.mark.parametrize("name", ["opt-llama", "llama"])
def test_greedy_decoding_runs_it_once_per_mlp_and_step(recorded, name):
    """Batch-1 greedy decoding of a fused model under the GEMV: every decode step's MLPs run the SwiGLU GEMV (one
    row, ``(hidden, intermediate)`` weights), and the tokens and the one-row logits are the plain model's (fp32)."""
    config = tiny_config() if name == "opt-llama" else llama_twin(tiny_config())
    plain_model = tiny_model(config)
    model = tiny_model(config)
    model.load_state_dict(plain_model.state_dict())
    swapped(model)
    _, swiglu = recorded
    ids = torch.randint(3, 256, (1, 6))
    with torch.no_grad():
        expected = plain_model.generate(ids, max_new_tokens=4, do_sample=False)
        assert model.generate(ids, max_new_tokens=4, do_sample=False).equal(expected)
        calls = len(swiglu.rows)
        assert calls == 3 * config.num_hidden_layers  # the 3 decode steps; the 6-token prefill is not one row
        assert set(swiglu.rows) == {1}
        assert set(swiglu.shapes) == {(config.hidden_size, config.intermediate_size)}
        torch.testing.assert_close(model(ids[:, :1]).logits, plain_model(ids[:, :1]).logits, rtol=1e-5, atol=1e-5)
    assert len(swiglu.rows) == calls + config.num_hidden_layers


@pytest.mark.parametrize(
    "config, fused", [(tiny_config(), False), (tiny_config(hidden_act="gelu"), True)], ids=["unfused", "gelu-gate"]
)
def test_unfused_or_non_silu_mlps_compute_swiglu_apart(recorded, config, fused):
    """Without the fused gate/up product, or with a gate that is not SiLU, the MLP computes its activation apart
    (the unswapped model's result) and the down projection runs the plain GEMV."""
    reference = tiny_model(config)
    model = swapped(copy.deepcopy(reference), fused)
    x = torch.randn(1, 1, config.hidden_size)
    with torch.no_grad():
        out, expected = model.model.layers[0].mlp(x), reference.model.layers[0].mlp(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    plain, swiglu = recorded
    assert plain.rows and not swiglu.rows


def test_more_rows_a_gradient_or_autocast_compute_swiglu_apart(recorded):
    """Two rows; a gradient wanted by the weights (the parts run: the fused matrix is a buffer) or by the input
    alone (frozen weights); autocast: never the SwiGLU GEMV."""
    mlp = swapped(tiny_model(tiny_config())).model.layers[0].mlp
    hidden = mlp.down_proj.out_features
    with torch.no_grad():
        mlp(torch.randn(2, 1, hidden))  # two rows: F.linear
    mlp.requires_grad_(True)
    mlp(torch.randn(1, 1, hidden)).sum().backward()  # training runs the parts (F.linear), no kernel
    mlp.requires_grad_(False)
    x = torch.randn(1, 1, hidden, requires_grad=True)
    mlp(x).sum().backward()  # frozen weights, a gradient for the input
    assert x.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mlp(torch.randn(1, 1, hidden))
    assert not recorded[1].rows


def test_a_down_projection_without_it_gets_the_activation():
    down = nn.Linear(4, 3)
    gate_up = torch.randn(2, 8)

    def activate(t: torch.Tensor) -> torch.Tensor:
        gate, up = t.chunk(2, dim=-1)
        return F.silu(gate) * up

    torch.testing.assert_close(swiglu_down(down, gate_up, activate, silu=True), down(activate(gate_up)))


def test_fused_mlp_traces_into_one_graph(recorded):
    """Under dynamo (the compiled decode step) the routing is a constant of the trace: one graph, no break."""
    mlp = swapped(tiny_model(tiny_config())).model.layers[0].mlp
    x = torch.randn(1, 1, mlp.down_proj.out_features)
    with torch.no_grad():
        explained = torch._dynamo.explain(mlp)(x)
        assert explained.graph_count == 1 and explained.graph_break_count == 0
        expected = mlp(x)
        torch.testing.assert_close(torch.compile(mlp, backend="eager", fullgraph=True)(x), expected)
    assert recorded[1].rows
