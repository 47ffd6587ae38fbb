"""A run_clm.py process killed at any moment resumes by itself and loses nothing.

Real subprocesses of run_clm.py on the tiny opt-llama config (constant learning rate, one thread, a few KB of
text): one killed with SIGTERM in the middle of a save, others with SIGKILL after a random number of steps. Re-run
with the same command, each resumes from the newest complete checkpoint and ends with the weights of an
uninterrupted run, bit for bit; every checkpoint directory on disk is complete after every kill.
"""

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_jit_checkpoint import CheckpointManager

import run_clm
from tools.cli import UsageError
from tools.export import export_main
from tools.training_checkpoints import (
    CHECKPOINT_NAME as CHECKPOINT,
)
from tools.training_checkpoints import (
    FINAL_MODEL_DIR,
    JIT_SENTINEL,
    STAGING_DIR,
    check_readable,
    checkpoints_newest_first,
    choose_resume_checkpoint,
    incomplete_reason,
    move_into,
    publish,
    rotate_published,
    stream_epoch,
    stream_position,
)

from .conftest import REPO
from .test_run_clm import base_args, local_args

MAX_STEPS, SAVE_STEPS = 12, 4
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}  # one thread: the same arithmetic in every run, and no fight over 2 cores
LOSS_LINE = re.compile(r"^\{'loss'")
RESUMED = re.compile(r"resuming from (\S+)")

