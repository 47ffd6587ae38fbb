"""test_harness.py: the local perplexity task through lm-eval equals the perplexity from the model's own logits."""

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import test_harness  # noqa: E402
from tasks.lckv_data import build_task_data  # noqa: E402

LIMIT = 2


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    """The tiny opt-llama config with the corpus tokenizer's vocabulary and room for a whole document."""
    config = json.loads((ROOT / "configs" / "test_tiny_opt.json").read_text())
    config.update(vocab_size=4096, max_position_embeddings=1024)
    path = tmp_path_factory.mktemp("harness") / "tiny_opt.json"
    path.write_text(json.dumps(config))
    return path


def direct_word_perplexity(model, tokenizer, texts: list[str]) -> float:
    """exp(-sum log p(token | bos, earlier tokens) / sum words), from one forward per document."""
    total_logprob, total_words = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert len(ids) < model.config.max_position_embeddings, "document must fit one rolling window"
        inputs = torch.tensor([[tokenizer.bos_token_id, *ids[:-1]]])
        with torch.no_grad():
            logprobs = model(inputs).logits.double().log_softmax(-1)[0]
        total_logprob += logprobs.gather(-1, torch.tensor(ids)[:, None]).sum().item()
        total_words += len(re.split(r"\s+", text))
    return math.exp(-total_logprob / total_words)


def test_local_perplexity_equals_direct(tiny_config, tmp_path, hub_offline, capsys):
    out = tmp_path / "results.json"
    argv = ["--model", str(tiny_config), "--limit", str(LIMIT), "--device", "cpu", "--output_path", str(out)]
    test_harness.main(argv)

    printed = capsys.readouterr().out
    assert "hub unreachable" in printed and "lckv_next_line" in printed
    written = json.loads(out.read_text())
    assert written["config"]["sequential_forward"] is False  # the iterative forward, and the results say so
    results = written["results"]
    correct = results["lckv_next_line"]["acc,none"] * LIMIT  # the accuracy of LIMIT documents: a whole count
    assert correct == pytest.approx(round(correct)) and 0 <= round(correct) <= LIMIT
    reported = results["lckv_heldout_ppl"]["word_perplexity,none"]

    args = test_harness.parse_args(argv)
    model = test_harness.load_model(str(tiny_config), torch.float32, "cpu", sequential=None, seed=args.seed)
    tokenizer = test_harness.load_tokenizer(None, str(tiny_config))
    lines = build_task_data()["lckv_heldout_ppl"].read_text().splitlines()[:LIMIT]
    expected = direct_word_perplexity(model, tokenizer, [json.loads(line)["text"] for line in lines])
    assert reported == pytest.approx(expected, rel=1e-4)


def test_sequential_flag_and_bad_tokenizer(tiny_config, capsys):
    model = test_harness.load_model(str(tiny_config), torch.float32, "cpu", sequential="--sequential", seed=0)
    assert model.config.sequential_forward
    small = json.loads(tiny_config.read_text()) | {"vocab_size": 256}
    small_path = tiny_config.parent / "small_vocab.json"
    small_path.write_text(json.dumps(small))
    with pytest.raises(SystemExit) as exit_info:
        test_harness.main(
            ["--model", str(small_path), "--tasks", "lckv_heldout_ppl", "--limit", "1", "--device", "cpu"]
        )
    assert exit_info.value.code == 2 and "vocab_size" in capsys.readouterr().err
