"""Write a self-contained checkpoint: this package's modeling code travels inside it.

    python -m tools.export SRC DST     # the command line (tools/export.py) of export_checkpoint

``DST`` loads with ``AutoModelForCausalLM.from_pretrained(DST, trust_remote_code=True)`` where only torch and
transformers are installed (no ``import models``), so any HF tool opens it: ``transformers serve
--trust-remote-code``, the ``lm_eval`` command line, ``pipeline``. ``SRC`` is a checkpoint directory of either
format (``opt-llama``, ``lckv-llama``); its files are copied (weights, tokenizer, generation config), its
``config.json`` gains an ``auto_map``, and the code is this package's own modules, copied as they are now.

How transformers' remote-code loader (``transformers/dynamic_module_utils.py``) finds the code decides the layout:
it copies the file ``auto_map`` names and, recursively, every module that file imports as ``from .name import``
(``get_relative_imports``' pattern; ``from . import name`` is not followed), into one flat directory of a package it
creates. A dotted ``from .a.b import`` is looked up as the file ``a.b.py``, so subpackages do not survive. The bundle
is therefore flat: ``models/kernels/__init__.py`` becomes ``kernels.py`` and ``models/kernels/x.py`` becomes ``x.py``
(their relative imports mean the same there; the names must not clash, which is checked), and it holds exactly the
modules the loader's own scan reaches from the modeling and configuration modules. Optional kernels that are loaded
by name at run time (liger-kernel, flash-attn behind the ``LCKV_*`` flags) are not reached and not bundled: in an
exported checkpoint those flags fall back to the pure PyTorch path. The Triton decode kernel is bundled; its import
sits under ``if is_triton_available():``, which the loader's import check (``check_imports``) skips, as it skips
imports inside ``try`` blocks.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from transformers.dynamic_module_utils import get_relative_imports

from .config_loading import read_config
from .configuration_opt_llama import LckvLlamaConfig, OptLlamaConfig
from .modeling_opt_llama import LckvLlamaForCausalLM, LckvLlamaModel, OptLlamaForCausalLM, OptLlamaModel

PACKAGE_DIR = Path(__file__).resolve().parent
T = TypeVar("T")
# Per model_type, the classes each Auto class loads from the bundled code.
AUTO_CLASSES = {
    config.model_type: {"AutoConfig": config, "AutoModel": model, "AutoModelForCausalLM": causal_lm}
    for config, model, causal_lm in (
        (OptLlamaConfig, OptLlamaModel, OptLlamaForCausalLM),
        (LckvLlamaConfig, LckvLlamaModel, LckvLlamaForCausalLM),
    )
}
# Where run_clm.py stages a checkpoint or the final model until it is whole (tools/training_checkpoints.py); a leading
# "_": the Trainer's hub upload of the output directory skips it.
STAGING_DIR = "_checkpoint-in-progress"
# Trainer state a checkpoint-NNN directory holds beside the model: not part of a model to share.
TRAINING_STATE = (
    "optimizer.pt",
    "scheduler.pt",
    "rng_state*.pth",
    "trainer_state.json",
    "training_args.bin",
    "global_step*",
    "checkpoint-*",  # run_clm's output directory: the Trainer's checkpoints and the staging directory beside the model
    STAGING_DIR,
)


def flat_modules(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Bundled module name -> source file: ``x.py`` of the package and of its subpackages as ``x``, a subpackage's
    ``__init__.py`` as the subpackage's name. ValueError when two files would get one name."""
    modules: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        if path.parent == package_dir and path.name == "__init__.py":
            continue  # `import models` registers the classes; a bundle gets them through auto_map instead
        name = path.parent.name if path.name == "__init__.py" else path.stem
        if name in modules:
            raise ValueError(
                f"{path.relative_to(package_dir)} and {modules[name].relative_to(package_dir)} both bundle as {name}.py"
            )
        modules[name] = path
    return modules


def bundled_modules(entries: list[str], modules: dict[str, Path]) -> dict[str, Path]:
    """``entries`` and every module the loader reaches from them (its own scan, ``get_relative_imports``), by name.

    ValueError for an import the flat bundle cannot serve (a dotted ``from .a.b import`` or an unknown module).
    """
    bundle: dict[str, Path] = {}
    pending = list(entries)
    while pending:
        name = pending.pop()
        if name in bundle:
            continue
        bundle[name] = modules[name]
        for imported in get_relative_imports(modules[name]):
            if imported not in modules:
                raise ValueError(
                    f"{modules[name].parent.name}/{modules[name].name}: 'from .{imported} import': "
                    "allowed in bundled code are "
                    f"imports of sibling modules by their flat names ({', '.join(sorted(modules))})"
                )
            pending.append(imported)
    return bundle