# run_clm.py as __main__, with the Trainer's RNG-state save (the middle of a checkpoint: weights and optimizer are
# written, trainer_state.json is not) writing a marker file and then waiting for a signal at the step it is given.
BLOCKING_SAVE = """
import runpy, signal, sys
from pathlib import Path
import transformers
marker, block_step = Path(sys.argv.pop(1)), int(sys.argv.pop(1))
save_rng_state = transformers.Trainer._save_rng_state
def save_rng_state_then_wait(self, output_dir):
    save_rng_state(self, output_dir)
    if self.state.global_step == block_step:
        marker.with_suffix(".tmp").write_text(output_dir)
        marker.with_suffix(".tmp").rename(marker)
        signal.pause()
transformers.Trainer._save_rng_state = save_rng_state_then_wait
sys.argv[0] = "run_clm.py"
runpy.run_path("run_clm.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from corpus import prepare_corpus

    corpus = prepare_corpus()
    root = tmp_path_factory.mktemp("kill_data")
    (root / "train.txt").write_text(corpus.train.read_text()[:20000])
    (root / "validation.txt").write_text(corpus.validation.read_text()[:2000])
    return root, corpus


def command(data, out: Path) -> list[str]:
    args = base_args("opt-llama", out) + local_args(*data) + ["--do_train", "--max_steps", str(MAX_STEPS)]
    return args + [
        "--save_steps",
        str(SAVE_STEPS),
        "--logging_steps",
        "1",
        "--lr_scheduler_type",
        "constant",
        "--save_total_limit",
        "2",
    ]


def start(command: list[str], log: Path, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    """Start ``command`` in the repository, its stderr (the log) written to ``log`` (a pipe could fill and stall it)."""
    with log.open("w") as handle:
        return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=stdout, stderr=handle, text=True)


def finish(proc: subprocess.Popen, log: Path, allowed=(0,)) -> str:
    """Wait for ``proc``; its exit status is one of ``allowed``; returns its log."""
    status = proc.wait(timeout=300)
    assert status in allowed, log.read_text()[-3000:]
    return log.read_text()


def run(args: list[str], log: Path) -> str:
    """run_clm.py with ``args`` to the end; returns its log."""
    return finish(start([sys.executable, "run_clm.py", *args], log), log)


class Uninterrupted:
    """The reference run, started at once and waited for when its weights are first needed (it overlaps the
    killed runs: the two cores are shared)."""

    def __init__(self, args: list[str], out: Path):
        self.out, self.log = out, out.parent / "log.txt"
        self.proc = start([sys.executable, "run_clm.py", *args], self.log)
        self._weights = None

    def weights(self) -> dict[str, torch.Tensor]:
        if self._weights is None:
            finish(self.proc, self.log)
            self._weights = load_file(self.out / "model.safetensors")
        return self._weights

    def train_loss(self) -> float:
        self.weights()
        return train_loss(self.out)


def train_loss(out: Path) -> float:
    return json.loads((out / "train_results.json").read_text())["train_loss"]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    reference = Uninterrupted(command(data, out), out)
    yield reference
    reference.proc.kill()
    reference.proc.wait()


def assert_same_weights(out: Path, reference: Uninterrupted) -> None:
    expected = reference.weights()
    got = load_file(out / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def assert_checkpoints_complete(out: Path) -> list[str]:
    """Every checkpoint-N directory of ``out`` is complete and readable; returns their names, newest first."""
    checkpoints = checkpoints_newest_first(out) if out.exists() else []
    for checkpoint in checkpoints:
        assert incomplete_reason(checkpoint) is None, (checkpoint, sorted(p.name for p in checkpoint.iterdir()))
        check_readable("checkpoint", checkpoint)
    return [c.name for c in checkpoints]


def resumed_from(stderr: str) -> str | None:
    match = RESUMED.search(stderr)
    return Path(match.group(1)).name if match else None


def test_sigterm_during_a_save_resumes_from_the_last_complete_checkpoint(data, uninterrupted, tmp_path):
    out, marker, log = tmp_path / "out", tmp_path / "saving", tmp_path / "log.txt"
    args = command(data, out)
    block_step = 2 * SAVE_STEPS
    proc = start([sys.executable, "-c", BLOCKING_SAVE, str(marker), str(block_step), *args], log)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        staged = Path(marker.read_text())
        assert staged.parent == out / STAGING_DIR  # the save writes into the staging directory ...
        assert not (out / f"checkpoint-{block_step}").exists()  # ... and checkpoint-8 does not exist yet
        proc.send_signal(signal.SIGTERM)
        finish(proc, log, allowed=(-signal.SIGTERM,))
    finally:
        proc.kill()
    assert (out / STAGING_DIR).exists()
    assert assert_checkpoints_complete(out) == [f"checkpoint-{SAVE_STEPS}"]

    again = run(args, tmp_path / "again.txt")  # the same command
    assert resumed_from(again) == f"checkpoint-{SAVE_STEPS}"
    assert_same_weights(out, uninterrupted)
    assert train_loss(out) == pytest.approx(uninterrupted.train_loss(), rel=1e-6)  # over steps 1-12, not 5-12
    assert not (out / STAGING_DIR).exists()
    assert assert_checkpoints_complete(out) == [f"checkpoint-{MAX_STEPS}", f"checkpoint-{MAX_STEPS - SAVE_STEPS}"]


def run_and_kill_after(args: list[str], steps: int, log: Path) -> tuple[bool, str]:
    """Start run_clm.py; SIGKILL it once it has logged ``steps`` training steps. Returns (finished, its log)."""
    proc = start([sys.executable, "run_clm.py", *args], log, stdout=subprocess.PIPE)
    logged = 0
    for line in proc.stdout:
        logged += bool(LOSS_LINE.match(line))
        if logged == steps:
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    text = finish(proc, log, allowed=(0, -signal.SIGKILL))
    return proc.returncode == 0, text


def test_sigkill_at_random_steps_every_rerun_resumes_and_finishes(data, uninterrupted, tmp_path):
    out = tmp_path / "out"
    args = command(data, out)
    rng = random.Random(0)  # kills after 4, 4, 1 logged steps: two of them next to a save
    for kill in range(3):
        newest = assert_checkpoints_complete(out)[:1]
        finished, text = run_and_kill_after(args, rng.randint(1, SAVE_STEPS + 2), tmp_path / f"kill{kill}.txt")
        assert resumed_from(text) == (newest[0] if newest else None), (kill, text[-2000:])
        assert_checkpoints_complete(out)  # after the kill: no checkpoint directory is half-written
        if finished:
            break
    newest = assert_checkpoints_complete(out)[:1]
    final = run(args, tmp_path / "final.txt")
    assert resumed_from(final) == (newest[0] if newest else None)
    assert_same_weights(out, uninterrupted)
    assert train_loss(out) == pytest.approx(uninterrupted.train_loss(), rel=1e-6)
    assert not (out / STAGING_DIR).exists()
    assert assert_checkpoints_complete(out)[0] == f"checkpoint-{MAX_STEPS}"


def test_a_rerun_after_the_last_checkpoint_trains_nothing(data, uninterrupted, tmp_path):
    """Killed after its last checkpoint (while saving the final model or writing its metrics): the re-run takes the
    trained state as it is. transformers' train() from a checkpoint saved at max_steps ran one step more (a
    checkpoint-13, other weights), and a truncated all_results.json made every re-run fail to read it."""
    uninterrupted.weights()  # waits for the reference run
    out, exported = tmp_path / "out", tmp_path / "exported"
    shutil.copytree(uninterrupted.out, out)
    unfinished = out / STAGING_DIR / FINAL_MODEL_DIR  # killed while the final model was saved: part of it staged
    unfinished.mkdir(parents=True)
    os.replace(out / "model.safetensors", unfinished / "model.safetensors")
    (out / "train_results.json").unlink()
    (out / "all_results.json").write_text('{"epoch": 1.0, "train_lo')  # killed in the middle of writing it
    with pytest.raises(UsageError, match="SRC: .*the final model's save did not finish"):
        export_main([str(out), str(exported)])
    text = run(command(data, out), tmp_path / "rerun.txt")
    assert "nothing left to train" in text and not LOSS_LINE.search(text)
    assert_same_weights(out, uninterrupted)
    assert train_loss(out) == pytest.approx(uninterrupted.train_loss(), rel=1e-6)  # from checkpoint-12's loss sum
    assert not (out / STAGING_DIR).exists()
    export_main([str(out), str(exported)])
    assert (exported / "model.safetensors").is_file() and not list(exported.glob("checkpoint-*"))
    assert assert_checkpoints_complete(out)[0] == f"checkpoint-{MAX_STEPS}"
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == MAX_STEPS
    assert "epoch" in json.loads((out / "all_results.json").read_text())


def test_best_model_and_rotation_point_at_published_checkpoints(data, tmp_path):
    """save_total_limit 1 with load_best_model_at_end: the best checkpoint is recorded under its published name and
    survives the rotation; nothing stays in the staging directory."""
    out = tmp_path / "out"
    args = command(data, out)
    args[args.index("--save_total_limit") + 1] = "1"
    args += [
        "--do_eval",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        str(SAVE_STEPS),
        "--max_eval_samples",
        "8",
        "--load_best_model_at_end",
        "true",
        "--metric_for_best_model",
        "loss",
        "--greater_is_better",
        "false",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses: tiny matrices, and 2 shared cores
    try:
        state = run_clm.main(args)["trainer"].state
    finally:
        torch.set_num_threads(threads)
    best = Path(state.best_model_checkpoint)
    assert best.parent == out and best.name == f"checkpoint-{state.best_global_step}"
    recorded = json.loads((out / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())["best_model_checkpoint"]
    assert Path(recorded) == best
    assert set(assert_checkpoints_complete(out)) == {best.name, f"checkpoint-{MAX_STEPS}"}
    assert not (out / STAGING_DIR).exists()


def test_the_end_of_training_retires_the_checkpoints_it_drops(data, tmp_path, monkeypatch):
    """save_total_limit 1, the best checkpoint an early one (greater loss is better): at the end transformers deletes
    every other checkpoint with rmtree, which a kill could leave half done; they are renamed away first instead."""
    out = tmp_path / "out"
    args = command(data, out)
    args[args.index("--save_total_limit") + 1] = "1"
    args += ["--do_eval", "--eval_strategy", "steps", "--eval_steps", str(SAVE_STEPS), "--max_eval_samples", "8"]
    args += ["--load_best_model_at_end", "true", "--metric_for_best_model", "loss", "--greater_is_better", "true"]
    deleted, rmtree = [], shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: deleted.append(Path(path)) or rmtree(path, *a, **k))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state = run_clm.main(args)["trainer"].state
    finally:
        torch.set_num_threads(threads)
    best = Path(state.best_model_checkpoint)
    assert best.name != f"checkpoint-{MAX_STEPS}" and assert_checkpoints_complete(out) == [best.name]
    assert not [path for path in deleted if CHECKPOINT.match(path.name)], deleted  # only staging directories


def fake_checkpoint(path: Path, complete: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": int(path.name.split("-")[1])}))
    return path


def test_resume_skips_and_names_incomplete_checkpoints(tmp_path, caplog):
    fake_checkpoint(tmp_path / "checkpoint-5")
    fake_checkpoint(tmp_path / "checkpoint-10")
    fake_checkpoint(tmp_path / "checkpoint-15", complete=False)  # a plain Trainer killed while it saved
    jit = fake_checkpoint(tmp_path / "checkpoint-20")
    (jit / JIT_SENTINEL).write_text("in progress")  # transformers' JIT checkpoint killed while it saved
    (tmp_path / "checkpoint-7.txt").write_text("not a directory")
    with caplog.at_level(logging.INFO, logger="tools.training_checkpoints"):
        chosen = choose_resume_checkpoint(None, tmp_path, auto=True)
    assert chosen == str(tmp_path / "checkpoint-10")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "checkpoint-20 (holds checkpoint-is-incomplete.txt)" in lines[0]
    assert "checkpoint-15 (no trainer_state.json)" in lines[0] and "resuming from" in lines[0]
    assert choose_resume_checkpoint(None, tmp_path, auto=False) is None
    with pytest.raises(
        UsageError, match="checkpoint-15 is not a complete Trainer checkpoint \\(no trainer_state.json\\)"
    ):
        choose_resume_checkpoint(str(tmp_path / "checkpoint-15"), tmp_path, auto=True)


def test_publish_replaces_an_existing_checkpoint_in_one_rename(tmp_path):
    old = fake_checkpoint(tmp_path / "checkpoint-4")
    (old / "stale.bin").write_text("from an earlier run")
    staged = fake_checkpoint(tmp_path / STAGING_DIR / "checkpoint-4")
    (staged / "model.safetensors").write_text("new")
    publish(staged, old)
    assert sorted(p.name for p in old.iterdir()) == ["config.json", "model.safetensors", "trainer_state.json"]
    assert not (tmp_path / STAGING_DIR).exists()


def test_train_loss_of_a_resumed_run_covers_every_step(data, tmp_path):
    """Logged every 3 steps, saved every 4: checkpoint-4 holds step 4's loss, not logged yet. A run resumed from it
    reports the train_loss of the uninterrupted run (transformers' own averages steps 5-8 only)."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = base_args("opt-llama", whole) + local_args(*data) + ["--do_train", "--max_steps", "8", "--save_steps", "4"]
    args += ["--logging_steps", "3", "--lr_scheduler_type", "constant"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = run_clm.main(args)["train"]["train_loss"]
        (resumed / "checkpoint-4").parent.mkdir()
        shutil.copytree(whole / "checkpoint-4", resumed / "checkpoint-4")
        record = json.loads((resumed / "checkpoint-4" / "loss_sum.json").read_text())
        logged = [h["loss"] for h in json.loads((whole / "trainer_state.json").read_text())["log_history"][:1]]
        assert record["global_step"] == 4 and record["loss_sum"] > 3 * logged[0] > 0  # steps 1-3 logged, 4 not
        args[args.index("--output_dir") + 1] = str(resumed)
        result = run_clm.main(args)
        got = result["train"]["train_loss"]
        # An evaluation whose metrics are named train_* keeps its own loss (only train()'s end is rewritten).
        trainer = result["trainer"]
        evaluated = trainer.evaluate(trainer.train_dataset, metric_key_prefix="train")["train_loss"]
        assert trainer.state.log_history[-1]["train_loss"] == evaluated != got
        # Resumed from a checkpoint without the record (a plain Trainer's): transformers' average of the steps
        # after it, said in a warning; the next checkpoints have no record either, and nothing fails.
        plain = tmp_path / "plain"
        shutil.copytree(whole / "checkpoint-4", plain / "checkpoint-4")
        (plain / "checkpoint-4" / "loss_sum.json").unlink()
        args[args.index("--output_dir") + 1] = str(plain)
        per_call = run_clm.main(args)["train"]["train_loss"]
    finally:
        torch.set_num_threads(threads)
    assert got == pytest.approx(expected, rel=1e-6)
    assert json.loads((resumed / "train_results.json").read_text())["train_loss"] == got
    assert per_call != pytest.approx(expected, rel=1e-3) and not (plain / "checkpoint-8" / "loss_sum.json").exists()


def test_a_checkpoint_saved_inside_a_step_records_the_finished_steps_only(data, tmp_path, monkeypatch):
    """transformers' JIT checkpoint (``--enable_jit_checkpoint``, on SIGTERM) may save before the optimizer step, when
    the step's micro-batch losses are already summed: checkpoint-4 saved inside step 5 records steps 1-4 only, and
    the run resumed from it (which trains step 5 again) reports the uninterrupted run's train_loss."""
    from transformers.trainer_jit_checkpoint import JITCheckpointCallback

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = base_args("opt-llama", whole) + local_args(*data) + ["--do_train", "--max_steps", "8", "--save_steps", "100"]
    args += ["--gradient_accumulation_steps", "2", "--logging_steps", "3", "--lr_scheduler_type", "constant"]
    args += ["--enable_jit_checkpoint", "true"]
    before_optimizer_step, requests = JITCheckpointCallback.on_pre_optimizer_step, []

    def request_inside_step_5(self, args, state, control, **kwargs):  # SIGTERM's request, at a chosen moment
        if state.global_step == 4 and not requests:
            requests.append(state.global_step)
            self.jit_manager.is_checkpoint_requested = True
        return before_optimizer_step(self, args, state, control, **kwargs)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = run_clm.main(args)["train"]["train_loss"]
        args[args.index("--output_dir") + 1] = str(cut)
        with monkeypatch.context() as patch:
            patch.setattr(JITCheckpointCallback, "on_pre_optimizer_step", request_inside_step_5)
            run_clm.main(args)
        assert requests == [4] and assert_checkpoints_complete(cut) == ["checkpoint-4"]  # only the JIT save
        assert json.loads((cut / "checkpoint-4" / "loss_sum.json").read_text())["global_step"] == 4
        got = run_clm.main(args)["train"]["train_loss"]
    finally:
        torch.set_num_threads(threads)
    assert got == pytest.approx(expected, rel=1e-6)


def test_the_final_model_replaces_an_earlier_one_whole(tmp_path):
    """move_into: the new files in, an earlier save's weight shards that the new one does not write out."""
    staged, final = tmp_path / "staged", tmp_path / "final"
    staged.mkdir()
    final.mkdir()
    for name in ("model.safetensors", "config.json"):
        (staged / name).write_text("new")
    for name in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json", "notes.txt"):
        (final / name).write_text("old")
    move_into(staged, final)
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    assert (final / "config.json").read_text() == "new" and not any(staged.iterdir())


def test_rotation_renames_before_it_deletes(tmp_path, monkeypatch):
    """Oldest by modification time go first; the newest and the best stay; a kill during the deletion leaves the
    rotated checkpoints whole in the staging directory (which the next save removes), none half deleted."""
    for age, step in enumerate([20, 8, 4, 12, 16]):  # modification times: checkpoint-20 oldest, checkpoint-16 newest
        checkpoint = fake_checkpoint(tmp_path / f"checkpoint-{step}")
        os.utime(checkpoint, (1000 + age, 1000 + age))

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt  # the process dies as the deletion starts

    with monkeypatch.context() as patched:
        patched.setattr(shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            rotate_published(tmp_path, 2, best_model_checkpoint=str(tmp_path / "checkpoint-8"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_checkpoint-in-progress", "checkpoint-16", "checkpoint-8"]
    rotated = sorted((tmp_path / STAGING_DIR).iterdir())
    assert [p.name for p in rotated] == ["checkpoint-12", "checkpoint-20", "checkpoint-4"]
    assert all(incomplete_reason(c) is None for c in rotated)
    shutil.rmtree(tmp_path / STAGING_DIR)
    rotate_published(tmp_path, 2, best_model_checkpoint=str(tmp_path / "checkpoint-8"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-16", "checkpoint-8"]
    rotate_published(tmp_path, None, None)  # no limit: nothing deleted
    rotate_published(tmp_path, 1, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-16"]


def single_threaded_main(args: list[str]) -> dict:
    """``run_clm.main(args)`` on one thread, as in the subprocesses: tiny matrices, and 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_clm.main(args)
    finally:
        torch.set_num_threads(threads)


def without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if "runtime" not in k and "per_second" not in k} for entry in history]


def test_a_rerun_after_the_end_of_training_ends_as_the_run_did(data, tmp_path):
    """--load_best_model_at_end with an early best checkpoint (greater loss is better). A re-run after the last
    checkpoint (the same command again, or a run killed in its final save, metrics or evaluation) saved the newest
    checkpoint's weights instead of the best one's, left the train summary out of trainer_state.json's log_history,
    reported an earlier, shorter run's train_results.json as its own, and kept the checkpoints a kill between a
    checkpoint's publication and its rotation left."""
    out = tmp_path / "out"
    args = command(data, out) + ["--do_eval", "--eval_strategy", "steps", "--eval_steps", str(SAVE_STEPS)]
    args += ["--max_eval_samples", "8", "--load_best_model_at_end", "true", "--metric_for_best_model", "loss"]
    args += ["--greater_is_better", "true"]
    single_threaded_main(args)
    best = out / f"checkpoint-{SAVE_STEPS}"
    weights = load_file(out / "model.safetensors")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    results = json.loads((out / "train_results.json").read_text())
    assert weights.keys() == load_file(best / "model.safetensors").keys()
    assert all(torch.equal(weights[k], v) for k, v in load_file(best / "model.safetensors").items())
    assert "train_runtime" in history[-1] and assert_checkpoints_complete(out) == [f"checkpoint-{MAX_STEPS}", best.name]

    def assert_ended_as_the_run(exact: bool) -> None:
        got = load_file(out / "model.safetensors")
        assert all(torch.equal(got[k], v) for k, v in weights.items())  # the best checkpoint's weights
        logged = json.loads((out / "trainer_state.json").read_text())["log_history"]
        if exact:
            assert logged == history
        else:  # train_loss from the checkpoint's loss sum; the run's time is not known
            assert without_timings(logged[:-1]) == without_timings(history[:-1])
            assert without_timings(logged)[-1] == without_timings(history)[-1] | {"train_loss": pytest.approx(
                results["train_loss"], rel=1e-6)}  # fmt: skip
        assert assert_checkpoints_complete(out) == [f"checkpoint-{MAX_STEPS}", best.name]

    single_threaded_main(args)  # the same command again: the finished run's train metrics are its own
    assert_ended_as_the_run(exact=True)
    assert json.loads((out / "train_results.json").read_text()) == results

    # Killed between checkpoint-8's publication and its rotation, and in the final save; train_results.json an
    # earlier run's, of 4 steps into the same directory.
    shutil.copytree(best, out / "checkpoint-8")
    for age, step in enumerate((SAVE_STEPS, 2 * SAVE_STEPS, MAX_STEPS)):  # rotation goes by modification time
        os.utime(out / f"checkpoint-{step}", (1000 + 100 * age, 1000 + 100 * age))
    (out / "model.safetensors").unlink()
    earlier = {"epoch": 0.5, "train_loss": 8.5, "train_runtime": 1.5, "train_samples": 600}
    (out / "train_results.json").write_text(json.dumps(earlier))
    metrics = single_threaded_main(args)["train"]
    assert_ended_as_the_run(exact=False)
    assert metrics["train_loss"] == pytest.approx(results["train_loss"], rel=1e-6) and "train_runtime" not in metrics
    assert json.loads((out / "train_results.json").read_text()) == metrics
    combined = json.loads((out / "all_results.json").read_text())  # no timings left from the finished run's
    assert {k: v for k, v in combined.items() if k.startswith("train_")} == {
        k: v for k, v in metrics.items() if k != "epoch"
    }


def test_a_streaming_run_resumed_in_its_second_pass_reads_on_where_it_stopped(data, tmp_path):
    """--streaming over a stream of 3 batches: checkpoint-4 is 1 batch into the second pass. transformers skipped
    4 batches into the first pass (all of it, and nothing was trained) and started the second pass at its beginning,
    training the first batch again; resumed from the checkpoint's epoch the run trains on what the uninterrupted run
    trained on, to the same weights."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = base_args("opt-llama", whole) + local_args(*data) + ["--streaming", "--do_train", "--max_steps", "8"]
    args += [
        "--max_train_samples",
        "24",
        "--save_steps",
        "4",
        "--logging_steps",
        "1",
        "--lr_scheduler_type",
        "constant",
    ]
    expected = single_threaded_main(args)["trainer"].state.log_history
    shutil.copytree(whole / "checkpoint-4", resumed / "checkpoint-4")
    args[args.index("--output_dir") + 1] = str(resumed)
    logged = single_threaded_main(args)["trainer"].state.log_history
    steps = [(h["step"], h["epoch"], h["loss"]) for h in expected if "loss" in h]
    assert [epoch for _, epoch, _ in steps] == [0.125, 0.25, 0.375, 1.125, 1.25, 1.375, 2.125, 2.25]  # 3 per pass
    assert [(h["step"], h["epoch"], h["loss"]) for h in logged if "loss" in h] == steps  # 1-4 from the checkpoint
    got, want = load_file(resumed / "model.safetensors"), load_file(whole / "model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in want.items())

    # Resumed for longer (--max_steps 12) and stopped by a JIT checkpoint before its first step (SIGTERM while it
    # started): the checkpoint it saves records the same position, 1 batch into the second pass, with max_steps 12.
    again = tmp_path / "again"
    shutil.copytree(whole / "checkpoint-4", again / "checkpoint-4")
    args[args.index("--output_dir") + 1] = str(again)
    args[args.index("--max_steps") + 1] = "12"
    with pytest.MonkeyPatch.context() as patch:  # the signal arrived: a checkpoint is requested at the first step
        patch.setattr(CheckpointManager, "setup_signal_handler", lambda manager: setattr(
            manager, "is_checkpoint_requested", True))  # fmt: skip
        single_threaded_main([*args, "--enable_jit_checkpoint", "true"])
    state = json.loads((again / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["max_steps"] == 12 and state["global_step"] == 4
    assert stream_position(again / "checkpoint-4", 1) == stream_position(whole / "checkpoint-4", 1) == (1, 1)
    assert stream_epoch(1, 1, 12, 1) == state["epoch"]
