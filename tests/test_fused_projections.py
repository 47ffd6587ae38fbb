"""Fused Q/K/V and gate/up projections (models/fused_projections.py, models/kernels/grouped_linear.py): the
concatenated matrix and its views, which layers fuse (LCKV condensed layers keep their Q alone), unchanged parameters,
state dict and saved checkpoints, the same logits (float64: equal to float64 rounding) and greedy tokens for opt-llama
and a transformers Llama, the gradient fallback, the GEMV on the fused products, and the tools' flag."""

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

from models.config_loading import llama_twin
from models.fused_projections import FusedProjectionLlamaAttention, FusedProjectionLlamaMLP, fuse_projections
from models.kernels import small_batch_linear
from models.kernels.grouped_linear import (
    are_views_of,
    can_concatenate,
    concatenated_linear,
    grouped_products,
    runs_fused,
)
from models.kernels.small_batch_linear import GemvKernel, SmallBatchLinear
from tests.conftest import tiny_config, tiny_model
from tests.test_generation import run as run_generation_with
from tests.test_small_batch_linear import Recorder
from tools import cli, latency
from tools.cli import UsageError, set_linear_options
from tools.measure import load_config_for_length

# float64 products summed in another order (one matmul of the concatenated matrix against three): float64 rounding
FP64 = dict(rtol=1e-12, atol=1e-12)
# float32, the same sums in another order: measured at most 1.5e-7 on these tiny models' logits (|logit| < 1), a few
# float32 ulps; the bound is about 100 ulps at 1, and 1e7 times below the changes a wrong weight makes
FP32 = dict(rtol=1e-5, atol=1e-5)


def parts(sizes=(8, 4, 4), in_features=12, bias=False) -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(in_features, n, bias=bias) for n in sizes]


@pytest.mark.parametrize("bias", [False, True])
def test_concatenated_linear_is_the_parts_side_by_side(bias):
    layers = parts(bias=bias)
    before = [(layer.weight.clone(), layer.bias.clone() if bias else None) for layer in layers]
    x = torch.randn(3, 12)
    expected = torch.cat([layer(x) for layer in layers], -1)
    parameters = [layer.weight for layer in layers]
    fused = concatenated_linear(layers)
    assert fused.weight.shape == (16, 12) and not isinstance(fused.weight, nn.Parameter)
    assert all(layer.weight is parameter for layer, parameter in zip(layers, parameters, strict=True))  # same objects
    assert dict(fused.named_parameters()) == {} and fused.state_dict() == {}  # counted once: in the parts
    torch.testing.assert_close(fused(x), expected, rtol=0, atol=0)
    for layer, (weight, layer_bias), rows in zip(layers, before, fused.weight.split([8, 4, 4]), strict=True):
        assert isinstance(layer.weight, nn.Parameter) and layer.weight.requires_grad
        assert layer.weight.data_ptr() == rows.data_ptr() and layer.weight.equal(weight)  # a view, same values
        if bias:
            assert layer.bias.equal(layer_bias)
    with torch.no_grad():
        layers[1].weight.add_(1.0)  # writing a part (e.g. load_state_dict) writes the fused matrix
    assert fused.weight[8:12].equal(layers[1].weight)


def test_which_parts_can_share_a_matrix():
    assert can_concatenate(parts())
    assert not can_concatenate([*parts(), None])  # a condensed layer has no k_proj / v_proj
    assert not can_concatenate(parts(in_features=12) + parts(in_features=8))
    assert not can_concatenate(parts() + parts(bias=True))
    mixed = parts()
    mixed[0].double()
    assert not can_concatenate(mixed)


def test_gradients_run_the_parts():
    layers = parts(bias=True)
    fused = concatenated_linear(layers)
    x = torch.randn(2, 12)
    assert not runs_fused(fused, layers)  # grad mode on, parameters that want gradients
    sum(out.sum() for out in grouped_products(x, fused, layers)).backward()
    assert all(layer.weight.grad is not None for layer in layers)
    with torch.no_grad():
        assert runs_fused(fused, layers)
    assert not runs_fused(None, layers)


@pytest.mark.parametrize("trained", ["k and v only", "biases only"])
def test_a_gradient_wanted_by_any_part_runs_the_parts(trained):
    layers = parts(bias=True)
    fused = concatenated_linear(layers)
    for layer in layers:
        layer.requires_grad_(False)
    wanted = [layer.weight for layer in layers[1:]] if trained == "k and v only" else [layer.bias for layer in layers]
    for parameter in wanted:
        parameter.requires_grad_(True)
    assert not runs_fused(fused, layers)
    sum(out.sum() for out in grouped_products(torch.randn(2, 12), fused, layers)).backward()
    assert all(parameter.grad is not None for parameter in wanted)


