"""Trainer checkpoints that are complete or absent, and the choice of the one to resume from.

transformers' Trainer writes ``checkpoint-N/`` file by file where it will stay (config, weights, optimizer,
scheduler, RNG states, ``trainer_state.json`` last, then rotation), so a run killed while it saves leaves a
directory with only the first files, and ``get_last_checkpoint`` picks it by its name. Here:

* ``AtomicCheckpoints`` (a Trainer mixin) lets the Trainer write the checkpoint into
  ``OUTPUT_DIR/_checkpoint-in-progress/checkpoint-N`` and publishes it with one ``rename`` (atomic on POSIX within
  a filesystem), so a kill at any moment leaves the complete ``checkpoint-N`` or none; a staging directory left by
  a killed save is removed by the next save (and when training starts).
* The final model (``save_model()`` outside a checkpoint) is written there too, as ``final-model``, and its files
  are then moved into ``OUTPUT_DIR`` one rename each: while any is left, the staging directory says the save did not
  finish (``python -m tools.export`` refuses such a directory; the next run of the same command saves it again).
* Each checkpoint records the sum of the per-step training losses up to its step (``loss_sum.json``), so the
  ``train_loss`` of a resumed run averages every step since the first, as an uninterrupted run's does (transformers
  averages over the steps of the current ``train()`` call only). A checkpoint saved inside a step (transformers' JIT
  checkpoint saves before the optimizer step, the step's micro-batch losses already summed) records the finished
  steps only: the resumed run trains that step again.
* ``choose_resume_checkpoint`` picks the newest *complete* checkpoint (``trainer_state.json`` written, no
  transformers JIT-checkpoint sentinel), skipping and naming incomplete ones (left by a plain Trainer or an older
  version of this code), and checks an explicit ``--resume_from_checkpoint`` before any heavy work.

The protection is against the process dying (SIGTERM, SIGKILL, OOM killer, preemption): files are not fsynced, so
a power loss or kernel crash right after a save may still lose what the page cache held.
"""

import json
import logging
import math
import os
import re
import shutil
import zipfile
from pathlib import Path

from transformers import TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_pt_utils import nested_gather
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, has_length, sort_checkpoints

from models.export import STAGING_DIR, write_json, write_whole

from .cli import UsageError, one_line

logger = logging.getLogger(__name__)

FINAL_MODEL_DIR = "final-model"  # the final model's files, staged until they are all written
LOSS_SUM_NAME = "loss_sum.json"  # in a checkpoint: {"global_step": N, "loss_sum": sum of the losses of steps 1..N}
CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")  # what get_last_checkpoint accepts
# Weight files save_pretrained writes (whole, sharded, their index; safetensors or torch).
WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
RESULTS_JSON = {"indent": 4, "sort_keys": True}  # the format of transformers' own {split}_results.json
# How close a finished run's train_loss is to the one its last checkpoint's loss sum gives (float rounding only).
LOSS_SUM_REL_TOL = 1e-5
JIT_SENTINEL = "checkpoint-is-incomplete.txt"  # transformers' JIT checkpoint keeps it in checkpoint-N until it is saved


