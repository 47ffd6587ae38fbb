"""What the command-line tools share: usage errors, argument checks, dtype, device, config loading, the sequential
switch.

Every error a user can cause is a ``UsageError`` whose message is one line naming the flag (or field), the bad
value and what is allowed. ``run_cli`` turns it into ``prog: error: <line>`` on stderr and exit status 2, the
convention of argparse, with no traceback; any other exception is a programming error and still raises. The
checks here are cheap (no model, no tokenizer, no corpus), so the tools run them before any expensive work.
"""

import argparse
import difflib
import faulthandler
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from transformers import AutoTokenizer, HfArgumentParser, PretrainedConfig, PreTrainedTokenizerBase
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from models.config_checks import looks_like_local_path
from models.config_loading import as_opt_llama, one_line, read_config
from models.configuration_opt_llama import OptLlamaConfig
from models.fused_projections import fuse_projections
from models.kernels.dependent_launch import enable_dependent_launch, supports_dependent_launch
from models.kernels.flags import FLAGS, flag_enabled
from models.kernels.gemv_fusion import enable_gemv_fusion, supports_gemv_fusion
from models.kernels.persistent_reductions import (
    enable_wide_persistent_reductions,
    supports_wide_persistent_reductions,
)
from models.kernels.small_batch_linear import use_small_batch_linear
from models.prefill_modes import PREFILL_MODES
from models.sequential_prefill import every_forward_sequential

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"
DTYPE_CHOICES = (AUTO, *DTYPES)
# Decimal and binary units of sizes ("80GB", "24GiB") and bandwidths per second ("3.35TB").
UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
# What a directory holds when it is a checkpoint with weights / a tokenizer (fast, sentencepiece, BPE or WordPiece).
WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
TEXT_PROBE_BYTES = (
    1 << 20
)  # how much of a data file the text check reads: enough to catch binary files, cheap on GB corpora
NEGATIVE_VALUE = re.compile(r"^-\.?\d")  # a word no option of these tools starts with
MAX_CHOICES_SHOWN = 20  # a longer list of allowed values is summarised by the closest ones

logger = logging.getLogger(__name__)


class UsageError(ValueError):
    """Bad command-line input: one line naming the flag or field, the value and what is allowed; exit status 2."""


class OneLineErrors:
    """Mixin for argparse parsers: a parse error raises ``UsageError`` (one line) instead of printing the usage."""

    def error(self, message: str):
        raise UsageError(message)


class ArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """argparse's parser whose errors are one-line ``UsageError``s, and which takes a word starting with a minus and
    a digit (``-1TB``, ``-80GB``, ``-1e9``) as a flag's value, as it takes ``-1``: the value check then names it
    (argparse would read it as an unknown option and say the flag "expected one argument")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_VALUE  # argparse's test for "a negative number, not an option"


class HfParser(OneLineErrors, HfArgumentParser):
    """transformers' dataclass parser whose errors are one-line ``UsageError``s."""


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None, prog: str | None = None) -> Any:
    """Run a tool's ``main(argv)``: a ``UsageError`` becomes ``prog: error: <line>`` on stderr and exit status 2.

    The ``LCKV_*`` env flags are checked first, so a bad value stops the tool before any work. ``SIGUSR1`` prints
    every thread's Python stack to stderr and the tool goes on (``faulthandler``): where a run that does not finish
    is waiting (``bench/step.sh`` sends it when a step's time is up, before it kills the step).
    """
    prog = prog or Path(sys.argv[0]).name
    if hasattr(signal, "SIGUSR1") and sys.__stderr__ is not None:  # not on Windows, nor without a stderr
        # The process's own stderr (file descriptor 2): sys.stderr may be a stream without one (pytest's capsys)
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    try:
        check_env_flags()
        return main(argv)
    except UsageError as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)


def check_env_flags(environ: Mapping[str, str] | None = None) -> None:
    """Every ``LCKV_*`` kernel flag is 1, 0 or unset; otherwise a UsageError naming the flag."""
    for flag in FLAGS:
        env_flag(flag, environ)


