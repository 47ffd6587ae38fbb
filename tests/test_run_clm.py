"""run_clm.py on CPU with tiny models and tiny data: training, resuming, sequential evaluation, KV loss, bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pytest  # noqa: E402
import torch  # noqa: E402

import run_clm  # noqa: E402

TINY_OPT = str(REPO / "configs" / "test_tiny_opt.json")
TINY_LLAMA = str(REPO / "configs" / "llama_tiny.json")
SHRINK = "hidden_size=64,intermediate_size=128,num_hidden_layers=6,num_attention_heads=4,num_key_value_heads=2"
MODELS = {"opt-llama": (TINY_OPT, ""), "llama": (TINY_LLAMA, SHRINK)}


# No hub: tests make their own data and use the locally trained tokenizer.
pytestmark = pytest.mark.usefixtures("hub_offline")


@pytest.fixture(scope="module")
def small_data(corpus, tmp_path_factory):
    """A few KB of the embedded corpus as local txt files."""
    d = tmp_path_factory.mktemp("data")
    (d / "train.txt").write_text(corpus.train.read_text()[:30000])
    (d / "validation.txt").write_text(corpus.validation.read_text()[:6000])
    return d


def base_args(model: str, out: Path, overrides: str = "", block_size: int = 32) -> list[str]:
    config, shrink = MODELS[model]
    overrides = ",".join(filter(None, [shrink, overrides]))
    args = ["--config_name", config, "--output_dir", str(out), "--block_size", str(block_size)]
    args += ["--config_overrides", overrides] if overrides else []
    args += ["--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--report_to", "none"]
    args += ["--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--seed", "0", "--learning_rate", "3e-3"]
    return args


def local_args(small_data: Path, corpus) -> list[str]:
    return [
        "--train_file", str(small_data / "train.txt"),
        "--validation_file", str(small_data / "validation.txt"),
        "--tokenizer_name", str(corpus.tokenizer),
    ]  # fmt: skip


def losses(trainer) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("model", ["opt-llama", "llama"])
def test_embedded_corpus_training_lowers_loss(model, tmp_path):
    args = base_args(model, tmp_path / "out", block_size=64)
    args += ["--use_embedded_corpus", "--do_train", "--do_eval", "--max_steps", "30", "--logging_steps", "5"]
    args += ["--max_train_samples", "512", "--max_eval_samples", "32", "--save_strategy", "no"]
    result = run_clm.main(args)
    history = losses(result["trainer"])
    assert history[-1][1] < history[0][1] - 0.5, history
    saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert saved["perplexity"] == pytest.approx(result["eval"]["perplexity"])
    assert 1 < saved["perplexity"] < 4096  # better than uniform over the 4096-token vocabulary


@pytest.mark.parametrize("model", ["opt-llama", "llama"])
def test_resume_continues_at_step_with_same_optimizer_state(model, tmp_path, small_data, corpus):
    common = base_args(model, tmp_path / "a") + local_args(small_data, corpus)
    common += ["--do_train", "--logging_steps", "1", "--save_steps", "3"]
    full = run_clm.main(common + ["--max_steps", "6"])
    assert full["trainer"].state.global_step == 6

    # Explicit --resume_from_checkpoint into a fresh output_dir: steps 4..6 again, same end state.
    resumed_args = base_args(model, tmp_path / "b") + local_args(small_data, corpus)
    resumed_args += ["--do_train", "--logging_steps", "1", "--save_steps", "3", "--max_steps", "6"]
    resumed = run_clm.main(resumed_args + ["--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-3")])
    assert resumed["trainer"].state.global_step == 6
    assert [s for s, _ in losses(resumed["trainer"]) if s > 3] == [4, 5, 6]
    a = torch.load(tmp_path / "a" / "checkpoint-6" / "optimizer.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint-6" / "optimizer.pt", weights_only=True)
    assert a["state"].keys() == b["state"].keys() and a["state"]
    for key in a["state"]:
        assert a["state"][key]["step"] == b["state"][key]["step"]
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a["state"][key][name], b["state"][key][name], rtol=1e-4, atol=1e-7)

    # Automatic resume: the same command with more steps picks up output_dir/checkpoint-6.
    more = run_clm.main(common + ["--max_steps", "8"])
    assert more["trainer"].state.global_step == 8
    assert [s for s, _ in losses(more["trainer"]) if s > 6] == [7, 8]


def eval_loss(tmp_path, small_data, corpus, overrides: str, block_size: int, sequential: bool) -> float:
    args = base_args("opt-llama", tmp_path / f"eval-{block_size}-{sequential}", overrides, block_size)
    args += local_args(small_data, corpus) + ["--do_eval", "--max_eval_samples", "4"]
    args += ["--eval_sequential"] if sequential else []
    result = run_clm.main(args)
    assert result["eval"]["eval_sequential"] is sequential
    return result["eval"]["eval_loss"]


def test_eval_sequential_equals_parallel_with_enough_iterations(tmp_path, small_data, corpus):
    # num_encoders + 1 >= block_size: the parallel iterations are exact.
    overrides = "num_encoders=8,num_trained_encoders=1,initializer_range=0.5"
    parallel = eval_loss(tmp_path, small_data, corpus, overrides, 8, sequential=False)
    sequential = eval_loss(tmp_path, small_data, corpus, overrides, 8, sequential=True)
    assert sequential == pytest.approx(parallel, rel=1e-5, abs=1e-5)


def test_eval_sequential_differs_with_few_iterations(tmp_path, small_data, corpus):
    overrides = "num_encoders=1,num_trained_encoders=0,initializer_range=0.5"
    parallel = eval_loss(tmp_path, small_data, corpus, overrides, 32, sequential=False)
    sequential = eval_loss(tmp_path, small_data, corpus, overrides, 32, sequential=True)
    print(f"eval loss: parallel {parallel:.6f} sequential {sequential:.6f} (2 iterations, block 32)")
    assert abs(sequential - parallel) > 1e-4


def test_a_config_with_the_exact_prefill_evaluates_by_the_iterations_during_training(tmp_path, small_data, corpus):
    """``prefill: "sequential"`` makes every evaluation-mode forward exact, but evaluations during training stay
    iterative (as ``--eval_sequential`` says): with 2 iterations the in-training loss of the step-2 model differs from
    its exact final one; the config saved with the checkpoint keeps its own field."""
    overrides = "num_encoders=1,num_trained_encoders=0,initializer_range=0.5,prefill=sequential"
    args = base_args("opt-llama", tmp_path / "out", overrides) + local_args(small_data, corpus)
    args += ["--do_train", "--do_eval", "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2"]
    args += ["--save_steps", "2", "--max_eval_samples", "4", "--learning_rate", "1e-9"]
    result = run_clm.main(args)
    during, final = [h["eval_loss"] for h in result["trainer"].state.log_history if "eval_loss" in h]
    assert final == result["eval"]["eval_loss"] and result["eval"]["eval_sequential"] is True
    assert abs(during - final) > 1e-4, (during, final)
    assert json.loads((tmp_path / "out" / "checkpoint-2" / "config.json").read_text())["prefill"] == "sequential"


def test_during_training_evaluation_restores_the_config():
    config = run_clm.shared.load_config("--config_name", TINY_OPT)
    for prefill, sequential_forward, inside in [("sequential", False, "iterative"), ("sequential", True, "sequential")]:
        config.prefill, config.sequential_forward = prefill, sequential_forward
        with pytest.raises(KeyError), run_clm.during_training_evaluation(config):
            assert config.prefill == inside
            raise KeyError
        assert (config.prefill, config.sequential_forward) == (prefill, sequential_forward)


@pytest.mark.parametrize("train_kv", [True, False])
def test_train_kv_logs_kv_loss(train_kv, tmp_path, small_data, corpus):
    args = base_args("opt-llama", tmp_path / "out", f"train_kv={str(train_kv).lower()}") + local_args(
        small_data, corpus
    )
    result = run_clm.main(args + ["--do_train", "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no"])
    logged = [h["kv_loss"] for h in result["trainer"].state.log_history if "kv_loss" in h]
    if train_kv:
        assert len(logged) == 3 and all(v >= 0 for v in logged)
    else:
        assert logged == []


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--train_file", "missing.txt"], "--train_file: missing.txt does not exist"),
        (["--validation_file", "nowhere.jsonl"], "--validation_file: nowhere.jsonl does not exist"),
        (["--config_overrides", "hidden_size=64,no_such_field=3"],
         r"--config_overrides: unknown config field\(s\) \['no_such_field'\]"),
        (["--block_size", "4096"], r"--block_size: 4096 exceeds the model's max_position_embeddings \(128\)"),
        (["--tokenizer_name", "someone/tokenizer-on-the-hub"],
         "--tokenizer_name: someone/tokenizer-on-the-hub does not exist locally, and offline"),
    ],
)  # fmt: skip
def test_bad_input_is_a_one_line_error(extra, match, tmp_path, corpus, capsys):
    args = ["--config_name", TINY_OPT, "--output_dir", str(tmp_path), "--do_train", "--report_to", "none"]
    if "--tokenizer_name" not in extra:
        args += ["--tokenizer_name", str(corpus.tokenizer)]
    if "--train_file" not in extra:
        args += ["--train_file", str(corpus.train)]
    with pytest.raises(SystemExit) as exit_info:
        run_clm.main(args + extra)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and re.search(match, err) and "\n" not in err


def test_a_missing_text_column_is_an_error_naming_the_columns(tmp_path, corpus, capsys):
    """It fell back to the first column (here the titles) and trained on it; found once the data is loaded, so
    datasets' progress lines may come before the error line."""
    data = tmp_path / "scenes.jsonl"
    rows = [{"title": f"Scene {i}", "content": "ROMEO: But soft, what light through yonder window?"} for i in range(3)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["--config_name", TINY_OPT, "--output_dir", str(tmp_path / "out"), "--do_train", "--report_to", "none"]
    args += ["--tokenizer_name", str(corpus.tokenizer), "--train_file", str(data), "--validation_file", str(data)]
    with pytest.raises(SystemExit) as exit_info:
        run_clm.main(args + ["--text_column", "body"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "run_clm.py: error: --text_column: 'body' is not a column of the data; allowed are title, content"
    )
    assert not (tmp_path / "out").exists()


def test_cli_prints_one_line_error(tmp_path):
    cmd = [sys.executable, str(REPO / "run_clm.py"), "--config_name", TINY_LLAMA, "--output_dir", str(tmp_path)]
    cmd += ["--do_train", "--use_embedded_corpus", "--config_overrides", "bogus=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "run_clm.py: error: --config_overrides: unknown config field(s) ['bogus'] for model_type 'llama'"


def test_streaming_trains_and_evaluates(tmp_path, small_data, corpus):
    args = base_args("opt-llama", tmp_path / "out") + local_args(small_data, corpus)
    args += [
        "--streaming",
        "--do_train",
        "--do_eval",
        "--max_steps",
        "2",
        "--max_eval_samples",
        "8",
        "--save_strategy",
        "no",
    ]
    result = run_clm.main(args)
    assert result["trainer"].state.global_step == 2
    assert result["eval"]["perplexity"] > 1