class AtomicCheckpoints:
    """Trainer mixin (``class MyTrainer(AtomicCheckpoints, Trainer)``): every checkpoint appears complete or not at all.

    The Trainer's own ``_save_checkpoint`` does the writing (model, optimizer, scheduler, RNG, state, callbacks) into
    the staging directory: while ``_staging`` is set, ``_get_output_dir`` answers the staging root. Afterwards the
    main process points the best-model record at the published path, renames the checkpoint into place and rotates
    (``save_total_limit``) over the published checkpoints, as the Trainer would have; a checkpoint rotated away is
    first renamed into the staging directory, so a kill while it is deleted leaves no half-deleted ``checkpoint-N``.

    ``train_loss`` (in the metrics ``train()`` logs and returns) averages the losses of every step since the first,
    also after a resume: the sum up to the resumed step comes from the checkpoint's ``loss_sum.json``.
    """

    _staging = False
    _finalizing = False
    _loss_sum_before: float | None = 0.0  # the per-step losses before this train() call, summed; None: not known
    # The Trainer's running loss (``_tr_loss``) when the step in progress began; None between steps (StepLossMark).
    _loss_at_step_begin = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(StepLossMark(self))

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging else run_dir

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if not self._staging:  # pushed once published, from its final path (the staged one is renamed away)
            super()._push_from_checkpoint(checkpoint_folder)

    def save_metrics(self, split: str, metrics: dict, combined: bool = True) -> None:
        """The Trainer's ``{split}_results.json`` and ``all_results.json``, each written whole or not at all (a kill in
        the middle of transformers' plain write left a truncated ``all_results.json`` that every later run failed to
        read); an unreadable ``all_results.json`` counts as none. In ``all_results.json`` the split's metrics replace
        its earlier ones whole: a ``{split}_*`` key the new metrics lack (the timings of a re-run that trained
        nothing) would otherwise report an earlier run's value as this one's."""
        if not self.is_world_process_zero():
            return
        output_dir = Path(self.args.output_dir)
        write_json(output_dir / f"{split}_results.json", metrics, **RESULTS_JSON)
        if combined:
            combined_path = output_dir / "all_results.json"
            kept = {k: v for k, v in read_json_or_empty(combined_path).items() if not k.startswith(f"{split}_")}
            write_json(combined_path, kept | metrics, **RESULTS_JSON)

    def save_state(self) -> None:
        """``trainer_state.json`` of the output directory, written whole or not at all."""
        if self.is_world_process_zero():
            write_whole(Path(self.args.output_dir) / TRAINER_STATE_NAME, lambda p: self.state.save_to_json(str(p)))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if self.args.should_save:
            remove_staging(self.args.output_dir)
        if resume_from_checkpoint is True:  # the Trainer's own spelling of "the last checkpoint of output_dir"
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self._loss_sum_before = loss_sum_before(resume_from_checkpoint or None)
        self._loss_at_step_begin = None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _finalize_training(self, trial, num_train_samples, start_time):
        best = self.state.best_model_checkpoint
        if self.args.should_save and self.args.save_total_limit == 1 and best is not None:
            # transformers' _finalize_training deletes every checkpoint but the best with rmtree; retired here first,
            # so that a kill cannot leave one half deleted.
            run_dir = Path(self._get_output_dir(trial))
            retire(run_dir, [c for c in checkpoints_newest_first(run_dir) if c.resolve() != Path(best).resolve()])
        self._finalizing = True  # the train_loss that `log` sees now is the end of train()'s
        try:
            output = super()._finalize_training(trial, num_train_samples, start_time)
        finally:
            self._finalizing = False
        return output._replace(training_loss=output.metrics["train_loss"])

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ) -> tuple[int, int]:
        """Where a resumed run starts in its data: for a stream (a train set without a length), the pass and the
        batch within it recorded by the checkpoint's epoch, not transformers' ``global_step`` batches into the first
        pass (which, past the end of one pass, skipped all of it and started the next pass from its beginning,
        training on those batches again)."""
        position = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        if resume_from_checkpoint is None or self.args.ignore_data_skip or has_length(self.train_dataset):
            return position
        accumulation = self.args.gradient_accumulation_steps
        streamed = stream_position(resume_from_checkpoint, accumulation)
        if streamed is None:
            return position
        # The loaded epoch encodes the position with the checkpoint's max_steps; a save before this run's first step
        # (a JIT checkpoint) records it beside this run's max_steps, so it is encoded again with that.
        self.state.epoch = stream_epoch(*streamed, max_steps, accumulation)
        return streamed

    def end_ended_training(self, checkpoint: str) -> dict[str, float]:
        """For a run whose training ended at ``checkpoint`` (its ``global_step`` at ``max_steps``), killed before it
        finished (final save, metrics, evaluation) or run again: what the end of ``train()`` would have done, without
        training (transformers' ``train()`` from that checkpoint would run one step past ``max_steps``). Loads the
        checkpoint's weights and state, logs the train summary into ``log_history``, loads the best checkpoint's
        weights (``--load_best_model_at_end``) and deletes the checkpoints the end of training deletes
        (``--save_total_limit``); returns the train metrics (``ended_train_metrics``)."""
        self._load_from_checkpoint(checkpoint)
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        best = self.state.best_model_checkpoint
        if best is not None and not os.path.isdir(best):  # as transformers' resume does with a deleted one
            logger.warning(
                "the best checkpoint %s recorded in %s does not exist anymore: ignoring it", best, checkpoint
            )
            self.state.best_model_checkpoint = None
        metrics = ended_train_metrics(Path(self.args.output_dir), checkpoint, self.state)
        # The summary train() appends to log_history (with epoch and step); the printing callback drops total_flos
        # from the dict, as it does from train()'s metrics.
        self.log(metrics)
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            self._load_best_model()
        # Every process has loaded the checkpoint before one of them may retire it (--save_total_limit 1).
        self.accelerator.wait_for_everyone()
        if self.args.should_save:  # a kill between a checkpoint's publication and its rotation left a surplus
            run_dir, best = Path(self._get_output_dir(None)), self.state.best_model_checkpoint
            if self.args.save_total_limit == 1 and best is not None:  # the end of train() keeps the best alone
                retire(run_dir, [c for c in checkpoints_newest_first(run_dir) if c.resolve() != Path(best).resolve()])
            else:
                rotate_published(run_dir, self.args.save_total_limit, best)
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._finalizing and "train_loss" in logs and self._loss_sum_before is not None:  # over the whole run
            logs["train_loss"] = (self._loss_sum_before + self._total_loss_scalar) / max(self.state.global_step, 1)
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Outside a checkpoint: write the model into the staging directory, then move its files into ``output_dir``
        one rename each (weight files of an earlier save that this one does not write are deleted first) and delete
        the staging directory, whose presence marks a save that did not finish; then push, as the Trainer would."""
        if _internal_call or self._staging:
            return super().save_model(output_dir, _internal_call)
        final = Path(output_dir or self.args.output_dir)
        staged = final / STAGING_DIR / FINAL_MODEL_DIR
        if self.args.should_save:
            remove_staging(final)
        self.accelerator.wait_for_everyone()
        super().save_model(str(staged), _internal_call=True)  # no push from the staging directory
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero() and staged.is_dir():  # FSDP's sharded state dict saves no model here
            move_into(staged, final)
            shutil.rmtree(staged.parent, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = run_dir / STAGING_DIR / name, run_dir / name
        if self.args.should_save:
            remove_staging(run_dir)
        self.accelerator.wait_for_everyone()  # nobody writes into the staging directory before it is clean
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # every process has written its part (sharded optimizer states)
        if self.state.best_model_checkpoint is not None and Path(self.state.best_model_checkpoint) == staged:
            self.state.best_model_checkpoint = str(final)  # the Trainer recorded the staged path
            if self.args.should_save:
                self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
        # The losses of the finished steps since the last log, averaged over the processes as a log averages them (a
        # collective: every process takes part).
        finished = self._tr_loss if self._loss_at_step_begin is None else self._loss_at_step_begin
        pending = nested_gather(finished, self.args.parallel_mode).mean().item()
        if self.args.should_save:
            if self._loss_sum_before is not None:  # resumed from a checkpoint without the record: the sum is unknown
                loss_sum = self._loss_sum_before + self._total_loss_scalar + pending
                write_json(staged / LOSS_SUM_NAME, {"global_step": self.state.global_step, "loss_sum": loss_sum})
            publish(staged, final)
            rotate_published(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(str(final))


class StepLossMark(TrainerCallback):
    """Keeps ``trainer._loss_at_step_begin``: the running loss as the step in progress began (a device copy, no host
    sync), None once it ended. The Trainer adds each micro-batch's loss as it goes, so a checkpoint saved inside a step
    takes the losses up to this mark."""

    def __init__(self, trainer: AtomicCheckpoints):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._loss_at_step_begin = self.trainer._tr_loss.detach().clone()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._loss_at_step_begin = None


def loss_sum_before(checkpoint: str | os.PathLike | None) -> float | None:
    """The sum of the per-step losses up to ``checkpoint``'s step (0 when training starts from scratch); None when the
    checkpoint does not record it (written by a plain Trainer): then ``train_loss`` covers the steps after it only,
    which is logged."""
    if checkpoint is None:
        return 0.0
    record = read_json_or_empty(Path(checkpoint) / LOSS_SUM_NAME)
    if "loss_sum" not in record:
        logger.warning("%s has no %s: train_loss will average the steps after it only", checkpoint, LOSS_SUM_NAME)
        return None
    return float(record["loss_sum"])


def ended_train_metrics(output_dir: Path, checkpoint: str | os.PathLike, state: TrainerState) -> dict[str, float]:
    """The train metrics of a run whose training ended at ``checkpoint`` (``state``, its trainer state), as the end
    of ``train()`` reports them: ``total_flos`` from the state; ``train_loss`` and the speed metrics from
    ``output_dir/train_results.json`` where that file is this run's (its epoch and ``train_loss`` match the
    checkpoint's: an earlier, shorter run into the same directory wrote one of its own); else ``train_loss`` from
    the checkpoint's loss sum and no speed metrics (the time the run took is not recorded anywhere else)."""
    metrics: dict[str, float] = {"total_flos": state.total_flos}
    loss_sum = loss_sum_before(checkpoint)
    if loss_sum is not None:
        metrics["train_loss"] = loss_sum / max(state.global_step, 1)
    written = read_json_or_empty(output_dir / "train_results.json")
    same_loss = loss_sum is None or (
        isinstance(written.get("train_loss"), float)
        and math.isclose(written["train_loss"], metrics["train_loss"], rel_tol=LOSS_SUM_REL_TOL)
    )
    if written.get("epoch") == state.epoch and same_loss:
        # train_samples is run_clm.py's, added again by it; the rest is train()'s own.
        metrics |= {k: v for k, v in written.items() if k.startswith("train_") and k != "train_samples"}
    elif written:
        logger.info(
            "%s is an earlier run's (not of %s): train metrics recomputed",
            output_dir / "train_results.json",
            checkpoint,
        )
    return metrics