def warn_kernel_flags_without_effect(config: PretrainedConfig, environ: Mapping[str, str] | None = None) -> None:
    """One warning line per ``LCKV_*`` kernel flag that is on while ``config``'s model is built as another model
    type's class (a Llama: transformers' ``LlamaForCausalLM``): the flags pick the kernels of opt-llama and
    lckv-llama models only, so such a model runs its stock kernels whatever they say. Called where a tool builds a
    model (run_clm.py, ``tools.generation.instantiate``, ``tools.measure.build_random_model``)."""
    if isinstance(config, OptLlamaConfig):
        return
    for flag in FLAGS:
        if flag_enabled(flag, environ):
            logger.warning(
                "%s=1: no effect on model_type %r (the LCKV_* kernel flags select the kernels of opt-llama and "
                "lckv-llama models; this one runs transformers' own)",
                flag,
                config.model_type,
            )


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """A tool's own on/off env flag (e.g. ``LCKV_EVAL_SEQUENTIAL``): 1 on, 0 or unset off, else a UsageError."""
    try:
        return flag_enabled(name, environ)
    except ValueError as error:
        raise UsageError(str(error)) from None


# ----------------------------------------------------------------------------- numbers


def check_range(
    flag: str,
    value: float | None,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_min: bool = False,
) -> None:
    """``value`` (None: not given, fine) within ``[minimum, maximum]`` (``(minimum, ...`` if ``exclusive_min``)."""
    if value is None:
        return
    low_ok = minimum is None or (value > minimum if exclusive_min else value >= minimum)
    if low_ok and (maximum is None or value <= maximum):
        return
    bounds = []
    if minimum is not None:
        bounds.append(f"{'>' if exclusive_min else '>='} {minimum}")
    if maximum is not None:
        bounds.append(f"<= {maximum}")
    raise UsageError(f"{flag}: {value}; allowed values are {' and '.join(bounds)}")


def parse_int_list(flag: str, text: str, minimum: int = 1) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; each an integer >= ``minimum``, at least one."""
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag}: {text!r}; allowed is a comma-separated list of integers >= {minimum}") from None
    if not values or min(values) < minimum:
        raise UsageError(f"{flag}: {text!r}; allowed is a comma-separated list of integers >= {minimum}")
    return values


def positive_quantity(text: str, units: Mapping[str, float], default_unit: str, suffix: str = "") -> float | None:
    """``text`` as a positive number times its unit (upper-cased, ``suffix`` dropped; none: ``default_unit``), or
    None."""
    match = SIZE.match(text)
    unit = (match.group(2).upper().removesuffix(suffix) or default_unit) if match else None
    if match is None or unit not in units or float(match.group(1)) <= 0:
        return None
    return float(match.group(1)) * units[unit]


def parse_size(flag: str, text: str) -> float:
    """A positive byte count: ``"80GB"`` -> 8e10, ``"24GiB"`` -> 24 * 2**30, ``"3.35TB"``, ``"1e9"`` (bytes)."""
    size = positive_quantity(text, UNITS, "B")
    if size is None:
        raise UsageError(
            f"{flag}: {text!r}; allowed is a positive size such as 80GB, 3.35TB or 24GiB "
            f"(units {', '.join(sorted(UNITS, key=UNITS.get))})"
        )
    return size


FLOP_RATE_UNITS = {"": 1, "G": 1e9, "T": 1e12, "P": 1e15}


def parse_flop_rate(flag: str, text: str) -> float:
    """A positive FLOP/s rate: ``"989T"`` or ``"989TFLOPS"`` -> 9.89e14, ``"9.89e14"``."""
    rate = positive_quantity(text, FLOP_RATE_UNITS, "", suffix="FLOPS")
    if rate is None:
        raise UsageError(f"{flag}: {text!r}; allowed is a positive FLOP/s rate such as 989T, 989TFLOPS or 9.89e14")
    return rate


# ----------------------------------------------------------------------------- paths


def _regular_file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is not a directory (nothing can be created under it)."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output_dir(flag: str, path: str | os.PathLike) -> Path:
    """``path`` can be (or is) a directory: not an existing file, not under one. Creates nothing."""
    path = Path(path)
    blocker = path if path.exists() and not path.is_dir() else _regular_file_above(path)
    if blocker is not None:
        raise UsageError(f"{flag}: {path}: {blocker} is a file; allowed is a directory path (existing or not)")
    return path


def check_output_file(flag: str, path: str | os.PathLike) -> Path:
    """``path`` can be written as a file: not a directory, not under a regular file. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag}: {path} is a directory; allowed is a file path")
    blocker = _regular_file_above(path)
    if blocker is not None:
        raise UsageError(f"{flag}: {path}: {blocker} is a file, not a directory; allowed is a path in a directory")
    return path


