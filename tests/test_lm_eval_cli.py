"""The `lm_eval` command line on an exported checkpoint
(`--model hf --model_args pretrained=DIR,trust_remote_code=True`, the local tasks through `--include_path tasks`)
reports the numbers test_harness.py reports for the same checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import test_harness
from corpus import prepare_corpus
from models.export import export_checkpoint
from tests.conftest import REPO, tiny_config, tiny_model

LIMIT = 2
TASKS = "lckv_heldout_ppl,lckv_next_line"
METRICS = {
    "lckv_heldout_ppl": ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"),
    "lckv_next_line": ("acc,none", "acc_norm,none"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """An exported tiny opt-llama with the corpus tokenizer and room for a whole perplexity document."""
    root = tmp_path_factory.mktemp("lm_eval_cli")
    config = tiny_config(vocab_size=4096, max_position_embeddings=1024)
    tiny_model(config).save_pretrained(root / "repo_form")
    AutoTokenizer.from_pretrained(prepare_corpus().tokenizer).save_pretrained(root / "repo_form")
    export_checkpoint(root / "repo_form", root / "exported")
    return root / "exported"


def lm_eval_cli(checkpoint: Path, workdir: Path) -> dict:
    """`lm_eval` in a process whose import path holds only the corpus package (the local tasks build their data from
    it), not the models package: the checkpoint's own code runs."""
    import_path = workdir / "import_path"
    import_path.mkdir()
    (import_path / "corpus").symlink_to(REPO / "corpus")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(import_path), HF_MODULES_CACHE=str(workdir / "hf_modules"), HF_HUB_OFFLINE="1")
    command = [
        str(Path(sys.executable).parent / "lm_eval"),
        "--model",
        "hf",
        "--model_args",
        f"pretrained={checkpoint},trust_remote_code=True,dtype=float32",
        "--tasks",
        TASKS,
        "--include_path",
        str(REPO / "tasks"),
        "--limit",
        str(LIMIT),
        "--device",
        "cpu",
        "--batch_size",
        "1",
        "--seed",
        "0",
        "--output_path",
        str(workdir / "results"),
    ]
    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = (workdir / "results").rglob("results_*.json")
    return json.loads(results_file.read_text())["results"]


def test_lm_eval_cli_equals_test_harness(exported, tmp_path):
    harness_out = tmp_path / "harness.json"
    test_harness.main(
        [
            "--model",
            str(exported),
            "--tasks",
            TASKS,
            "--limit",
            str(LIMIT),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--output_path",
            str(harness_out),
        ]
    )
    harness = json.loads(harness_out.read_text())["results"]
    workdir = tmp_path / "cli"
    workdir.mkdir()
    cli = lm_eval_cli(exported, workdir)
    for task, metrics in METRICS.items():
        for metric in metrics:
            assert cli[task][metric] == pytest.approx(harness[task][metric], rel=1e-6), (task, metric)


def token_by_token_loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context), one token per forward through a KV cache: the exact semantics."""
    ids = torch.tensor([context + continuation])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = torch.cat(
            [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(ids.shape[1])], 1
        )
    logprobs = logits[0, len(context) - 1 : -1].double().log_softmax(-1)
    return logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum().item()


def test_lm_eval_scores_a_prefill_sequential_checkpoint_token_by_token(tmp_path):
    """lm-eval's HFLM calls ``model(ids)`` without a cache, and the Trainer saves ``use_cache: false``: a checkpoint
    saved with ``prefill: "sequential"`` still gets the token-by-token loglikelihood, not the iterations' (large
    weights and 2 iterations: the iterative one differs), as test_harness.py gets it."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tokenizer = AutoTokenizer.from_pretrained(prepare_corpus().tokenizer)
    fields = dict(vocab_size=4096, num_encoders=1, num_trained_encoders=0, initializer_range=0.5, use_cache=False)
    scores = {}
    for prefill in ("sequential", "iterative"):
        tiny_model(tiny_config(prefill=prefill, **fields)).save_pretrained(tmp_path / prefill)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / prefill, dtype=torch.float32).eval()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
        context, continuation = lm._encode_pair("ROMEO: But soft, what light", " through yonder window breaks?")
        request = Instance("loglikelihood", {}, ("ROMEO: But soft, what light", " through yonder window breaks?"), 0)
        ((reported, _),) = lm.loglikelihood([request])
        scores[prefill] = reported, token_by_token_loglikelihood(model, context, continuation)
    reported, exact = scores["sequential"]
    assert reported == pytest.approx(exact, rel=1e-5, abs=1e-4)
    iterative, _ = scores["iterative"]
    assert abs(iterative - exact) > 1e-2, (iterative, exact)  # the check can tell the paths apart
