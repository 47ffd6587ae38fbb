"""Checkpoints saved by the original LCKV code reproduce that code's own outputs (an external oracle).

``tests/fixtures/original_lckv/<case>/`` holds, per case, the checkpoint as the original code saved it (float32
weights) and ``reference_outputs.pt``: that code's outputs computed in float64 with the same weights (how: the
fixture's README.md and ``make/``). Published cases (branch ``dev-lckv-publish``, model_type ``opt-llama``) run on eager
attention, ``lckv-llama`` ones (branch ``main``) on SDPA, as that code did.

Compared per case, in float64 at ``FLOAT64_ATOL`` (one tolerance for every case, with one thread and with 3),
and in float32 (what users run) at the float32 error bound derived from the case itself (``tests/numerics.py``):

* ``iterative``: the parallel forward as saved vs its iterative forward;
* ``exact``: our token-by-token model vs its exact model: the published code's token-by-token logits; for
  ``lckv-llama``, its iterations run to convergence (its ``use_sequential`` path is its decode path, which for layouts
  with a layer reading a layer above is not its exact model: docs/checkpoint_formats.md);
* ``decode``: published cases, its generation path (12-token prompt forward, then one-token cached steps); an
  ``lckv-llama`` layout without a cyclic block, its token-by-token (decode) path vs our one-token cached decoding;
* greedy tokens (float64): equal to its greedy tokens where its decoding is its exact model; elsewhere ours follow
  the exact model.
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from models.convert import convert_checkpoint
from tools import convert

from .numerics import FLOAT64_ATOL, float32_error_bound, max_difference
from .test_model_oracles import sequential_logits

FIXTURES = Path(__file__).parent / "fixtures" / "original_lckv"
PUBLISHED_CASES = ["w2_gqa", "top_mha", "w4_gqa"]
LCKV_LLAMA_CASES = ["main_w2", "main_w2_nodiag", "main_cla", "main_sliding", "main_middle"]
CASES = PUBLISHED_CASES + LCKV_LLAMA_CASES
PROMPT_LENGTH = 12  # the original's generation path: this many prompt tokens, then one-token steps
PATHS = {  # path -> which cases have it
    "iterative": CASES,
    "exact": CASES,
    "decode": PUBLISHED_CASES + ["main_cla"],  # main_cla: the lckv-llama layout without a cyclic block
}
CASE_PATHS = [(case, path) for path, cases in PATHS.items() for case in cases]


def load_case(case: str, dtype: torch.dtype = torch.float64):
    """The checkpoint loaded as saved (in ``dtype``) with the backend the original used, and its reference outputs."""
    directory = FIXTURES / case
    model_type = json.loads((directory / "config.json").read_text())["model_type"]
    backend = "eager" if model_type == "opt-llama" else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=backend).eval()
    return model, torch.load(directory / "reference_outputs.pt")


def exact_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """This project's token-by-token computation (``sequential_forward``)."""
    model.config.sequential_forward = True
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        model.config.sequential_forward = False


