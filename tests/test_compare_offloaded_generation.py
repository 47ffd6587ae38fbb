"""bench/compare_offloaded_generation.py: where two greedy runs part (pure), a case compared on the CPU, a crashing case
recorded rather than fatal, and its bad input."""

import json

import pytest
import torch

from bench import compare_offloaded_generation as compare
from tools.cli import UsageError

from .conftest import CONFIGS

PROMPT = 3


def runs(new_tokens: list[int], logits: list[list[float]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A greedy run's ``(1, PROMPT + new)`` sequence and its ``new x (1, vocab)`` logits."""
    return torch.tensor([[7] * PROMPT + new_tokens]), [torch.tensor([row]) for row in logits]


def test_agreement_of_equal_runs():
    sequence, logits = runs([0, 1], [[2.0, 1.0], [0.5, 1.5]])
    assert compare.agreement(sequence, sequence, logits, logits) == {
        "parting_step": None,
        "max_logit_difference": 0.0,
        "max_abs_logit": 2.0,
    }


def test_agreement_of_runs_parting_at_a_tie():
    # Step 1 is a tie that the two runs break apart; the logits of step 2 (other inputs by then) are not compared.
    first, first_logits = runs([0, 1, 1], [[2.0, 1.0], [1.0, 1.0], [0.0, 9.0]])
    second, second_logits = runs([0, 0, 0], [[2.0, 1.25], [1.0, 1.0], [9.0, 0.0]])
    assert compare.agreement(first, second, first_logits, second_logits) == {
        "parting_step": 1,
        "max_logit_difference": 0.25,
        "max_abs_logit": 2.0,
        "resident_top2_gap_at_parting": 0.0,
    }


def test_a_case_compares_two_caches_on_the_cpu(monkeypatch):
    # Offloading needs CUDA; pairing dynamic with static runs the same comparison through two real caches.
    monkeypatch.setitem(compare.PAIRS, "dynamic", "static")
    args = compare.parse_args(["--prompt_len", "8", "--gen_len", "3", "--device", "cpu", "--repeats", "2"])
    result = compare.run_case(args, str(CONFIGS / "llama_tiny_opt.json"), "fp32", "dynamic")
    assert result["parting_step"] is None and result["parting_step_without_logits"] is None
    assert result["parting_steps_of_repeats"] == {"dynamic": [None, None], "static": [None, None]}
    assert result["max_logit_difference"] <= 1e-5 * result["max_abs_logit"]


def test_a_crashing_case_is_recorded(tmp_path):
    # On the CPU an offloaded cache fails in its first update (no CUDA stream): recorded with its exit status.
    argv = ["--configs", str(CONFIGS / "llama_tiny_opt.json"), "--dtypes", "fp32", "--resident", "dynamic"]
    argv += ["--prompt_len", "4", "--gen_len", "2", "--device", "cpu", "--output_dir", str(tmp_path)]
    out = compare.main(argv)
    saved = json.loads((tmp_path / "agreement.json").read_text())
    assert saved["cases"] == out["cases"] and len(out["cases"]) == 1
    case = out["cases"][0]
    assert (case["dtype"], case["resident"], case["exit_status"]) == ("fp32", "dynamic", 1) and case["stderr_tail"]


@pytest.mark.parametrize(
    "argv",
    [["--dtypes", "fp16"], ["--resident", "offloaded"], ["--gen_len", "0"], ["--configs", "missing.json"]],
)
def test_bad_arguments(argv):
    with pytest.raises(UsageError, match=f"^{argv[0]}: "):
        compare.parse_args([*argv, "--device", "cpu"])
