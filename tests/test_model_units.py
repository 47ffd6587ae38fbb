"""Unit tests of the small pure pieces: KV source map, layer plan, iteration schedule, masks, config errors."""

import json

import pytest
import torch

from models.configuration_opt_llama import OptLlamaConfig
from models.layer_layouts import (
    default_published_layout,
    parse_published_layout,
    validate_kv_sources,
)
from models.layer_plan import iteration_schedule, layer_plan, reads_from_above
from models.masks import has_visible_key

from .conftest import CONFIGS, tiny_config
from .numerics import FLOAT64_ATOL


@pytest.mark.parametrize(
    "layer_types, target, expected",
    [
        ("0_1_1_1_1_1_2_0", -2, [0, 6, 6, 6, 6, 6, 6, 7]),
        ("0_0_1_1_2_0_0", 4, [0, 1, 4, 4, 4, 5, 6]),
        ("0_0_0", -2, [0, 1, 2]),
        ("1_1_2", -1, [2, 2, 2]),
    ],
)
def test_parse_published_layout(layer_types, target, expected):
    assert parse_published_layout(layer_types, target) == expected


@pytest.mark.parametrize(
    "layer_types, target, field",
    [
        ("0_1_3_2_0", -2, "layer_types: unknown"),
        ("0_2_1_2_0", -2, "layer_types: 2 target layers"),
        ("0_1_1_2_0", 7, "target_layer: 7 is out of range"),
        ("0_1_1_2_0", 1, "target_layer: 1 (layer 1) is not the layer marked 2"),
        ("0_1_1_0_0", -2, "layer_types: condensed layers"),
    ],
)
def test_kv_sources_errors_name_the_field(layer_types, target, field):
    with pytest.raises(ValueError, match="allowed|need") as err:
        parse_published_layout(layer_types, target)
    assert str(err.value).startswith(field)
    assert "\n" not in str(err.value)


def test_default_layout_and_general_sources():
    assert default_published_layout(5) == "0_1_1_2_0"
    validate_kv_sources([0, 0, 2, 2], 4)  # CLA: pairs share the lower layer's KVs
    with pytest.raises(ValueError, match="^kv_sources: layer 1 reads layer 2, which reads layer 1; allowed sources"):
        validate_kv_sources([0, 2, 1, 3], 4)
    with pytest.raises(ValueError, match="^kv_sources: 3 entries for num_hidden_layers=4"):
        validate_kv_sources([0, 1, 2], 4)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(layer_types="0_1_2_0"), "layer_types: 4 entries for num_hidden_layers=6"),
        (dict(layer_types="0_1_1_9_2_0"), "layer_types: unknown layer type"),
        (dict(layer_types="0_2_1_1_2_0"), "layer_types: 2 target layers"),
        (dict(target_layer=6), "target_layer: 6 is out of range"),
        (dict(num_trained_encoders=9, num_encoders=8), "num_trained_encoders: 9; allowed values are 0..num_encoders"),
        (dict(num_encoders=-1), "num_encoders: -1"),
        (dict(kv_sources=[0, 1, 2]), "kv_sources: 3 entries"),
    ],
)
def test_bad_config_is_one_line_value_error(overrides, field):
    with pytest.raises(ValueError) as err:
        tiny_config(**overrides)
    assert str(err.value).startswith(field)
    assert "\n" not in str(err.value)


def test_published_config_round_trip(tmp_path):
    """A published-format JSON (layer_types as the LCKV string) loads, saves and reloads unchanged in meaning."""
    published = json.loads((CONFIGS / "tinyllama_opt.json").read_text())
    assert isinstance(published["layer_types"], str)
    (tmp_path / "config.json").write_text(json.dumps(published))
    config = OptLlamaConfig.from_pretrained(tmp_path)
    assert config.layer_types == ["full_attention"] * 22  # transformers' meaning of the field is kept
    assert config.lckv_layer_types == published["layer_types"]
    config.save_pretrained(tmp_path / "saved")
    again = OptLlamaConfig.from_pretrained(tmp_path / "saved")
    assert again.layer_kv_sources == config.layer_kv_sources == [0] + [20] * 20 + [21]
    assert again.kv_sharing_modes == [None] + ["reuse"] * 19 + [None, None]
    assert again.num_kv_layers == 3


