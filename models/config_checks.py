"""Checks shared by the CLIs and the LCKV config classes: the shape fields every decoder config divides and
reshapes by (on a plain mapping of fields), and whether a config source that does not exist was meant as a local path.

Run on a raw config dict before a config class divides by them (the CLIs, for any model type) and by the LCKV
config itself; every error is a one-line ValueError naming the field, the value and what is allowed.
"""

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

POSITIVE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)


def check_shape_fields(fields: Mapping[str, Any]) -> None:
    """Positive integers; KV heads divide the heads; the hidden size splits into the heads (transformers' Llama
    requires it even with an explicit ``head_dim``); an even ``head_dim`` (rotary embeddings rotate pairs)."""
    for name in POSITIVE_FIELDS:
        value = fields.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name}: {value!r}; allowed values are integers >= 1")
    heads, kv_heads, hidden, head_dim = (
        fields.get(k) for k in ("num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim")
    )
    if heads and kv_heads and heads % kv_heads:
        raise ValueError(
            f"num_key_value_heads: {kv_heads} does not divide num_attention_heads={heads}; "
            f"allowed are divisors of {heads}"
        )
    if heads and hidden and hidden % heads:
        raise ValueError(
            f"hidden_size: {hidden} is not a multiple of num_attention_heads={heads}; allowed are multiples of {heads}"
        )
    if head_dim and head_dim % 2:
        raise ValueError(f"head_dim: {head_dim} is odd; allowed are even sizes (rotary embeddings rotate pairs)")


def looks_like_local_path(source: str) -> bool:
    """Whether a missing ``source`` was meant as a local path (a hub id is ``name`` or ``namespace/name``)."""
    return (
        source.endswith(".json")
        or source.startswith((".", "/", "~"))
        or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source)
    )


def check_local_source(source: str | os.PathLike) -> None:
    """A config source that does not exist here and cannot be a hub id: FileNotFoundError saying so (transformers
    would report a malformed hub repo id, or a failed download)."""
    if (
        isinstance(source, (str, os.PathLike))
        and not Path(source).expanduser().exists()
        and looks_like_local_path(str(source))
    ):
        raise FileNotFoundError(
            f"{source}: does not exist; allowed is a config .json, a checkpoint directory or a hub id "
            "(name or namespace/name)"
        )
