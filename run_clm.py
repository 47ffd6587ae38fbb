"""Train and evaluate causal language models (LCKV ``opt-llama`` or plain ``llama``) with the HF Trainer.

Examples:
    python run_clm.py --use_embedded_corpus --config_name configs/llama_tiny_opt.json \\
        --output_dir outputs/tiny --do_train --do_eval --max_steps 200
    python run_clm.py --dataset_name wikitext --dataset_config_name wikitext-103-raw-v1 \\
        --tokenizer_name TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T \\
        --config_name configs/llama_tiny_opt.json \\
        --block_size 1024 --output_dir outputs/wt103 --do_train --do_eval

Run ``python run_clm.py --help`` for every flag. Bad input exits with a one-line error naming the flag.
"""

import contextlib
import json
import logging
import math
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets
import huggingface_hub
import transformers
from transformers import (
    AutoModelForCausalLM,
    PretrainedConfig,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from models.export import AUTO_CLASSES, bundle_code
from tools import cli as shared  # its import of models registers model_type "opt-llama"
from tools.cli import HfParser, UsageError, check_range, check_text_file, one_line, run_cli
from tools.training_checkpoints import (
    AtomicCheckpoints,
    choose_resume_checkpoint,
    trained_to_the_end,
)

logger = logging.getLogger("run_clm")

# What an evaluation during training reports without compute_metrics (the Trainer's evaluation loop and speed metrics).
TRAINING_EVAL_METRICS = ("eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
DEFAULT_TEXT_COLUMN = "text"  # the column of the text loader (.txt files)

SMALL_FILE_BYTES = 1 << 20  # data files up to this size are checked token by token before the real tokenization
OFFLINE_HINT = (
    "offline? use local files (--train_file/--validation_file, --tokenizer_name DIR or --config_name FILE) "
    "or the embedded corpus (--use_embedded_corpus)"
)


@dataclass
class ModelArguments:
    """Which model and tokenizer to train, from scratch or from a checkpoint."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint (hub id or local dir) to start from; leave out to train from scratch."},
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "Config json file or dir (e.g. configs/llama_tiny_opt.json) for training from scratch."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated config fields to override, 'k=v,k2=v2' "
            "(e.g. 'num_hidden_layers=4,train_kv=true'); "
            "values are parsed as JSON when possible, else kept as strings. An unknown field is an error."
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer (hub id or local dir). Default: the embedded corpus tokenizer with "
            "--use_embedded_corpus, else --model_name_or_path."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where hub models and datasets are cached."})
    eval_sequential: bool = field(
        default=False,
        metadata={
            "help": "Run the final evaluation (--do_eval) token by token (sets config.sequential_forward=True): "
            "the exact LCKV semantics the paper reports, slower than the default parallel iterations "
            "(evaluations during training stay "
            "iterative). Env LCKV_EVAL_SEQUENTIAL=1 too, and on where the model's prefill is 'sequential'. An error "
            "for model types without iterations (llama)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train from scratch even if output_dir has checkpoints (default: resume from the last one)."},
    )
    bundle_code: bool = field(
        default=False,
        metadata={
            "help": "Write the final model self-contained (python -m tools.export's form): the modeling code in "
            "output_dir and an auto_map in its config.json, so it loads with trust_remote_code=True "
            "without this repository."
        },
    )


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on, and how to cut it into blocks."""

    use_embedded_corpus: bool = field(
        default=False,
        metadata={
            "help": "Use the embedded Shakespeare corpus (prepared once by the corpus package, no hub needed) "
            "and its locally trained tokenizer."
        },
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset for datasets.load_dataset, e.g. 'wikitext'."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Hub dataset config, e.g. 'wikitext-103-raw-v1'."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Local training data: .txt, .json or .jsonl."})
    validation_file: str | None = field(
        default=None, metadata={"help": "Local validation data: .txt, .json or .jsonl (same kind as --train_file)."}
    )
    text_column: str = field(
        default=DEFAULT_TEXT_COLUMN,
        metadata={
            "help": "Column holding the text in json/jsonl/hub data (a missing one is an error; left at 'text', "
            "data with a single column uses that one)."
        },
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percent of train held out for evaluation when the data has no validation split."}
    )
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per training example after grouping; default min(1024, max_position_embeddings). "
            "Must not exceed the model's max_position_embeddings."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation blocks."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenizing and grouping (datasets .map num_proc)."}
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Recompute tokenized data instead of using the cache."}
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the data (datasets IterableDataset) for corpora that don't fit; needs --max_steps."},
    )
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks when reading .txt files."})


def parse_args(argv: list[str] | None) -> tuple[ModelArguments, DataTrainingArguments, TrainingArguments]:
    """Parse the command line (or a json file as the only argument)."""
    parser = HfParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            return parser.parse_json_file(json_file=os.path.abspath(shared.check_input_file("arguments file", argv[0])))
        return parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # TrainingArguments.__post_init__ refuses a flag combination (its message names them)
        if isinstance(err, UsageError):
            raise
        raise UsageError(f"training arguments: {one_line(err)}") from None


def check_args(margs: ModelArguments, dargs: DataTrainingArguments, targs: TrainingArguments) -> None:
    """One-line errors for every flag out of range, before any config, tokenizer or data is loaded."""
    check_range("--block_size", dargs.block_size, minimum=1)
    if targs.max_steps == 0 or targs.max_steps < -1:
        raise UsageError(
            f"--max_steps: {targs.max_steps}; allowed values are integers >= 1, or -1 (train --num_train_epochs)"
        )
    if targs.do_train and targs.max_steps == -1:
        check_range("--num_train_epochs", targs.num_train_epochs, minimum=0, exclusive_min=True)
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        check_range(f"--{flag}", getattr(targs, flag), minimum=1)
    check_range("--learning_rate", targs.learning_rate, minimum=0)
    # transformers takes a step interval below 1 as a fraction of the training steps; 0 or less under the "steps"
    # strategy silently meant never (no checkpoint before the end: a kill lost the whole run; no log, no evaluation).
    for flag, strategy in (
        ("save_steps", "save_strategy"),
        ("eval_steps", "eval_strategy"),
        ("logging_steps", "logging_strategy"),
    ):
        if getattr(targs, strategy) == "steps":
            check_interval(f"--{flag}", getattr(targs, flag), f"--{strategy}")
    check_range("--dataloader_num_workers", targs.dataloader_num_workers, minimum=0)  # 0: load in the main process
    check_range("--save_total_limit", targs.save_total_limit, minimum=1)  # leave it out to keep every checkpoint
    check_range("--eval_accumulation_steps", targs.eval_accumulation_steps, minimum=1)
    check_range("--weight_decay", targs.weight_decay, minimum=0)  # torch's AdamW refuses a negative one
    check_range("--max_grad_norm", targs.max_grad_norm, minimum=0)  # 0: no clipping (transformers' documented off)
    check_range("--seed", targs.seed, minimum=0, maximum=2**32 - 1)  # numpy's range, which set_seed seeds
    for flag in ("max_train_samples", "max_eval_samples", "preprocessing_num_workers"):
        check_range(f"--{flag}", getattr(dargs, flag), minimum=1)
    check_range("--validation_split_percentage", dargs.validation_split_percentage, minimum=1, maximum=99)
    if dargs.streaming and targs.do_train and targs.max_steps <= 0:
        raise UsageError("--streaming: needs --max_steps (a stream has no length)")
    if not (targs.do_train or targs.do_eval):
        raise UsageError("--do_train/--do_eval: nothing to do; pass at least one")
    shared.check_output_dir("--output_dir", targs.output_dir)
    if margs.model_name_or_path:
        shared.check_source("--model_name_or_path", margs.model_name_or_path, required_file="config.json")
        shared.check_weights("--model_name_or_path", margs.model_name_or_path)
    if margs.tokenizer_name:
        shared.check_tokenizer_source("--tokenizer_name", margs.tokenizer_name)
    check_metric_for_best_model(targs)


def check_interval(flag: str, value: float, strategy_flag: str) -> None:
    """A step interval under the "steps" strategy: > 0 (a number of steps, or below 1 a fraction of the training
    steps, as transformers reads it)."""
    if not value > 0:  # also NaN
        raise UsageError(
            f"{flag}: {value:g}; allowed values are > 0 with {strategy_flag} steps (a number of steps, or a fraction "
            "below 1 of the training steps)"
        )


def check_metric_for_best_model(targs: TrainingArguments) -> None:
    """``--metric_for_best_model`` names a metric of the evaluations during training, before any step runs (the
    Trainer looks it up after the first evaluation, so a typo failed with a KeyError after training steps had run).

    run_clm.py passes no ``compute_metrics``: an evaluation during training reports the loss and the speed metrics
    only (``perplexity`` comes with the final evaluation alone); memory metrics (``--skip_memory_metrics false``) add
    names that depend on the device, which are left to the Trainer.
    """
    name = targs.metric_for_best_model
    if name is None or not targs.do_train or not targs.skip_memory_metrics:
        return
    key = name if name.startswith("eval_") else f"eval_{name}"
    if key not in TRAINING_EVAL_METRICS:
        raise UsageError(
            f"--metric_for_best_model: {name!r} is not a metric of the evaluations during training; allowed are "
            f"{', '.join(TRAINING_EVAL_METRICS)} (or without eval_)"
        )


# ----------------------------------------------------------------------------- hub access


def is_local(name: str | None) -> bool:
    """Whether ``name`` is a path on this machine rather than a hub id."""
    return bool(name) and os.path.exists(name)


def ensure_hub_or_offline(what: str) -> None:
    """Before touching the hub for ``what``: if it can't be reached, switch to offline mode so loads fail fast."""
    if huggingface_hub.constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy")):
        return
    host = urlparse(huggingface_hub.constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        logger.warning("%s: %s is unreachable; using cached files only", what, host)
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = True


def hub_error(flag: str, name: str, err: Exception) -> UsageError:
    """A one-line error for a hub resource that could not be loaded."""
    return UsageError(f"{flag} {name}: cannot load it ({one_line(err)}); {OFFLINE_HINT}")


# ----------------------------------------------------------------------------- config, tokenizer, model


def parse_overrides(text: str) -> dict[str, Any]:
    """``"k=v,k2=v2"`` -> dict; values parsed as JSON (numbers, true/false, null, lists) or kept as strings."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise UsageError(f"--config_overrides: '{item}' is not of the form key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        value = {"True": "true", "False": "false", "None": "null"}.get(value, value)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_training_config(margs: ModelArguments) -> PretrainedConfig:
    """Build the model config from --config_name or --model_name_or_path, with --config_overrides applied."""
    source = margs.config_name or margs.model_name_or_path
    if source is None:
        raise UsageError("--config_name: give a config (e.g. configs/llama_tiny_opt.json) or --model_name_or_path")
    flag = "--config_name" if margs.config_name else "--model_name_or_path"
    if not is_local(source):
        ensure_hub_or_offline(flag)
    overrides = parse_overrides(margs.config_overrides) if margs.config_overrides else None
    config = shared.load_config(flag, source, overrides, cache_dir=margs.cache_dir)
    if overrides:
        logger.info("config overrides: %s", overrides)
    return config


def load_tokenizer(margs: ModelArguments, corpus_tokenizer: Path | None):
    """The tokenizer: --tokenizer_name, else the embedded corpus tokenizer, else --model_name_or_path."""
    name = margs.tokenizer_name or (str(corpus_tokenizer) if corpus_tokenizer else None) or margs.model_name_or_path
    if name is None:
        raise UsageError("--tokenizer_name: required when training from --config_name without --use_embedded_corpus")
    flag = "--tokenizer_name" if margs.tokenizer_name or not corpus_tokenizer else "--use_embedded_corpus"
    if not is_local(name):
        ensure_hub_or_offline(flag)
    return shared.load_tokenizer(flag, name, cache_dir=margs.cache_dir)


def build_model(margs: ModelArguments, config: PretrainedConfig, tokenizer) -> transformers.PreTrainedModel:
    """Model from scratch (vocab and special ids from the tokenizer) or from --model_name_or_path."""
    shared.warn_kernel_flags_without_effect(config)
    if margs.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(margs.model_name_or_path, config=config, cache_dir=margs.cache_dir)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        return model
    config.vocab_size = len(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name, None) is not None:
            setattr(config, name, getattr(tokenizer, name))
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("new %s model from scratch: %.2fM parameters", config.model_type, n_params / 1e6)
    return model


# ----------------------------------------------------------------------------- data


def local_data_files(dargs: DataTrainingArguments) -> dict[str, str]:
    """Check --train_file/--validation_file: they exist and are all txt or all json/jsonl."""
    if dargs.use_embedded_corpus and (dargs.dataset_name or dargs.train_file or dargs.validation_file):
        raise UsageError(
            "--use_embedded_corpus: don't combine it with --dataset_name or --train_file/--validation_file"
        )
    flags = (("--train_file", "train", dargs.train_file), ("--validation_file", "validation", dargs.validation_file))
    data_files = {}
    for flag, split, path in flags:
        if path is None:
            continue
        check_text_file(flag, path)  # exists, non-empty, text (json is text too)
        data_files[split] = path
    if not data_files and not (dargs.use_embedded_corpus or dargs.dataset_name):
        raise UsageError(
            "--train_file: no data; give --use_embedded_corpus, --dataset_name or --train_file/--validation_file"
        )
    exts = {Path(p).suffix.lower().lstrip(".") for p in data_files.values()}
    exts = {"json" if e == "jsonl" else e for e in exts}
    if len(exts) > 1 or not exts <= {"txt", "json"}:
        raise UsageError(
            f"--train_file/--validation_file: extensions {sorted(exts)}; allowed is one of txt, json, jsonl"
        )
    return data_files


def check_small_text_files(
    dargs: DataTrainingArguments, data_files: dict[str, str], tokenizer, block_size: int
) -> None:
    """Before tokenizing, for small .txt files (the mistakes are small files): each split makes at least one block,
    and without --validation_file the held-out percentage of the train lines is at least one line.

    Counts tokens line by line, as ``tokenize_and_group`` will (the text loader gives one row per line).
    """
    for split_name, path in data_files.items():
        if Path(path).suffix.lower() != ".txt" or os.path.getsize(path) > SMALL_FILE_BYTES:
            continue
        flag = f"--{split_name}_file"
        lines = Path(path).read_text(encoding="utf-8").splitlines(keepends=dargs.keep_linebreaks)
        if (
            split_name == "train"
            and "validation" not in data_files
            and len(lines) * dargs.validation_split_percentage < 100
        ):
            raise UsageError(
                f"--validation_split_percentage: {dargs.validation_split_percentage}% of the {len(lines)} lines "
                f"of {flag} {path} is not one line; allowed is a --validation_file or a longer file"
            )
        tokens = sum(len(ids) for ids in tokenizer(lines).input_ids)
        if tokens < block_size:
            raise UsageError(
                f"{flag}: {path} has {tokens} tokens, fewer than one block of --block_size {block_size}; "
                "allowed is a longer file or a smaller --block_size"
            )


def load_raw_datasets(margs: ModelArguments, dargs: DataTrainingArguments, corpus_paths) -> datasets.DatasetDict:
    """Raw text splits ("train", "validation") from the embedded corpus, the hub, or local files."""
    if corpus_paths is not None:
        data_files = {"train": str(corpus_paths.train), "validation": str(corpus_paths.validation)}
        return datasets.load_dataset(
            "text",
            data_files=data_files,
            keep_linebreaks=dargs.keep_linebreaks,
            cache_dir=margs.cache_dir,
            streaming=dargs.streaming,
        )
    if dargs.dataset_name:
        if not is_local(dargs.dataset_name):
            ensure_hub_or_offline("--dataset_name")
        try:
            raw = datasets.load_dataset(
                dargs.dataset_name, dargs.dataset_config_name, cache_dir=margs.cache_dir, streaming=dargs.streaming
            )
        except (OSError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
            raise hub_error("--dataset_name", dargs.dataset_name, err) from None
    else:
        data_files = local_data_files(dargs)
        ext = Path(data_files["train" if "train" in data_files else "validation"]).suffix.lower().lstrip(".")
        kwargs = {"keep_linebreaks": dargs.keep_linebreaks} if ext == "txt" else {}
        builder = "text" if ext == "txt" else "json"
        raw = datasets.load_dataset(
            builder, data_files=data_files, cache_dir=margs.cache_dir, streaming=dargs.streaming, **kwargs
        )
    if "validation" not in raw and "train" in raw and not dargs.streaming:
        if len(raw["train"]) * dargs.validation_split_percentage < 100:
            raise UsageError(
                f"--validation_split_percentage: {dargs.validation_split_percentage}% of the {len(raw['train'])} "
                "training texts is not one text; allowed is a --validation_file or more training data"
            )
        split = raw["train"].train_test_split(test_size=dargs.validation_split_percentage / 100, shuffle=False)
        raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    return raw


def pick_text_column(name: str, columns: list[str]) -> str:
    """The column to tokenize: ``--text_column``; where the data has one column only and the flag is left at its
    default ``text``, that column (a json file or hub set whose one column has another name). Otherwise a missing
    column is an error: picking the first one trained silently on a title or an id."""
    if name in columns:
        return name
    if name == DEFAULT_TEXT_COLUMN and len(columns) == 1:
        return columns[0]
    raise UsageError(f"--text_column: {name!r} is not a column of the data; allowed are {', '.join(columns)}")


def tokenize_and_group(raw, tokenizer, dargs: DataTrainingArguments, block_size: int, training_args: TrainingArguments):
    """Tokenize every text, concatenate, and cut into ``block_size`` blocks with labels (the tail is dropped)."""
    first_split = next(iter(raw.values()))
    columns = first_split.column_names or list(next(iter(first_split)))  # a stream may not know its columns
    text_column = pick_text_column(dargs.text_column, columns)

    def tokenize(batch):
        return tokenizer(batch[text_column])

    def group(batch):
        concatenated = {k: list(chain(*batch[k])) for k in batch}
        total = len(concatenated["input_ids"]) // block_size * block_size
        out = {k: [v[i : i + block_size] for i in range(0, total, block_size)] for k, v in concatenated.items()}
        out["labels"] = [ids.copy() for ids in out["input_ids"]]
        return out

    map_kwargs = (
        {}
        if dargs.streaming
        else {
            "num_proc": dargs.preprocessing_num_workers,
            "load_from_cache_file": not dargs.overwrite_cache,
        }
    )
    with training_args.main_process_first(desc="tokenizing and grouping"):
        desc = {} if dargs.streaming else {"desc": "tokenizing"}
        tokenized = raw.map(tokenize, batched=True, remove_columns=columns, **map_kwargs, **desc)
        desc = {} if dargs.streaming else {"desc": f"grouping into blocks of {block_size}"}
        return tokenized.map(group, batched=True, **map_kwargs, **desc)


# ----------------------------------------------------------------------------- trainer


class LCKVTrainer(AtomicCheckpoints, Trainer):
    """Trainer that also logs the model's extra KV loss (``outputs.kv_loss``, present when ``config.train_kv``), and
    whose checkpoints are complete or absent (a kill during a save leaves none half-written)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._kv_loss_sum, self._kv_loss_count = 0.0, 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        kv_loss = outputs.get("kv_loss") if isinstance(outputs, dict) else getattr(outputs, "kv_loss", None)
        if kv_loss is not None and model.training:
            self._kv_loss_sum += float(kv_loss.detach())
            self._kv_loss_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._kv_loss_count and "loss" in logs:
            logs["kv_loss"] = round(self._kv_loss_sum / self._kv_loss_count, 6)
            self._kv_loss_sum, self._kv_loss_count = 0.0, 0
        super().log(logs, start_time)

    def _evaluate(self, *args, **kwargs) -> dict[str, float]:
        """An evaluation during training (the final one calls ``evaluate``): by the iterations, also where the model's
        config asks for the exact prefill (``during_training_evaluation``)."""
        with during_training_evaluation(self.accelerator.unwrap_model(self.model).config):
            return super()._evaluate(*args, **kwargs)


@contextlib.contextmanager
def during_training_evaluation(config: PretrainedConfig) -> Iterator[None]:
    """Evaluations during training stay iterative, as ``--eval_sequential`` says: a config with ``prefill:
    "sequential"`` (which makes every evaluation-mode forward exact) runs them by the iterations, and gets it back
    before anything is saved; the final evaluation is exact. Token by token, each evaluation would cost several times
    the iterations (and, under ``--bf16``'s autocast, steps every layer eagerly: no scratch cache). A config saved with
    ``sequential_forward`` asked for every forward token by token and keeps it."""
    exact_prefill = getattr(config, "prefill", None) == "sequential" and not getattr(config, "sequential_forward", True)
    if exact_prefill:
        config.prefill = "iterative"
    try:
        yield
    finally:
        if exact_prefill:
            config.prefill = "sequential"


def perplexity(loss: float) -> float:
    """exp(loss), inf on overflow."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def split(lm, name: str, max_samples: int | None, streaming: bool, missing: str, block_size: int):
    """The ``name`` split of the grouped data, cut to ``max_samples`` blocks; ``missing`` is the error without it."""
    if name not in lm:
        raise UsageError(missing)
    data = lm[name]
    if not streaming and len(data) == 0:
        raise UsageError(
            f"--block_size: {block_size}: the {name} data is shorter than one block of {block_size} tokens; "
            "allowed is a smaller --block_size or more data"
        )
    if max_samples is None:
        return data
    return data.take(max_samples) if streaming else data.select(range(min(max_samples, len(data))))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line; bad input ends the process with one line on stderr and exit status 2."""
    return run_cli(train_and_evaluate, argv, prog="run_clm.py")


def train_and_evaluate(argv: list[str] | None = None) -> dict[str, Any]:
    """Run training and/or evaluation; returns ``{"trainer", "train", "eval"}`` (metrics dicts or None)."""
    margs, dargs, targs = parse_args(argv)
    check_args(margs, dargs, targs)
    sequential_flag = "--eval_sequential" if margs.eval_sequential else "LCKV_EVAL_SEQUENTIAL=1"
    margs.eval_sequential = margs.eval_sequential or shared.env_flag("LCKV_EVAL_SEQUENTIAL")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, force=True)
    transformers.utils.logging.set_verbosity_warning()

    # Resume: an explicit checkpoint, else the newest complete one in output_dir (read only, before any heavy work).
    resume = choose_resume_checkpoint(
        targs.resume_from_checkpoint, targs.output_dir, auto=targs.do_train and not margs.overwrite_output_dir
    )

    # Model config first: cheap, and most bad input shows up here.
    config = load_training_config(margs)
    if margs.bundle_code and config.model_type not in AUTO_CLASSES:
        raise UsageError(
            f"--bundle_code: model_type {config.model_type!r} has no code here to bundle; "
            f"allowed are {', '.join(AUTO_CLASSES)}"
        )
    if margs.eval_sequential:  # refused before any work where it cannot apply; set just before the final evaluation
        if not targs.do_eval:
            raise UsageError(
                f"{sequential_flag}: makes the final evaluation exact, and there is none; allowed with --do_eval"
            )
        shared.require_lckv(config, sequential_flag)
    max_positions = getattr(config, "max_position_embeddings", None)
    block_size = dargs.block_size or min(1024, max_positions or 1024)
    if max_positions is not None and block_size > max_positions:
        raise UsageError(f"--block_size: {block_size} exceeds the model's max_position_embeddings ({max_positions})")

    data_files = local_data_files(dargs)
    corpus_paths = None
    if dargs.use_embedded_corpus:
        from corpus import prepare_corpus

        with targs.main_process_first(desc="preparing the embedded corpus"):
            corpus_paths = prepare_corpus(verbose=True)
    tokenizer = load_tokenizer(margs, corpus_paths.tokenizer if corpus_paths else None)
    check_small_text_files(dargs, data_files, tokenizer, block_size)

    raw = load_raw_datasets(margs, dargs, corpus_paths)
    lm = tokenize_and_group(raw, tokenizer, dargs, block_size, targs)
    train_ds = (
        split(
            lm, "train", dargs.max_train_samples, dargs.streaming, "--do_train: the data has no train split", block_size
        )
        if targs.do_train
        else None
    )
    eval_ds = (
        split(
            lm,
            "validation",
            dargs.max_eval_samples,
            dargs.streaming,
            "--do_eval: the data has no validation split; pass --validation_file",
            block_size,
        )
        if targs.do_eval
        else None
    )
    transformers.set_seed(targs.seed)
    model = build_model(margs, config, tokenizer)

    trainer = LCKVTrainer(
        model=model,
        args=targs,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    result: dict[str, Any] = {"trainer": trainer, "train": None, "eval": None}

    if targs.do_train:
        if resume is not None and trained_to_the_end(resume, targs.max_steps):
            # A run killed after its last checkpoint (saving the model, writing metrics, evaluating), or the same
            # command run again: transformers' train() from that checkpoint would run one step past max_steps. Take
            # the trained state as it is and do what the end of train() does (best model, summary, rotation).
            logger.info("training already ended at %s: nothing left to train", resume)
            metrics = trainer.end_ended_training(resume)
        else:
            metrics = dict(trainer.train(resume_from_checkpoint=resume).metrics)
        trainer.save_model()
        if margs.bundle_code and trainer.is_world_process_zero():
            bundle_code(targs.output_dir)
        if not dargs.streaming:
            metrics["train_samples"] = len(train_ds)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        result["train"] = metrics

    if targs.do_eval:
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        if margs.eval_sequential:
            shared.set_sequential(unwrapped.config, sequential_flag)
        metrics = trainer.evaluate()
        metrics["perplexity"] = perplexity(metrics["eval_loss"])
        metrics["eval_sequential"] = shared.is_sequential(unwrapped.config)  # the checkpoint's own switch counts too
        if not dargs.streaming:
            metrics["eval_samples"] = len(eval_ds)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        result["eval"] = metrics
    return result


if __name__ == "__main__":
    main()
