"""The two layer-layout strings of the original LCKV code, parsed into one representation and written back.

Both describe, per layer, whose keys/values it attends to; this project works from the parsed form:

* ``kv_sources[i]``: the layer whose KVs layer ``i`` reads (``i`` itself for a layer with its own KVs);
* ``window_layers``: the layers whose attention is limited to a sliding window of ``sliding_window`` tokens.

Published ``opt-llama`` syntax (``layer_types="0_1_1_1_2_0"`` with ``target_layer``): 0 a standard layer,
1 a condensed layer reading the target, 2 the target. ``lckv-llama`` syntax (``layer_types="0s_4_4_4_4_5s"``):
the ``i``-th entry is the layer whose KVs layer ``i`` reads, an ``s`` suffix marks a sliding-window layer.
Every error is a ``ValueError`` naming the field, the bad value and what is allowed.
"""

import re

STANDARD, CONDENSED, TARGET = "0", "1", "2"
ALLOWED_LAYER_TYPES = (STANDARD, CONDENSED, TARGET)
LCKV_ENTRY = re.compile(r"^(\d+)(s?)$")


def default_published_layout(num_hidden_layers: int) -> str:
    """The paper's default layout: one standard layer at each end, the target just below the top one."""
    if num_hidden_layers < 3:
        return "_".join([STANDARD] * num_hidden_layers)
    return "_".join([STANDARD] + [CONDENSED] * (num_hidden_layers - 3) + [TARGET, STANDARD])


def parse_published_layout(layer_types: str, target_layer: int) -> list[int]:
    """Map the published ``0/1/2`` layout string to ``kv_sources``.

    Args:
        layer_types: ``"0_1_..._2_0"``, one entry per layer (0 standard, 1 condensed, 2 target).
        target_layer: index of the target layer; negative counts from the top as in Python.

    Returns:
        ``kv_sources`` with ``kv_sources[i] == i`` for standard and target layers and the target's index for
        condensed layers.
    """
    types = layer_types.split("_")
    num_layers = len(types)
    unknown = sorted({t for t in types if t not in ALLOWED_LAYER_TYPES})
    if unknown:
        raise ValueError(
            f"layer_types: unknown layer type(s) {unknown}; allowed values are 0 (standard), 1 (condensed), 2 (target)"
        )
    if not -num_layers <= target_layer < num_layers:
        raise ValueError(
            f"target_layer: {target_layer} is out of range; allowed values are -{num_layers}..{num_layers - 1}"
        )
    target = target_layer % num_layers
    marked = [i for i, t in enumerate(types) if t == TARGET]
    if len(marked) > 1:
        raise ValueError(f"layer_types: {len(marked)} target layers (type 2) at {marked}; allowed is exactly one")
    if CONDENSED in types and not marked:
        raise ValueError("layer_types: condensed layers (type 1) need one target layer (type 2)")
    if marked and marked[0] != target:
        raise ValueError(
            f"target_layer: {target_layer} (layer {target}) is not the layer marked 2 in layer_types; "
            f"allowed values are {marked[0]} or {marked[0] - num_layers}"
        )
    return [target if t == CONDENSED else i for i, t in enumerate(types)]


def published_layout(kv_sources: list[int]) -> tuple[str, int]:
    """``kv_sources`` as the published ``(layer_types, target_layer)``; a ValueError where that syntax cannot say it.

    The syntax has one target: every layer reads itself or that target, and the target is read from below.
    """
    shared = sorted({src for i, src in enumerate(kv_sources) if src != i})
    if len(shared) > 1:
        raise ValueError(
            f"kv_sources: {kv_sources} shares the KVs of {len(shared)} layers {shared}; "
            "the published layer_types allows one target"
        )
    if not shared:
        return "_".join([STANDARD] * len(kv_sources)), -2 if len(kv_sources) >= 2 else -1
    target = shared[0]
    below = [i for i, src in enumerate(kv_sources) if src == target and i > target]
    if below:
        raise ValueError(
            f"kv_sources: layers {below} read layer {target} from above; "
            "the published layer_types only lets layers below the target read it"
        )
    types = [TARGET if i == target else CONDENSED if src == target else STANDARD for i, src in enumerate(kv_sources)]
    return "_".join(types), target - len(kv_sources)


def parse_lckv_layout(layer_types: str) -> tuple[list[int], list[int]]:
    """Map the ``lckv-llama`` layout string to ``(kv_sources, window_layers)``.

    >>> parse_lckv_layout("0s_4_4_4_4_5s")
    ([0, 4, 4, 4, 4, 5], [0, 5])
    """
    kv_sources, window_layers = [], []
    for i, entry in enumerate(layer_types.split("_")):
        match = LCKV_ENTRY.match(entry)
        if match is None:
            raise ValueError(
                f"layer_types: entry {i} is {entry!r}; "
                "allowed is a layer index, optionally followed by 's' (sliding window), e.g. '0_4_4_4_4_5s'"
            )
        kv_sources.append(int(match.group(1)))
        if match.group(2):
            window_layers.append(i)
    return kv_sources, window_layers


def lckv_layout(kv_sources: list[int], window_layers: list[int]) -> str:
    """``(kv_sources, window_layers)`` as the ``lckv-llama`` layout string (the inverse of ``parse_lckv_layout``)."""
    windows = set(window_layers)
    return "_".join(f"{src}{'s' if i in windows else ''}" for i, src in enumerate(kv_sources))


def validate_kv_sources(kv_sources: list[int], num_hidden_layers: int, field: str = "kv_sources") -> None:
    """One entry per layer, each naming a layer that computes its own KVs; errors start with ``field``."""
    if len(kv_sources) != num_hidden_layers:
        raise ValueError(
            f"{field}: {len(kv_sources)} entries for num_hidden_layers={num_hidden_layers}; "
            "allowed is one entry per layer"
        )
    for i, src in enumerate(kv_sources):
        if not 0 <= src < num_hidden_layers:
            raise ValueError(f"{field}: layer {i} reads layer {src}; allowed values are 0..{num_hidden_layers - 1}")
        if kv_sources[src] != src:
            raise ValueError(
                f"{field}: layer {i} reads layer {src}, which reads layer {kv_sources[src]}; "
                "allowed sources are layers with their own KVs (whose entry is their own index)"
            )


def validate_window_layers(window_layers: list[int], num_hidden_layers: int) -> None:
    """Distinct layer indices in range."""
    bad = [i for i in window_layers if not 0 <= i < num_hidden_layers]
    if bad or len(set(window_layers)) != len(window_layers):
        raise ValueError(
            f"sliding_window_layers: {window_layers}; allowed are distinct layer indices 0..{num_hidden_layers - 1}"
        )