def prompt_then_decode(model, ids: torch.Tensor) -> torch.Tensor:
    """A ``PROMPT_LENGTH``-token prompt forward with a cache, then one-token cached steps: logits ``(B, T, vocab)``."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        steps = [model(ids[:, :PROMPT_LENGTH], cache=cache, use_cache=True).logits]
        steps += [
            model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(PROMPT_LENGTH, ids.shape[1])
        ]
    return torch.cat(steps, dim=1)


def ours_and_reference(model, reference: dict, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """This project's logits on ``path`` and the original's float64 logits they must equal."""
    ids, published = reference["ids"], model.config.model_type == "opt-llama"
    if path == "iterative":
        with torch.no_grad():
            return model(ids).logits, reference["eval_logits"]
    if path == "exact":
        return exact_logits(model, ids), reference["exact_logits" if published else "fixpoint_logits"]
    if published:
        return prompt_then_decode(model, ids), reference["decode_logits"]
    return sequential_logits(model, ids), reference["true_sequential_logits"]


@pytest.mark.parametrize(("case", "path"), CASE_PATHS)
def test_float64_logits_equal_the_originals(case, path, num_threads):
    model, reference = load_case(case)
    ours, expected = ours_and_reference(model, reference, path)
    assert expected.dtype == torch.float64
    torch.testing.assert_close(ours, expected, atol=FLOAT64_ATOL, rtol=0)


_bounds: dict[tuple[str, str], float] = {}


def float32_bound(case: str, path: str) -> float:
    """The float32 error bound of ``path`` on ``case`` (tests/numerics.py), computed once per session."""
    if (case, path) not in _bounds:
        model, reference = load_case(case)
        _bounds[case, path] = float32_error_bound(lambda: ours_and_reference(model, reference, path)[0])
    return _bounds[case, path]


@pytest.mark.parametrize(("case", "path"), CASE_PATHS)
def test_float32_logits_are_within_the_float32_bound(case, path, num_threads):
    """What users run: the float32 model's logits differ from the original's float64 ones by at most the float32 error
    bound of the case: 16 times the largest change of this path's float64 logits when every rounding operation's result
    is perturbed by float32's unit roundoff 2**-24 (seeded, deterministic); 16 covers the rounding inside reductions of
    up to 128 terms, sqrt(128) = 11.3 (tests/numerics.py). Measured: at most 0.21 of the bound."""
    model, reference = load_case(case, torch.float32)
    ours, expected = ours_and_reference(model, reference, path)
    bound = float32_bound(case, path)
    assert max_difference(ours, expected) <= bound, (
        f"{case} {path}: |float32 - float64| {max_difference(ours, expected):.3g} > bound {bound:.3g}"
    )


def assert_greedy_equal(model, prompt: torch.Tensor, expected: torch.Tensor) -> None:
    with torch.no_grad():
        generated = model.generate(
            prompt, max_new_tokens=expected.shape[1] - prompt.shape[1], do_sample=False, pad_token_id=0
        )
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("case", PUBLISHED_CASES + ["main_cla"])
def test_greedy_generation_equals_the_originals(case):
    """Where the original's decoding is its exact model (published; lckv-llama without a cyclic block); its float64
    top-1/top-2 margins are at least 1.8e-4, far above float64 rounding."""
    model, reference = load_case(case)
    assert_greedy_equal(model, reference["prompt"], reference["greedy"])
    assert_greedy_equal(model, reference["short_prompt"], reference["greedy_short"])


@pytest.mark.parametrize("case", ["main_w2", "main_w2_nodiag", "main_sliding", "main_middle"])
def test_lckv_llama_generation_is_the_exact_model_not_the_originals_decode(case):
    """The original lckv-llama decode (SDPA) zeroes the attention of layers reading a layer above, so its greedy tokens
    follow neither its iterations nor its converged model: its own token-by-token logits are far from its fixpoint.
    Ours follow the exact model: greedy generation equals greedy decoding of the token-by-token logits."""
    model, reference = load_case(case)
    assert model.model.plan.is_iterative
    assert max_difference(reference["true_sequential_logits"], reference["fixpoint_logits"]) > 1.0
    prompt = reference["short_prompt"]  # 3 tokens: the iterative prefill is exact for prompts <= num_encoders + 1
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    # The exact model is causal: its logits at position t of the generated sequence are the greedy choice of token
    # t + 1.
    chosen = exact_logits(model, generated)[:, prompt.shape[1] - 1 : -1].argmax(-1)
    new = generated[:, prompt.shape[1] :]
    ended = (new == model.generation_config.eos_token_id).long()
    padding = ended.cumsum(1) - ended > 0  # generate pads (0) a row after its end-of-sequence token
    assert torch.equal(new.masked_fill(padding, 0), chosen.masked_fill(padding, 0))


@pytest.mark.parametrize("case", ["w2_gqa", "main_sliding"])
def test_save_and_reload_keeps_format_and_function(case, tmp_path):
    """Saving writes the checkpoint's own format (model_type, layout string) and reloads to the same logits."""
    model, reference = load_case(case, torch.float32)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == model.config.model_type
    saved, original = (json.loads((path / "config.json").read_text()) for path in (tmp_path, FIXTURES / case))
    assert saved["lckv_layer_types"] == original["layer_types"]  # the original's layout string, in its own syntax
    assert (saved["force_nodiag"], saved["iteration_style"]) == (config.force_nodiag, config.iteration_style)
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation=model.config._attn_implementation
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(reference["ids"]).logits, model(reference["ids"]).logits, atol=0, rtol=0)


def test_auto_map_to_remote_code_is_ignored(tmp_path):
    """A published lckv-llama checkpoint names remote code; it loads with ours, no trust_remote_code."""
    directory = FIXTURES / "main_w2"
    for item in directory.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    config_path = tmp_path / "config.json"
    config_path.write_text(
        config_path.read_text().replace(
            '"architectures"',
            '"auto_map": {"AutoConfig": "remote.Config", "AutoModelForCausalLM": "remote.Model"},\n  "architectures"',
            1,
        )
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(model).__module__.startswith("models.")


@pytest.mark.parametrize(("case", "to"), [("w2_gqa", "lckv-llama"), ("main_w2", "opt-llama")])
def test_convert_between_formats_keeps_the_function(case, to, tmp_path):
    model, reference = load_case(case, torch.float32)
    if to == "lckv-llama":
        with pytest.raises(ValueError, match="^iteration_style: 'previous'"):
            convert_checkpoint(FIXTURES / case, tmp_path / "out", to)
        model.config.iteration_style = "current"  # the published iterations have no lckv-llama equivalent
        model.save_pretrained(tmp_path / "current")
        source = tmp_path / "current"
    else:
        source = FIXTURES / case
    convert_checkpoint(source, tmp_path / "out", to)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == to and isinstance(written["layer_types"], str)  # the original code's own format
    converted = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, attn_implementation=model.config._attn_implementation
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(reference["ids"]).logits, model(reference["ids"]).logits, atol=0, rtol=0)


def test_convert_refuses_a_layout_the_target_cannot_say(tmp_path):
    """main_cla shares one layer's KVs among 3 layers, which opt-llama's one target layer cannot say: refused, nothing
    written."""
    with pytest.raises(ValueError, match="^kv_sources: .* shares the KVs of 3 layers"):
        convert_checkpoint(FIXTURES / "main_cla", tmp_path / "out", "opt-llama")
    assert not (tmp_path / "out").exists()


def test_convert_cli_errors_are_one_line(tmp_path, capsys):
    """The command refuses what the target format cannot say with one line and exit status 2, writing nothing."""
    with pytest.raises(SystemExit) as exit_info:
        convert.main([str(FIXTURES / "main_cla"), str(tmp_path / "out"), "--to", "opt-llama"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("python -m tools.convert: error: kv_sources: [0, 0, 2, 2, 4, 4] shares the KVs of 3 layers")
        and "\n" not in err
    )
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        convert.main([str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "lckv-llama"])
    assert "error: SRC: " in capsys.readouterr().err
