"""The checkpoint-fidelity fields: what each config format means by default, and that this project's own configs and
checkpoints compute exactly as before those fields existed (outputs of commit a9ce88b, computed in float64:
tests/fixtures/README.md)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from models import LckvLlamaConfig, OptLlamaConfig

from .conftest import CONFIGS, tiny_config, tiny_model
from .numerics import FLOAT64_ATOL

FIXTURE = Path(__file__).parent / "fixtures" / "pre_fidelity_outputs"


@pytest.mark.parametrize("name", json.loads(FIXTURE.with_suffix(".json").read_text()))
def test_project_configs_compute_as_before(name):
    """Same weights, same inputs, in float64: the logits, padded logits and greedy tokens of the code before this
    change."""
    stored = load_file(FIXTURE.with_suffix(".safetensors"))
    overrides = json.loads(FIXTURE.with_suffix(".json").read_text())[name]["overrides"]
    model = tiny_model(tiny_config(**overrides), "eager", dtype=torch.float64)
    prefix = f"{name}/weights/"
    model.load_state_dict(
        {k[len(prefix) :]: v.double() for k, v in stored.items() if k.startswith(prefix)}, strict=True
    )
    ids, mask = stored["ids"], stored["mask"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stored[f"{name}/logits"], atol=FLOAT64_ATOL, rtol=0)
        torch.testing.assert_close(
            model(ids, attention_mask=mask).logits, stored[f"{name}/padded_logits"], atol=FLOAT64_ATOL, rtol=0
        )
        greedy = model.generate(ids[:, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(greedy, stored[f"{name}/greedy"])


def test_every_project_config_states_its_semantics():
    """configs/ keep this project's semantics explicitly (a published-format layout string alone means the published
    ones)."""
    for path in CONFIGS.glob("*_opt*.json"):
        fields = json.loads(path.read_text())
        assert (fields["force_nodiag"], fields["iteration_style"]) == (False, "current"), path.name


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (dict(layer_types="0_1_2_0"), (True, "previous")),  # published format: the published code's semantics
        (dict(lckv_layer_types="0_1_2_0"), (False, "current")),  # this project's saved format
        (dict(), (False, "current")),
        (dict(layer_types="0_1_2_0", force_nodiag=False, iteration_style="current"), (False, "current")),
    ],
)
def test_opt_llama_semantics_defaults(fields, expected):
    config = OptLlamaConfig(
        num_hidden_layers=4, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=256, **fields
    )
    assert (config.force_nodiag, config.iteration_style) == expected
    saved = config.to_dict()
    assert (saved["force_nodiag"], saved["iteration_style"]) == expected  # written explicitly, so a reload keeps them


def test_lckv_llama_fields_map_to_the_internal_representation(tmp_path):
    config = LckvLlamaConfig(
        layer_types="0s_4_4_4_4_5s",
        forward_passes=3,
        backward_passes=2,
        sliding_window=5,
        use_sequential=True,
        num_hidden_layers=6,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=256,
    )
    assert config.layer_kv_sources == [0, 4, 4, 4, 4, 5]
    assert config.sliding_window_layers == [0, 5]
    assert (config.num_encoders, config.num_trained_encoders, config.sequential_forward) == (4, 1, True)
    assert (config.force_nodiag, config.iteration_style) == (False, "current")
    assert config.layer_strict == [False, True, True, True, False, False]
    # Layers 0 and 5 are read only by themselves and sit outside the cyclic block: their caches keep only the window.
    assert config.cache_layer_types == ["sliding_attention"] + ["full_attention"] * 4 + ["sliding_attention"]
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (
        saved["model_type"],
        saved["lckv_layer_types"],
        saved["forward_passes"],
        saved["backward_passes"],
        saved["use_sequential"],
    ) == (
        "lckv-llama",
        "0s_4_4_4_4_5s",
        3,
        2,
        True,
    )
    reloaded = AutoConfig.from_pretrained(tmp_path).to_dict()
    assert {k: v for k, v in reloaded.items() if k != "_name_or_path"} == {
        k: v for k, v in config.to_dict().items() if k != "_name_or_path"
    }


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(model_type="lckv-llama", layer_types="0_4x_4_4_4_5"), "^layer_types: entry 1 is '4x'; allowed"),
        (
            dict(model_type="lckv-llama", layer_types="0_4_4_4_4_9"),
            "^layer_types '0_4_4_4_4_9': layer 5 reads layer 9; allowed values are 0..5",
        ),
        (
            dict(model_type="lckv-llama", layer_types="0_2_4_4_4_5"),
            "^layer_types '0_2_4_4_4_5': layer 1 reads layer 2, which reads layer 4",
        ),
        (
            dict(model_type="lckv-llama", layer_types="0s_4_4_4_4_5", sliding_window=0),
            "^sliding_window: 0; allowed are integers >= 1",
        ),
        (
            dict(model_type="lckv-llama", layer_types="0_4s_4_4_4_5", sliding_window=1),
            "^sliding_window: 1; allowed are integers >= 2",
        ),
        (
            dict(model_type="lckv-llama", layer_types="0_4_4_4_4_5", backward_passes=0),
            "^forward_passes/backward_passes: 7/0; allowed",
        ),
        (
            dict(model_type="opt-llama", layer_types="0_1_1_1_2_0", iteration_style="later"),
            "^iteration_style: 'later'; allowed values are 'current', 'previous'",
        ),
        (
            dict(model_type="opt-llama", layer_types="0_1_1_1_2_0", force_nodiag=False),
            "^iteration_style: 'previous' needs force_nodiag=True",
        ),
        (
            dict(model_type="opt-llama", sliding_window_layers=[7]),
            r"^sliding_window_layers: \[7\]; allowed are distinct layer indices 0..5",
        ),
        (
            dict(model_type="opt-llama", num_key_value_heads=3),
            "^num_key_value_heads: 3 does not divide num_attention_heads=4",
        ),
        (
            dict(model_type="opt-llama", num_attention_heads=0),
            "^num_attention_heads: 0; allowed values are integers >= 1",
        ),
        (dict(model_type="opt-llama", head_dim=15), "^head_dim: 15 is odd"),
        (dict(model_type="opt-llama", hidden_size=66), "^hidden_size: 66 is not a multiple of num_attention_heads=4"),
        (dict(model_type="opt-llama", max_position_embeddings=0), "^max_position_embeddings: 0; allowed"),
        (dict(model_type="opt-llama", vocab_size=-1), "^vocab_size: -1; allowed"),
    ],
)
def test_bad_fields_are_one_line_errors(fields, message):
    base = dict(num_hidden_layers=6, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=256)
    base.update(fields)
    with pytest.raises(ValueError, match=message) as error:
        AutoConfig.for_model(base.pop("model_type"), **base)
    assert "\n" not in str(error.value)