def stream_position(checkpoint: str | os.PathLike, gradient_accumulation_steps: int) -> tuple[int, int] | None:
    """Where a run over a stream stood at ``checkpoint``: (passes over the stream completed, batches read into the
    current one); None where its ``trainer_state.json`` does not say.

    transformers cannot know a stream's length: it counts one epoch as ``max_steps`` optimizer steps
    (``max_steps * gradient_accumulation_steps`` batches) and starts the next epoch, a new pass, when the stream
    ends, so ``epoch`` = passes completed + batches into the current pass / (``max_steps * accumulation``). The
    checkpoint's own ``max_steps`` decodes it (a resumed run may train for longer); the accumulation is this run's,
    as transformers' own skipping assumes.
    """
    state = read_json_or_empty(Path(checkpoint) / TRAINER_STATE_NAME)
    epoch, planned = state.get("epoch"), state.get("max_steps")
    if not isinstance(epoch, (int, float)) or not isinstance(planned, int) or planned <= 0:
        return None
    passes = int(epoch)
    return passes, round((epoch - passes) * planned * gradient_accumulation_steps)


def stream_epoch(passes: int, batches: int, max_steps: int, gradient_accumulation_steps: int) -> float:
    """The ``epoch`` transformers records for a stream ``batches`` batches into the pass after ``passes`` complete
    ones, in a run of ``max_steps`` optimizer steps: what ``stream_position`` decodes."""
    return passes + batches / (max_steps * gradient_accumulation_steps)


