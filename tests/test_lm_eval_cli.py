"""The `lm_eval` command line on an exported checkpoint
(`--model hf --model_args pretrained=DIR,trust_remote_code=True`, the local tasks through `--include_path tasks`)
reports the numbers test_harness.py reports for the same checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

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