def test_a_replaced_part_is_run_instead_of_the_stale_matrix():
    layers = parts()
    fused = concatenated_linear(layers)
    x = torch.randn(2, 12)
    layers[1] = nn.Linear(12, 4, bias=False)  # e.g. an adapter put in its place after fusion
    with torch.no_grad():
        assert not runs_fused(fused, layers)
        torch.testing.assert_close(grouped_products(x, fused, layers)[1], layers[1](x), rtol=0, atol=0)
        layers[1].weight.data = torch.randn(4, 12)  # load_state_dict(assign=True)
        assert not runs_fused(fused, layers)


def fused_groups_of(model: nn.Module) -> list[tuple[nn.Linear, list[nn.Linear]]]:
    """Every fused matrix of ``model`` with its parts."""
    return [
        (getattr(module, fused_name), [getattr(module, name) for name in names])
        for module in model.modules()
        for fused_name, names in getattr(type(module), "fused_groups", {}).items()
        if getattr(module, fused_name, None) is not None
    ]


def models_under_test(dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    config = tiny_config()
    return {"opt-llama": tiny_model(config, dtype=dtype), "llama": tiny_model(llama_twin(config), dtype=dtype)}


@pytest.mark.parametrize("name", ["opt-llama", "llama"])
def test_fused_model_keeps_its_state_and_its_outputs(name):
    model = models_under_test(torch.float64)[name]
    layers = model.config.num_hidden_layers
    own_kv = layers if name == "llama" else len(set(model.config.layer_kv_sources))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = sum(p.numel() for p in model.parameters())
    ids = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert fuse_projections(model) == layers + own_kv  # every MLP; attentions with their own KVs
        assert fuse_projections(model) == 0  # already fused
        assert model.state_dict().keys() == state.keys()
        assert all(model.state_dict()[k].equal(v) for k, v in state.items())
        assert sum(p.numel() for p in model.parameters()) == parameters
        torch.testing.assert_close(model(ids).logits, logits, **FP64)
        assert model.generate(ids, max_new_tokens=4, do_sample=False).equal(tokens)
    fused_attentions = [m for m in model.modules() if getattr(m, "qkv_proj", None) is not None]
    assert len(fused_attentions) == own_kv
    if name == "llama":
        assert all(type(m) is FusedProjectionLlamaAttention for m in fused_attentions)
        assert sum(type(m) is FusedProjectionLlamaMLP for m in model.modules()) == layers
        assert not any(type(m) in (LlamaAttention, LlamaMLP) for m in model.modules())


@pytest.mark.parametrize("conversion", ["deepcopy", "double"])
@pytest.mark.parametrize("name", ["opt-llama", "llama"])
def test_a_converted_or_copied_model_reads_the_weights_it_loads(name, conversion):
    """``.to()`` and copies convert parameters and buffers apart; the parts must become views of the fused matrix
    again, so weights loaded afterwards are the ones the fused forward reads."""
    model = models_under_test()[name]
    other = tiny_model(model.config, seed=1)
    ids = torch.randint(3, 256, (2, 5))
    fuse_projections(model)
    if conversion == "deepcopy":
        model = copy.deepcopy(model)
    else:
        model, other = model.double(), other.double()
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, other(ids).logits, **(FP64 if conversion == "double" else FP32))
    groups = fused_groups_of(model)
    assert groups and all(are_views_of(fused, group) for fused, group in groups)  # the fused path ran


@pytest.mark.parametrize("name", ["opt-llama", "llama"])
def test_decode_step_runs_the_fused_products(name, monkeypatch):
    """A decode step reads the concatenated matrices: with the parts' own products broken, its logits do not
    change (LCKV's iterative prefill calls K and V alone in its KV-only pass, so the prefill runs before)."""
    model = models_under_test()[name]
    ids = torch.randint(3, 256, (1, 6))
    with torch.no_grad():
        step = model(ids[:, -1:], cache=model(ids[:, :-1]).cache).logits
        fuse_projections(model)
        cache = model(ids[:, :-1]).cache
        for part in (part for _, group in fused_groups_of(model) for part in group):
            monkeypatch.setattr(part, "forward", lambda x: pytest.fail("a fused part ran alone"))
        torch.testing.assert_close(model(ids[:, -1:], cache=cache).logits, step, **FP32)


