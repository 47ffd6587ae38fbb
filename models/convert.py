"""Convert an LCKV checkpoint directory between the original code's two formats, where the semantics allow.

    python -m tools.convert SRC DST --to {opt-llama,lckv-llama}     # the command line (tools/convert.py)

The weights are the same in both formats (Llama parameter names; layers without KVs lack k_proj/v_proj), so
only ``config.json`` changes; every other file is copied. A layout or behaviour the target format cannot
express is a one-line error and nothing is written:

* ``lckv-llama`` iterations always let the target attend to the KVs it has just computed, so
  ``iteration_style="previous"`` (the published ``opt-llama`` checkpoints) has no ``lckv-llama`` form;
* the published ``opt-llama`` layout string has one target read from below and no sliding windows.
"""

from pathlib import Path

from .config_loading import as_opt_llama, read_config
from .configuration_opt_llama import LckvLlamaConfig, OptLlamaConfig
from .export import STAGING_DIR, check_paths, write_json, write_staged
from .layer_layouts import published_layout

FORMATS = {"opt-llama": OptLlamaConfig, "lckv-llama": LckvLlamaConfig}
# Fields that describe the LCKV layout or semantics (rebuilt below) or name the class (set by the target).
LCKV_FIELDS = {
    "layer_types",
    "lckv_layer_types",
    "target_layer",
    "kv_sources",
    "sliding_window",
    "sliding_window_layers",
    "num_encoders",
    "num_trained_encoders",
    "train_kv",
    "sequential_forward",
    "force_nodiag",
    "iteration_style",
    "forward_passes",
    "backward_passes",
    "use_sequential",
    "model_type",
    "architectures",
    "auto_map",
    "transformers_version",
}


def converted_config(config: OptLlamaConfig, to: str) -> OptLlamaConfig:
    """``config`` (either format) as a config of format ``to`` computing the same function; ValueError where it
    cannot."""
    if to not in FORMATS:
        raise ValueError(f"--to: {to!r}; allowed values are {', '.join(FORMATS)}")
    fields = {k: v for k, v in config.to_dict().items() if k not in LCKV_FIELDS}
    fields.update(
        num_encoders=config.num_encoders,
        num_trained_encoders=config.num_trained_encoders,
        train_kv=config.train_kv,
        sequential_forward=config.sequential_forward,
        force_nodiag=config.force_nodiag,
        iteration_style=config.iteration_style,
    )
    if to == "lckv-llama":
        if config.iteration_style != "current":
            raise ValueError(
                f"iteration_style: {config.iteration_style!r} has no lckv-llama form "
                "(its iterations let the target attend to "
                "the KVs it has just computed); allowed for lckv-llama is 'current'"
            )
        window = {"sliding_window": config.sliding_window} if config.sliding_window is not None else {}
        return LckvLlamaConfig(
            **fields,
            **window,
            kv_sources=config.layer_kv_sources,
            sliding_window_layers=list(config.sliding_window_layers),
            architectures=["LckvLlamaForCausalLM"],
        )
    if config.sliding_window_layers:
        raise ValueError(
            f"sliding_window_layers: {config.sliding_window_layers}; "
            "the published opt-llama layout has no sliding windows, allowed is none"
        )
    layer_types, target_layer = published_layout(config.layer_kv_sources)
    return OptLlamaConfig(
        **fields, layer_types=layer_types, target_layer=target_layer, architectures=["OptLlamaForCausalLM"]
    )


def convert_checkpoint(source: str | Path, destination: str | Path, to: str) -> None:
    """Write ``source`` in format ``to`` to ``destination`` (which must not exist); nothing is left behind on error.
    The paths are checked as ``export.check_paths`` does; a training run's staging directory is not copied."""
    source, destination = Path(source), Path(destination)
    check_paths(source, destination)
    config = converted_config(as_opt_llama(read_config("SRC", str(source))), to)  # a Llama is every layer standard
    write_staged(
        source,
        destination,
        ("config.json", STAGING_DIR),
        lambda staged: write_json(staged / "config.json", config.original_format(), sort_keys=True),
    )