def test_layer_plan_lckv_cla_yoco():
    lckv = layer_plan([0, 6, 6, 6, 6, 6, 6, 7])
    assert (lckv.below, lckv.block, lckv.above, lckv.carried_sources) == (range(0, 1), range(1, 7), range(7, 8), (6,))
    cla = layer_plan([0, 0, 2, 2])  # every reader reads from below: no iteration
    assert not cla.is_iterative and cla.below == range(0, 4)
    two_targets = layer_plan([0, 3, 3, 3, 6, 6, 6, 7])
    assert two_targets.block == range(1, 7) and two_targets.carried_sources == (3, 6)
    assert reads_from_above([0, 6, 6, 6, 6, 6, 6, 7], 1) and not reads_from_above([0, 6, 6, 6, 6, 6, 6, 7], 6)


def test_iteration_schedule():
    assert iteration_schedule(9, 2, None) == (9, 2)  # training: all iterations, last two with gradients
    assert iteration_schedule(9, 2, 4) == (4, 4)  # inference: more than T iterations change nothing; gradients (if on)
    assert iteration_schedule(9, 2, 100) == (9, 9)  # flow through the whole function computed
    assert iteration_schedule(1, 5, None) == (1, 1)


def test_has_visible_key_with_and_without_padding():
    plain = has_visible_key(None, 0, 4, 2, "cpu")
    assert plain.shape == (2, 4, 1) and plain[:, :, 0].tolist() == [[0, 1, 1, 1]] * 2
    assert has_visible_key(None, 3, 1, 1, "cpu").item() == 1  # decoding: the past is visible
    left_padded = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    visible = has_visible_key(left_padded, 0, 5, 2, "cpu")[:, :, 0]
    assert visible.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]
    # a decoding step sees the whole 2D mask and keeps only the queries' columns
    assert has_visible_key(left_padded, 4, 1, 2, "cpu")[:, :, 0].tolist() == [[1], [1]]
    # a static cache's decoding passes a mask over every slot and its fill level as a tensor: the query's column
    only_last_real = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    assert has_visible_key(only_last_real, torch.tensor(2), 1, 2, "cpu")[:, :, 0].tolist() == [[0], [0]]
    assert has_visible_key(only_last_real, torch.tensor(3), 2, 2, "cpu")[:, :, 0].tolist() == [[1, 1], [0, 0]]


@pytest.mark.parametrize("sequential", [False, True], ids=["iterative", "sequential_forward"])
def test_evaluation_without_no_grad_is_evaluation(sequential):
    """``self.training`` alone means training: an eval-mode forward with gradients on computes the loss and logits it
    computes under ``no_grad`` (the inference schedule; with ``sequential_forward`` the token-by-token path) and adds no
    ``kv_loss`` (``train_kv``); gradients still reach the embeddings through the iterations. ``train()`` adds it.
    In float64, compared at float64's tolerance: without gradients the token-by-token path runs its layers outside the
    cyclic block over segments (a static scratch cache), with them every layer per token (a dynamic cache)."""
    from .conftest import tiny_model

    # 3 iterations over 7 tokens: the iterative forward is not exact, so the sequential one differs from it.
    model = tiny_model(tiny_config(train_kv=True, num_encoders=2, sequential_forward=sequential), dtype=torch.float64)
    ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids, labels=ids)
    out = model(ids, labels=ids)
    assert out.kv_loss is None and reference.kv_loss is None
    torch.testing.assert_close(out.logits, reference.logits, atol=FLOAT64_ATOL, rtol=0)
    torch.testing.assert_close(out.loss, reference.loss, atol=FLOAT64_ATOL, rtol=0)
    out.loss.backward()
    block_layer = model.model.layers[model.model.plan.block[0]]
    assert (
        block_layer.self_attn.q_proj.weight.grad.abs().sum() > 0
        and model.model.embed_tokens.weight.grad.abs().sum() > 0
    )

    trained = model.train()(ids, labels=ids)
    lm_loss = model.loss_function(logits=trained.logits, labels=ids, vocab_size=model.config.vocab_size)
    assert trained.kv_loss is not None and torch.allclose(trained.loss, lm_loss + trained.kv_loss)
    with torch.no_grad():
        assert model(ids, labels=ids).kv_loss is not None  # training mode, gradients off: still the training forward
