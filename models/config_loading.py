"""A model config read from a ``.json`` file, a checkpoint directory or a hub id, a Llama config viewed as an
opt-llama one, and an LCKV config's Llama twin: the library half of the tools' config loading
(``tools.cli.load_config`` adds the path and hub checks and turns these ValueErrors into one-line usage errors).

Every failure a caller's input can cause is a one-line ValueError naming the flag (or field), the value and what is
allowed.
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import CONFIG_MAPPING, LlamaConfig, PretrainedConfig

from .config_checks import check_shape_fields
from .configuration_opt_llama import OptLlamaConfig


def one_line(error: BaseException) -> str:
    """An exception's message squeezed onto one line."""
    return " ".join(str(error).split()) or type(error).__name__


def read_config(
    flag: str,
    source: str,
    overrides: Mapping[str, Any] | None = None,
    overrides_flag: str = "--config_overrides",
    cache_dir: str | None = None,
) -> PretrainedConfig:
    """The model config from a ``.json`` file, a checkpoint directory or a hub id, with ``overrides`` applied.

    A ValueError naming ``flag`` (or ``overrides_flag``) for a source that is not JSON, has no or an unknown
    ``model_type``, an unknown override field, or a value the config's validation refuses.
    """
    local = Path(source).expanduser()
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(str(local) if local.exists() else source, cache_dir=cache_dir)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{flag}: cannot read a config from {source} ({one_line(error)})") from None
    if not isinstance(config_dict, dict):
        raise ValueError(f"{flag}: {source}: a JSON {type(config_dict).__name__}; allowed is a JSON object of fields")
    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"{flag}: {source}: model_type {model_type!r}; allowed are opt-llama, llama and the other "
            "transformers model types"
        )
    config_class = CONFIG_MAPPING[model_type]
    if overrides:
        unknown = sorted(set(overrides) - set(config_class().to_dict()) - set(config_dict))
        if unknown:
            renamed = getattr(config_class, "FORMAT_NAMES", {})  # lckv-llama's names of fields the model reads
            hints = "".join(f"; {model_type} writes {name} as {renamed[name]}" for name in unknown if name in renamed)
            raise ValueError(
                f"{overrides_flag}: unknown config field(s) {unknown} for model_type {model_type!r}{hints}"
            )
    try:
        return validated_config(config_class, {**config_dict, **(overrides or {})})
    except INVALID_CONFIG as error:
        # The source alone is valid: the overrides brought the failing value (or made the fields disagree).
        if overrides and valid_config(config_class, config_dict):
            raise ValueError(f"{overrides_flag}: invalid config over {source}: {one_line(error)}") from None
        raise ValueError(f"{flag}: {source}: invalid config: {one_line(error)}") from None


INVALID_CONFIG = (ValueError, TypeError, KeyError, StrictDataclassError)  # a config's validation (rope: KeyError)


def validated_config(config_class: type[PretrainedConfig], fields: dict[str, Any]) -> PretrainedConfig:
    """``config_class`` built from ``fields`` after the shape checks; one of ``INVALID_CONFIG`` where they fail."""
    check_shape_fields(fields)
    return config_class.from_dict(fields)


def valid_config(config_class: type[PretrainedConfig], fields: dict[str, Any]) -> bool:
    """Whether ``fields`` make a valid ``config_class`` config."""
    try:
        validated_config(config_class, fields)
    except INVALID_CONFIG:
        return False
    return True


def as_opt_llama(config: PretrainedConfig) -> OptLlamaConfig:
    """An opt-llama config for ``config``: itself, or for a Llama every layer standard (same weights, same network)."""
    if isinstance(config, OptLlamaConfig):
        return config
    if config.model_type != "llama":
        raise ValueError(f"model_type: {config.model_type!r}; allowed are opt-llama, lckv-llama and llama")
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "layer_types")}
    return OptLlamaConfig(**fields, lckv_layer_types="_".join(["0"] * config.num_hidden_layers))


def llama_twin(config: PretrainedConfig) -> LlamaConfig:
    """The Llama of ``config``'s dimensions and settings: every field a ``LlamaConfig`` has, none of LCKV's (layer
    layout, iterations, prefill), so every layer computes its own KVs. The baseline an LCKV model is measured
    against."""
    llama_fields = LlamaConfig().to_dict().keys() - {"model_type", "architectures", "transformers_version"}
    values = {k: v for k, v in config.to_dict().items() if k in llama_fields}
    return LlamaConfig(**values, architectures=["LlamaForCausalLM"])