def write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """``write(temporary path)``, then one rename to ``path``: a reader (or a run killed meanwhile) sees the old file
    or the new one, never part of it."""
    partial = path.with_name(path.name + ".partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # a write that failed leaves no temporary file


def write_json(path: Path, data: object, **dump_options) -> None:
    """``data`` as JSON at ``path``, indented by 2 unless ``dump_options`` (for ``json.dumps``) say otherwise, with a
    final newline, written whole (``write_whole``)."""
    text = json.dumps(data, **{"indent": 2} | dump_options) + "\n"
    write_whole(path, lambda partial: partial.write_text(text))


def auto_map(model_type: str) -> dict[str, str]:
    """``config.json``'s ``auto_map`` for ``model_type``: Auto class -> ``module.Class`` in the bundle."""
    return {
        auto: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}" for auto, cls in AUTO_CLASSES[model_type].items()
    }


def bundle_code(checkpoint: str | Path) -> list[str]:
    """Make the checkpoint directory self-contained in place: copy the code, add ``auto_map`` to its ``config.json``
    (and name ``AutoModelForCausalLM`` first in its ``architectures``, for ``transformers serve``).

    Returns the bundled file names.
    """
    checkpoint = Path(checkpoint)
    config_path = checkpoint / "config.json"
    fields = json.loads(config_path.read_text())
    model_type = fields.get("model_type")
    if model_type not in AUTO_CLASSES:
        raise ValueError(f"model_type: {model_type!r}; allowed are {', '.join(AUTO_CLASSES)}")
    mapping = auto_map(model_type)
    entries = sorted({reference.split(".")[0] for reference in mapping.values()})
    bundle = bundled_modules(entries, flat_modules())
    for name, source in bundle.items():
        shutil.copyfile(source, checkpoint / f"{name}.py")
    fields["auto_map"] = mapping
    # `transformers serve` (5.24, cli/serving/model_manager.py, ModelManager._load_model) loads a model as
    # `getattr(transformers, config.architectures[0])`, where no remote-code class is; the Auto class named first is
    # there, and loads the bundled class through auto_map. The concrete class stays listed after it.
    fields["architectures"] = ["AutoModelForCausalLM", mapping["AutoModelForCausalLM"].split(".")[1]]
    write_json(config_path, fields, sort_keys=True)
    return sorted(f"{name}.py" for name in bundle)


def check_paths(source: Path, destination: Path) -> None:
    """One-line ValueErrors naming ``SRC`` or ``DST``: the source is not a checkpoint directory, or the destination
    exists, lies inside the source (a copy of the source would copy itself) or under a file."""
    if not source.is_dir():
        raise ValueError(
            f"SRC: {source} {'is a file' if source.exists() else 'does not exist'}; allowed is a checkpoint directory"
        )
    if not (source / "config.json").is_file():
        raise ValueError(f"SRC: {source} has no config.json; allowed is a checkpoint directory")
    if destination.exists():
        raise ValueError(f"DST: {destination} exists; allowed is a new path")
    if destination.resolve().is_relative_to(source.resolve()):
        raise ValueError(f"DST: {destination} is inside SRC {source}; allowed is a path outside it")
    existing = next(parent for parent in destination.resolve().parents if parent.exists())
    if not existing.is_dir():
        raise ValueError(f"DST: {existing} is a file; allowed is a path under a directory")


def write_staged(source: Path, destination: Path, ignore: tuple[str, ...], finish: Callable[[Path], T]) -> T:
    """Copy ``source`` (without the names matching ``ignore``) into a staging directory beside ``destination``, run
    ``finish`` on the copy, then rename it to ``destination``: nothing is left there on error. Returns ``finish``'s
    result."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as staging:
        staged = Path(staging) / "checkpoint"
        shutil.copytree(source, staged, ignore=shutil.ignore_patterns(*ignore))
        result = finish(staged)
        staged.rename(destination)
    return result


def export_checkpoint(source: str | Path, destination: str | Path) -> list[str]:
    """Write ``source`` with its code bundled to ``destination`` (which must not exist); nothing is left on error.

    A one-line ValueError naming ``SRC`` or ``DST`` for a bad path (``check_paths``) or a model type without LCKV
    code. Training state is left out; other files (weights, tokenizer and its code, generation config) are copied,
    the bundle's own modules written anew.
    """
    source, destination = Path(source), Path(destination)
    check_paths(source, destination)
    config = read_config("SRC", str(source))
    if config.model_type not in AUTO_CLASSES:
        raise ValueError(
            f"SRC: {source}: model_type {config.model_type!r}; allowed are {', '.join(AUTO_CLASSES)} "
            "(other model types load without this repository already)"
        )
    stale_bundle = tuple(f"{name}.py" for name in flat_modules())  # an earlier export's copies
    return write_staged(source, destination, TRAINING_STATE + stale_bundle, bundle_code)
