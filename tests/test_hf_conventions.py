"""The output conventions clients of transformers models rely on, checked on opt-llama: hidden states, attentions,
tuples, and one-line errors for inputs the model cannot embed. Tensors are compared in float64 at ``FLOAT64_ATOL``
(the computation, not one machine's float32 rounding)."""

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from models.config_loading import llama_twin

from .conftest import tiny_config, tiny_model
from .numerics import FLOAT64_ATOL
from .test_model_oracles import llama_in_float64, model64, random_ids

LCKV = dict(layer_types="0_1_1_1_2_0")


def test_hidden_states_and_attentions_equal_llama_when_every_layer_is_standard(monkeypatch):
    config = tiny_config(layer_types="0_0_0_0_0_0")
    ours = model64(config, "eager")
    llama = LlamaForCausalLM(llama_twin(config)).eval()
    llama.config._attn_implementation = "eager"
    llama.load_state_dict(ours.state_dict())
    llama = llama_in_float64(llama, monkeypatch)
    ids = random_ids(2, 9)
    with torch.no_grad():
        expected = llama(ids, output_hidden_states=True, output_attentions=True)
        actual = ours(ids, output_hidden_states=True, output_attentions=True)
    assert len(actual.hidden_states) == config.num_hidden_layers + 1
    assert len(actual.attentions) == config.num_hidden_layers
    for mine, theirs in zip(actual.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(mine, theirs, atol=FLOAT64_ATOL, rtol=0)
    for mine, theirs in zip(actual.attentions, expected.attentions, strict=True):
        torch.testing.assert_close(mine, theirs, atol=FLOAT64_ATOL, rtol=0)


def test_lckv_hidden_states_are_each_layers_final_output():
    """Iterations call the block's layers several times: each layer is reported once, with its final output, and the
    last hidden state is the normed output (as for Llama). With enough iterations that output is exact, so the
    token-by-token forward reports the same tensors."""
    model = model64(tiny_config(**LCKV, num_encoders=12), "eager")
    ids = random_ids(2, 7)
    with torch.no_grad():
        iterative = model(ids, output_hidden_states=True)
        model.config.sequential_forward = True
        sequential = model(ids, output_hidden_states=True)
        model.config.sequential_forward = False
        last = model.model(ids).last_hidden_state
    for out in (iterative, sequential):
        assert len(out.hidden_states) == model.config.num_hidden_layers + 1
        torch.testing.assert_close(out.hidden_states[0], model.model.embed_tokens(ids))
        torch.testing.assert_close(out.hidden_states[-1], last, atol=FLOAT64_ATOL, rtol=0)
    for mine, theirs in zip(sequential.hidden_states, iterative.hidden_states, strict=True):
        torch.testing.assert_close(mine, theirs, atol=FLOAT64_ATOL, rtol=0)


def test_strict_layers_report_zero_attention_for_queries_that_see_nothing():
    model = tiny_model(tiny_config(**LCKV), "eager")
    with torch.no_grad():
        attentions = model(random_ids(1, 5), output_attentions=True).attentions
    assert len(attentions) == 6
    assert torch.equal(attentions[1][:, :, 0], torch.zeros_like(attentions[1][:, :, 0]))  # condensed layer, token 0
    assert attentions[1][0, 0, 1, 1] == 0  # no diagonal in a condensed layer
    assert attentions[0][0, 0, 1, 1] > 0  # a standard layer keeps it


def test_return_dict_false_gives_tuples():
    model = tiny_model(tiny_config(**LCKV))
    ids = random_ids(2, 5)
    with torch.no_grad():
        as_dict = model(ids, labels=ids, output_hidden_states=True)
        as_tuple = model(ids, labels=ids, output_hidden_states=True, return_dict=False)
        base_tuple = model.model(ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(base_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    assert any(isinstance(item, tuple) and len(item) == 7 for item in as_tuple)  # the hidden states
    torch.testing.assert_close(base_tuple[0], as_dict.hidden_states[-1])


class ValueHeadModel(nn.Module):
    """What TRL's value-head models and reward models do: a scalar head on the last hidden states."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.value_head = nn.Linear(model.config.hidden_size, 1)

    def forward(self, input_ids, attention_mask=None):
        out = self.model(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1)


def test_value_head_client_trains_on_opt_llama():
    model = tiny_model(tiny_config(**LCKV)).train()
    client = ValueHeadModel(model)
    ids = random_ids(2, 8)
    logits, values = client(ids, attention_mask=torch.ones_like(ids))
    assert values.shape == (2, 8)
    loss = values.pow(2).mean() + logits.logsumexp(-1).mean()
    loss.backward()
    assert client.value_head.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(input_ids=torch.zeros(0, 5, dtype=torch.long)), r"^input_ids: shape \(0, 5\); allowed are 2D"),
        (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), r"^input_ids: shape \(2, 0\); allowed are 2D"),
        (
            dict(input_ids=torch.tensor([[1, 2, 256]])),
            r"^input_ids: token id 256 is outside the vocabulary; allowed are ids 0..255",
        ),
        (dict(input_ids=torch.tensor([[1, -3, 2]])), r"^input_ids: token id -3 is outside the vocabulary"),
        (
            dict(input_ids=torch.tensor([[1, 2]]), output_attentions=True),
            r"^output_attentions: attn_implementation='sdpa' returns no attention weights",
        ),
    ],
)
def test_bad_model_inputs_are_one_line_errors(kwargs, message):
    model = tiny_model(tiny_config(**LCKV))
    with pytest.raises(ValueError, match=message) as error, torch.no_grad():
        model(**kwargs)
    assert "\n" not in str(error.value)


def test_hidden_states_selected_by_index():
    """transformers' index selection (``output_hidden_states=[0, -1]``) picks the embeddings and the normed last
    state."""
    model = tiny_model(tiny_config(**LCKV), "eager")
    ids = random_ids(2, 5)
    with torch.no_grad():
        full = model(ids, output_hidden_states=True).hidden_states
        selected = model(ids, output_hidden_states=[0, -1]).hidden_states
    assert len(selected) == len(full) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(selected[0], full[0])
    torch.testing.assert_close(selected[-1], full[-1])
    assert all(state is None for state in selected[1:-1])