def move_into(staged: Path, final: Path) -> None:
    """Move the files of the saved model ``staged`` into ``final``, one rename each. Weight files in ``final`` that
    the new save does not have (shards of an earlier, differently sharded save) are deleted first, as
    ``save_pretrained`` into ``final`` would have; a directory (DeepSpeed's ``global_stepN``) replaces the old one."""
    written = {path.name for path in staged.iterdir()}
    for old in final.iterdir():
        if old.is_file() and old.name not in written and WEIGHT_FILE.match(old.name):
            old.unlink()
    for path in sorted(staged.iterdir()):
        target = final / path.name
        if path.is_dir() and target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)


def rotate_published(run_dir: Path, save_total_limit: int | None, best_model_checkpoint: str | None) -> None:
    """Keep at most ``save_total_limit`` checkpoints in ``run_dir``, as transformers' ``rotate_checkpoints`` does: the
    oldest by modification time go first (a resume from an earlier checkpoint makes its new saves the most recent),
    never the most recent one nor the best one. Each is first renamed into the staging directory, then deleted: a
    kill meanwhile leaves it whole or gone, never half deleted (a half-deleted one, its modification time new, would
    look the most recent to the next rotation; the next save removes the staging directory)."""
    if not save_total_limit or save_total_limit <= 0:
        return
    checkpoints = sort_checkpoints(str(run_dir), PREFIX_CHECKPOINT_DIR, use_mtime=True)  # oldest first
    protected = {checkpoints[-1]} | ({str(Path(best_model_checkpoint))} if best_model_checkpoint else set())
    surplus = len(checkpoints) - max(save_total_limit, len(protected))
    doomed = [checkpoint for checkpoint in checkpoints if checkpoint not in protected][: max(surplus, 0)]
    retire(run_dir, [Path(checkpoint) for checkpoint in doomed])