def check_input_file(flag: str, path: str | os.PathLike) -> Path:
    """``path`` exists and is a file."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{flag}: {path} does not exist; allowed is an existing file")
    if not path.is_file():
        raise UsageError(f"{flag}: {path} is a directory, not a file; allowed is a file")
    return path


def check_text_file(flag: str, path: str | os.PathLike) -> Path:
    """``path`` is an existing, non-empty UTF-8 text file (its first MiB is checked: no NUL bytes, decodes)."""
    path = check_input_file(flag, path)
    with path.open("rb") as handle:
        head = handle.read(TEXT_PROBE_BYTES)
    if not head.strip():
        raise UsageError(f"{flag}: {path} is empty; allowed is a non-empty text file")
    if b"\0" in head or not _is_utf8(head, cut=len(head) == TEXT_PROBE_BYTES):
        raise UsageError(f"{flag}: {path} is not UTF-8 text (binary data?); allowed is a text file")
    return path


def _is_utf8(data: bytes, cut: bool) -> bool:
    """Whether ``data`` decodes as UTF-8; with ``cut`` a character split at its end (at most 3 bytes) is fine."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return cut and error.start >= len(data) - 3
    return True


def read_text_file(flag: str, path: str | os.PathLike) -> str:
    """The text of ``path``, checked by ``check_text_file``."""
    path = check_text_file(flag, path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{flag}: {path} is not UTF-8 text (binary data?); allowed is a text file") from None


# ----------------------------------------------------------------------------- dtype and device


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``--dtype``: ``auto`` is bfloat16 on CUDA and float32 elsewhere; else the named dtype."""
    if name == AUTO:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise UsageError(f"--dtype: {name!r}; allowed values are {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def resolve_device(value: str | None, flag: str = "--device") -> str:
    """``--device``: None is cuda when available, else cpu; a named device must parse and exist here."""
    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag}: {value!r}; allowed are cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag}: {value}: CUDA is not available on this machine; allowed is cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag}: {value}; allowed are cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type in ("mps", "xpu"):
        backend = torch.backends.mps if device.type == "mps" else getattr(torch, "xpu", None)
        if backend is None or not backend.is_available():
            raise UsageError(f"{flag}: {value}: {device.type} is not available on this machine; allowed is cpu")
    elif device.type != "cpu":  # meta holds no data; other accelerators are not supported by these tools
        raise UsageError(f"{flag}: {value!r}; allowed are cpu, cuda or cuda:N")
    return value


# ----------------------------------------------------------------------------- configs


def check_source(flag: str, source: str, required_file: str | None = None) -> None:
    """A local path must exist (a file, or a directory holding ``required_file``); a hub id needs the hub.

    A missing local path is reported as missing, not as a malformed hub repo id; offline, a name that is not
    a local path is reported as such.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return
    if path.is_dir():
        # run_clm.py moves its final model into place one file at a time: until the move is done the directory holds
        # part of the new save, maybe next to an earlier one's files, and every tool that reads it must refuse it.
        # The check's module brings in the Trainer, so it is imported only where a staging directory exists.
        from models.export import STAGING_DIR

        if (path / STAGING_DIR).is_dir():
            from tools.training_checkpoints import check_save_finished

            check_save_finished(flag, source)
        if required_file and not (path / required_file).is_file():
            raise UsageError(
                f"{flag}: {source} has no {required_file}; allowed is a checkpoint directory or a config .json"
            )
        return
    if looks_like_local_path(source):
        raise UsageError(f"{flag}: {source} does not exist; allowed is a local path or a hub id")
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UsageError(
            f"{flag}: {source} does not exist locally, and offline (HF_HUB_OFFLINE=1) it cannot be a hub id; "
            "allowed is a local path"
        )


def check_weights(flag: str, source: str) -> None:
    """A local checkpoint directory holds model weights (``save_pretrained``'s safetensors or torch files, or their
    shard index); a hub id or a config file is not checked here."""
    path = Path(source).expanduser()
    if path.is_dir() and not any((path / name).is_file() for name in WEIGHT_FILES):
        raise UsageError(
            f"{flag}: {source} holds no model weights (none of {', '.join(WEIGHT_FILES)}); allowed is a "
            "directory written by save_pretrained or the Trainer"
        )


def check_tokenizer_source(flag: str, source: str) -> None:
    """``check_source``, and a local directory holds a tokenizer file (transformers would blame missing packages)."""
    check_source(flag, source)
    path = Path(source).expanduser()
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(
            f"{flag}: {source} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); allowed is a "
            "tokenizer directory or a hub id"
        )


def load_tokenizer(flag: str, source: str, **kwargs) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(source, **kwargs)``, checked by ``check_tokenizer_source``; a tokenizer
    transformers cannot load is a UsageError too."""
    check_tokenizer_source(flag, source)
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise UsageError(f"{flag}: cannot load a tokenizer from {source} ({one_line(error)})") from None


def load_config(
    flag: str,
    source: str,
    overrides: Mapping[str, Any] | None = None,
    overrides_flag: str = "--config_overrides",
    cache_dir: str | None = None,
) -> PretrainedConfig:
    """The model config from a ``.json`` file, a checkpoint directory or a hub id, with ``overrides`` applied.

    Every failure a user can cause (missing path, not JSON, no or unknown ``model_type``, unknown override field,
    a value the config's validation refuses) is a UsageError naming ``flag`` (or ``overrides_flag``).
    """
    check_source(flag, source, required_file="config.json")
    try:
        return read_config(flag, source, overrides, overrides_flag, cache_dir)
    except ValueError as error:
        raise UsageError(str(error)) from None


def opt_llama_config(flag: str, config: PretrainedConfig) -> OptLlamaConfig:
    """``config`` as an opt-llama config (``models.config_loading.as_opt_llama``: a Llama's with every layer standard);
    another model type is a UsageError naming ``flag``."""
    try:
        return as_opt_llama(config)
    except ValueError as error:
        raise UsageError(f"{flag}: {error}") from None


def load_opt_llama_config(flag: str, source: str) -> OptLlamaConfig:
    """``load_config`` of ``source``, as an opt-llama config (``opt_llama_config``)."""
    return opt_llama_config(flag, load_config(flag, source))


def check_attn_implementation(flag: str, name: str) -> None:
    """``name`` is ``eager`` or an attention function registered with transformers (sdpa_packed_gqa included) that
    these tools can run: not a paged one (``paged|...`` reads continuous batching's paged cache and ignored the masks
    these tools build: wrong tokens, silently), and a flash-attention one only where its package is installed."""
    from transformers import AttentionInterface, utils

    installed = {
        "flash_attention_2": utils.is_flash_attn_2_available,
        "flash_attention_3": utils.is_flash_attn_3_available,
        "flash_attention_4": utils.is_flash_attn_4_available,
    }
    allowed = {
        key
        for key in ("eager", *AttentionInterface().valid_keys())
        if not key.startswith("paged|") and installed.get(key, lambda: True)()
    }
    if name not in allowed:
        raise UsageError(f"{flag}: {name!r}; allowed are {', '.join(sorted(allowed))}")


def require_lckv(config: PretrainedConfig, flag: str) -> None:
    """An LCKV exact switch (``flag``) applies to ``config``: an opt-llama or lckv-llama model, else a UsageError.

    Decided on the config object (``isinstance``), never on ``to_dict()``: ``lckv-llama`` saves its fields under
    its own names (``use_sequential``), so its dict has no ``sequential_forward`` although the model reads it.
    Other model types compute no iterations, so an exact switch has nothing to change there.
    """
    if not isinstance(config, OptLlamaConfig):
        raise UsageError(
            f"{flag}: model_type {config.model_type!r} has no iterative computation to make exact; "
            "allowed only for opt-llama and lckv-llama"
        )


def set_sequential(config: PretrainedConfig, flag: str) -> None:
    """The sequential switch: every evaluation-mode multi-token forward of an LCKV model runs token by token (exact)."""
    require_lckv(config, flag)
    config.sequential_forward = True


def check_prefill(config: PretrainedConfig, flag: str, mode: str) -> None:
    """The prefill switch can set ``mode`` (iterative, sequential or auto) on ``config``: an LCKV model, and under
    ``sequential_forward`` (every multi-token forward token by token) only ``"sequential"``; else a UsageError."""
    require_lckv(config, flag)
    if mode not in PREFILL_MODES:
        raise UsageError(f"{flag}: {mode!r}; allowed values are {', '.join(PREFILL_MODES)}")
    if config.sequential_forward and mode != "sequential":
        raise UsageError(
            f"{flag}: {mode!r} cannot apply: sequential_forward is on (every multi-token forward runs token "
            "by token); allowed is 'sequential', or leave sequential_forward off"
        )


def set_prefill(config: PretrainedConfig, flag: str, mode: str) -> None:
    """The prefill switch: ``config.prefill = mode``, checked by ``check_prefill``."""
    check_prefill(config, flag, mode)
    config.prefill = mode


SMALL_BATCH_GEMV_HELP = (
    "linear layers run a Triton GEMV at one row, i.e. batch-1 decoding (models/kernels/small_batch_linear.py; CUDA, "
    "one process): the captured batch-1 step 11-21%% faster on an H200 (docs/fast_decode.md); with "
    "--fused_projections the MLP's gate/up GEMV also applies SwiGLU; at more rows a Triton GEMM where its measured "
    "table names the shape (on an H200 only the TinyLlama LM head at batch 128)"
)
FUSED_PROJECTIONS_HELP = (
    "each attention's Q/K/V and each MLP's gate/up projections run as one matrix product (models/"
    "fused_projections.py; same parameters and state dict, results equal to rounding; one process): fewer, larger "
    "products per decode step, and a decode step's RoPE and static-cache write as one Triton kernel per attention "
    "(docs/fast_decode.md)"
)


DEPENDENT_LAUNCH_HELP = (
    "programmatic dependent launch (models/kernels/dependent_launch.py; CUDA compute capability 9.0+, i.e. Hopper): "
    "each kernel of a compiled step starts while the one before it finishes, inductor's kernels "
    "(TORCHINDUCTOR_ENABLE_PDL) and this repository's Triton kernels alike; the captured batch-1 TinyLlama step 11%% "
    "faster on an H200 (docs/fast_decode.md)"
)


PERSISTENT_REDUCTIONS_HELP = (
    "inductor reduces rows of up to 8192 values (a compiled step's RMSNorm over the hidden size) in one pass held in "
    "registers, where by default it loops above 1024 values and reads the row twice "
    "(models/kernels/persistent_reductions.py; CUDA; results equal to rounding): the captured batch-1 TinyLlama step "
    "2.6-2.8%% faster on an H200 (medians), batch 128 unchanged (docs/fast_decode.md)"
)
GEMV_FUSION_HELP = (
    "with --small_batch_gemv: each compiled batch-1 GEMV takes in the RMSNorm before it and the residual add after "
    "it, so a decoder layer's two add + norm kernels are gone (models/kernels/gemv_fusion.py, a pass over the "
    "compiled graph; results equal to rounding): the captured batch-1 step 2.8-3.2%% shorter on an H200 at the "
    "TinyLlama shape, 0.6-2.1%% at Llama-2-7B's (docs/fast_decode.md)"
)
# The switches of add_decode_kernel_options, as the tools record them in their JSON's setting.
DECODE_KERNEL_OPTIONS = (
    "fused_projections",
    "small_batch_gemv",
    "gemv_fusion",
    "dependent_launch",
    "persistent_reductions",
)


# Options of add_decode_kernel_options that change only what inductor compiles (dependent launch also reaches this
# repository's Triton kernels in eager forwards)
COMPILED_ONLY_OPTIONS = ("gemv_fusion", "persistent_reductions")


def check_compiled_only_options(args: argparse.Namespace, compiles: bool, allowed_with: str) -> None:
    """A usage error for each option of ``COMPILED_ONLY_OPTIONS`` given where the run compiles no decode step: it would
    change nothing, and a benchmark must not measure another path than the one asked for."""
    for option in COMPILED_ONLY_OPTIONS:
        if getattr(args, option) and not compiles:
            raise UsageError(
                f"--{option}: changes only compiled decode steps, and this run compiles none; "
                f"allowed with {allowed_with}"
            )


def add_decode_kernel_options(parser: argparse.ArgumentParser) -> None:
    """``--fused_projections``, ``--small_batch_gemv``, ``--gemv_fusion``, ``--dependent_launch`` and
    ``--persistent_reductions`` (``set_decode_kernel_options``)."""
    parser.add_argument("--fused_projections", action="store_true", help=FUSED_PROJECTIONS_HELP)
    parser.add_argument("--small_batch_gemv", action="store_true", help=SMALL_BATCH_GEMV_HELP)
    parser.add_argument("--gemv_fusion", action="store_true", help=GEMV_FUSION_HELP)
    parser.add_argument("--dependent_launch", action="store_true", help=DEPENDENT_LAUNCH_HELP)
    parser.add_argument("--persistent_reductions", action="store_true", help=PERSISTENT_REDUCTIONS_HELP)


def set_decode_kernel_options(model: torch.nn.Module, args: argparse.Namespace) -> None:
    """The options of ``add_decode_kernel_options`` for ``model``: its linear layers (``set_linear_options``), then
    the GEMV fusion, programmatic dependent launch and the one-pass reductions for this thread's compiled steps; a
    usage error where an option given cannot apply."""
    set_linear_options(model, args.fused_projections, args.small_batch_gemv)
    device = next(model.parameters()).device
    if args.gemv_fusion:
        if not args.small_batch_gemv or not supports_gemv_fusion():
            raise UsageError(
                "--gemv_fusion: fuses into the batch-1 GEMV, so allowed with --small_batch_gemv, where inductor's "
                "post-grad custom pass is not already another library's"
            )
        enable_gemv_fusion()
    if args.dependent_launch:
        if not supports_dependent_launch(device):
            raise UsageError(
                f"--dependent_launch: not supported for a model on {device}; allowed on a CUDA GPU of compute "
                "capability 9.0 or more (Hopper) with a torch whose inductor has triton.enable_pdl"
            )
        enable_dependent_launch()
    if args.persistent_reductions:
        if device.type != "cuda" or not supports_wide_persistent_reductions():
            raise UsageError(
                f"--persistent_reductions: does not apply to a model on {device}; allowed on a CUDA GPU (inductor's "
                "Triton kernels) with a torch whose inductor takes inductor_choices_class, none set by another library"
            )
        enable_wide_persistent_reductions()


def set_linear_options(model: torch.nn.Module, fused_projections: bool, small_batch_gemv: bool) -> None:
    """``--fused_projections`` then ``--small_batch_gemv`` (so the GEMV also runs the fused products); a usage error
    where an option given changes nothing (a benchmark must not measure another path than the one asked for)."""
    if fused_projections and not fuse_projections(model):
        raise UsageError(
            "--fused_projections: no attention or MLP of this model has projections to fuse here; allowed on one "
            "process, with Llama or LCKV layers"
        )
    if small_batch_gemv and not use_small_batch_linear(model):
        device = next(model.parameters()).device
        raise UsageError(
            f"--small_batch_gemv: no layer can run the GEMV here (model on {device}); allowed on one process with "
            "Triton and the model on a CUDA GPU"
        )


def is_sequential(config: PretrainedConfig) -> bool:
    """Whether every evaluation-mode multi-token forward of ``config``'s model runs token by token, with a cache or
    without: an LCKV model under the model's own rule (``every_forward_sequential``)."""
    return isinstance(config, OptLlamaConfig) and every_forward_sequential(config)


def check_choices(flag: str, values: Iterable[str], allowed: Iterable[str]) -> None:
    """Every one of ``values`` is among ``allowed``; a long list of choices is summarised by the closest names."""
    allowed = sorted(allowed)
    known = set(allowed)
    unknown = [v for v in values if v not in known]
    if not unknown:
        return
    if len(allowed) <= MAX_CHOICES_SHOWN:
        raise UsageError(f"{flag}: unknown {', '.join(map(repr, unknown))}; allowed are {', '.join(allowed)}")
    hints = [f"{v!r} (closest: {', '.join(difflib.get_close_matches(v, allowed, n=5)) or 'none'})" for v in unknown]
    raise UsageError(f"{flag}: unknown {', '.join(hints)}; allowed is one of {len(allowed)} names")