def test_lckv_iterative_prefill_and_kv_only_pass_with_fused_projections():
    """LCKV's iterative prefill (the KV-only pass calls K and V alone) and its sequential prefill, fused: same
    tokens as unfused (float64)."""
    config = tiny_config()
    for prefill in ("iterative", "sequential"):
        config.prefill = prefill
        plain = tiny_model(config, dtype=torch.float64)
        fused = copy.deepcopy(plain)
        fuse_projections(fused)
        ids = torch.randint(3, 256, (2, 11))
        with torch.no_grad():
            torch.testing.assert_close(fused(ids).logits, plain(ids).logits, **FP64)
            assert fused.generate(ids, max_new_tokens=3, do_sample=False).equal(
                plain.generate(ids, max_new_tokens=3, do_sample=False)
            )


def test_fused_model_saves_and_loads_its_parameters(tmp_path):
    model = models_under_test()["opt-llama"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_projections(model)
    model.save_pretrained(tmp_path)  # parts are disjoint views of one matrix: saved as separate tensors
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.state_dict().keys() == state.keys()
    assert all(loaded.state_dict()[k].equal(v) for k, v in state.items())


def test_training_a_fused_model_trains_the_parameters():
    model = models_under_test()["llama"].train()
    fuse_projections(model)
    ids = torch.randint(3, 256, (2, 6))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_sharded_model_is_left_alone(monkeypatch):
    model = models_under_test()["llama"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert fuse_projections(model) == 0
    assert not any(isinstance(m, FusedProjectionLlamaAttention) for m in model.modules())


def test_the_gemv_runs_the_fused_products(monkeypatch):
    """``set_linear_options`` fuses first, so a one-row decode step runs the GEMV on the concatenated matrices."""
    recorder = Recorder()
    monkeypatch.setattr(small_batch_linear, "load_gemv_kernel", lambda: GemvKernel(recorder, frozenset({"cpu"})))
    model = tiny_model(llama_twin(tiny_config(intermediate_size=96, vocab_size=300)))  # every shape distinct
    config = model.config
    ids = torch.randint(3, 256, (1, 1))
    with torch.no_grad():
        logits = model(ids).logits
        set_linear_options(model, fused_projections=True, small_batch_gemv=True)
        torch.testing.assert_close(model(ids).logits, logits, **FP32)
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    assert recorder.shapes.count((qkv, config.hidden_size)) == config.num_hidden_layers
    assert recorder.shapes.count((2 * config.intermediate_size, config.hidden_size)) == config.num_hidden_layers
    assert (config.intermediate_size, config.hidden_size) not in recorder.shapes  # no gate or up alone
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, SmallBatchLinear)


@pytest.mark.parametrize(
    "config, extra", [("opt.json", []), ("opt.json", ["--prefill", "sequential"]), ("llama.json", [])]
)
def test_run_generation_flag_gives_the_same_greedy_text(tiny_files, config, extra, monkeypatch):
    fused_groups = []
    monkeypatch.setattr(cli, "fuse_projections", lambda model: fused_groups.append(fuse_projections(model)) or 1)
    args = ("--prompt", "ROMEO: But soft", "--max_new_tokens", "4", "--ignore_eos", "--quiet", "--static_cache", *extra)
    plain = run_generation_with(tiny_files, *args, config=config)
    assert not fused_groups
    fused = run_generation_with(tiny_files, *args, "--fused_projections", config=config)
    assert fused["cache"]["text"] == plain["cache"]["text"]
    assert fused_groups and all(count > 0 for count in fused_groups)  # the flag fused the model that generated


def test_latency_flag_fuses_the_projections():
    args = latency.parse_args(["--fused_projections", "--device", "cpu", "--prompt_len", "8", "--gen_len", "8"])
    model = latency.build_model(load_config_for_length("configs/test_tiny_opt.json", 16), args, torch.float32)
    assert any(getattr(m, "qkv_proj", None) is not None for m in model.modules())
    assert all(getattr(m, "gate_up_proj", None) is not None for m in model.modules() if hasattr(m, "gate_proj"))


def test_flag_that_fuses_nothing_is_a_usage_error():
    with pytest.raises(UsageError, match=r"--fused_projections: no attention or MLP .* allowed on one process"):
        set_linear_options(nn.Linear(4, 4), fused_projections=True, small_batch_gemv=False)