def retire(run_dir: Path, checkpoints: list[Path]) -> None:
    """Delete ``checkpoints`` of ``run_dir``: each first renamed into the staging directory, which is then deleted."""
    if not checkpoints:
        return
    trash = run_dir / STAGING_DIR
    trash.mkdir(exist_ok=True)
    for checkpoint in checkpoints:
        logger.info("deleting %s", checkpoint)
        try:
            os.replace(checkpoint, trash / checkpoint.name)
        except FileNotFoundError:  # another node saving into the same shared directory retired it first
            pass
    shutil.rmtree(trash, ignore_errors=True)


def read_json_or_empty(path: Path) -> dict:
    """The JSON object at ``path``; ``{}`` where there is none or it cannot be read (a run killed while writing it)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def trained_to_the_end(checkpoint: str | os.PathLike, max_steps: int) -> bool:
    """Whether ``checkpoint`` was saved at the end of training: its ``global_step`` has reached ``max_steps`` (when
    positive; else the run's own planned steps, as its ``trainer_state.json`` records them)."""
    state = read_json_or_empty(Path(checkpoint) / TRAINER_STATE_NAME)
    limit = max_steps if max_steps > 0 else state.get("max_steps", 0)
    return limit > 0 and state.get("global_step", 0) >= limit


def remove_staging(run_dir: str | os.PathLike) -> None:
    """Delete the staging directory a killed save left in ``run_dir`` (if any)."""
    staging = Path(run_dir) / STAGING_DIR
    if staging.exists():
        logger.info("removing %s, left by a save that did not finish", staging)
        shutil.rmtree(staging)


def publish(staged: Path, final: Path) -> None:
    """Move the complete checkpoint ``staged`` to ``final`` with one rename, then delete the staging directory.

    An existing ``final`` (the same step saved again after resuming from an earlier checkpoint) is first moved
    into the staging directory: a kill between the two renames leaves no ``final``, never a partial one.
    """
    if final.exists():
        os.replace(final, staged.parent / f"replaced-{final.name}")
    os.replace(staged, final)
    shutil.rmtree(staged.parent)


def incomplete_reason(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` is not a checkpoint the Trainer finished writing; None when it is.

    The Trainer writes ``trainer_state.json`` after every other file; its JIT checkpoint also marks a save in
    progress with a sentinel file.
    """
    if (checkpoint / JIT_SENTINEL).exists():
        return f"holds {JIT_SENTINEL}"
    if not (checkpoint / TRAINER_STATE_NAME).is_file():
        return f"no {TRAINER_STATE_NAME}"
    return None


def check_save_finished(flag: str, source: str | os.PathLike) -> None:
    """UsageError naming ``flag`` where ``source`` (run_clm.py's output directory) holds a final model whose save did
    not finish: its staged files are still in the staging directory, and the files in place may be an earlier save's."""
    unfinished = Path(source) / STAGING_DIR / FINAL_MODEL_DIR
    if unfinished.exists():
        raise UsageError(
            f"{flag}: {source}: the final model's save did not finish ({unfinished} is left); allowed is a finished "
            "checkpoint (re-run the same run_clm.py command: it trains nothing more and saves the model again)"
        )


def checkpoints_newest_first(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` directories of ``output_dir`` (the names ``get_last_checkpoint`` reads), highest N first."""
    steps = {}
    for entry in Path(output_dir).iterdir():
        match = CHECKPOINT_NAME.match(entry.name)
        if match and entry.is_dir():
            steps[entry] = int(match.group(1))
    return sorted(steps, key=steps.get, reverse=True)


def check_readable(flag: str, checkpoint: Path) -> None:
    """Every file of ``checkpoint`` reads: safetensors headers, torch zip archives, ``trainer_state.json``.

    A truncated or corrupt file is a UsageError naming it (the Trainer would fail deep inside a loader).
    """
    from safetensors import safe_open

    for file in sorted(checkpoint.iterdir()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), "pt") as handle:
                    handle.keys()
            elif file.suffix in (".pt", ".pth", ".bin"):
                zipfile.ZipFile(file).close()  # torch.save writes a zip archive; a truncated one has no directory
            elif file.name == TRAINER_STATE_NAME:
                json.loads(file.read_text())
        except Exception as err:  # any reader's complaint means the file is damaged
            raise UsageError(
                f"{flag}: {file} is unreadable ({one_line(err)}); allowed is a complete checkpoint "
                "(delete it, or pass --overwrite_output_dir to start over)"
            ) from None


def check_resumable(flag: str, checkpoint: str | os.PathLike) -> None:
    """``checkpoint`` is a directory holding a complete, readable Trainer checkpoint; else a UsageError naming it."""
    path = Path(checkpoint)
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise UsageError(f"{flag}: {checkpoint} {what}; allowed is a checkpoint-N directory written by the Trainer")
    reason = incomplete_reason(path)
    if reason is not None:
        raise UsageError(
            f"{flag}: {checkpoint} is not a complete Trainer checkpoint ({reason}); allowed is a "
            "checkpoint-N directory written by the Trainer"
        )
    check_readable(flag, path)


def choose_resume_checkpoint(explicit: str | None, output_dir: str | os.PathLike, auto: bool) -> str | None:
    """The checkpoint to resume training from, checked before any heavy work; None to start from scratch.

    ``explicit`` (``--resume_from_checkpoint``) must be complete and readable. Otherwise, with ``auto``, the newest
    complete ``checkpoint-N`` of ``output_dir``: incomplete ones (a killed save of a plain Trainer) are skipped and
    named in one log line; a complete one with a damaged file is a UsageError (it is not a save that was cut short).
    """
    flag = "--resume_from_checkpoint"
    if explicit is not None:
        check_resumable(flag, explicit)
        return explicit
    if not auto or not Path(output_dir).is_dir():
        return None
    skipped = []
    for checkpoint in checkpoints_newest_first(output_dir):
        reason = incomplete_reason(checkpoint)
        if reason is None:
            check_readable(flag, checkpoint)
            note = f"; skipped the incomplete {', '.join(skipped)}" if skipped else ""
            logger.info("resuming from %s (pass --overwrite_output_dir to start over)%s", checkpoint, note)
            return str(checkpoint)
        skipped.append(f"{checkpoint.name} ({reason})")
    if skipped:
        logger.warning(
            "no complete checkpoint in %s, starting from scratch; skipping the incomplete %s",
            output_dir,
            ", ".join(skipped),
        )
    return None
