"""Configuration of the Layer-Condensed KV Cache (LCKV) Llama, model_type ``opt-llama``.

The published LCKV configs describe the layer layout with a string, ``layer_types="0_1_1_..._1_2_0"``
(0 standard layer, 1 condensed layer, 2 the target layer whose KVs the condensed layers read). In
transformers v5 ``layer_types`` is a reserved field (a list of attention kinds per layer, read by the
cache and mask builders), so the LCKV string is kept as ``lckv_layer_types`` and ``layer_types`` keeps
its transformers meaning. Everything in the model works from one per-layer list, ``kv_sources``:
``kv_sources[i]`` is the layer whose keys/values layer ``i`` attends to.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from .prefill_modes import check_prefill_mode

STANDARD, CONDENSED, TARGET = "0", "1", "2"
ALLOWED_LAYER_TYPES = (STANDARD, CONDENSED, TARGET)


def default_lckv_layer_types(num_hidden_layers: int) -> str:
    """The paper's default layout: one standard layer at each end, the target just below the top one."""
    if num_hidden_layers < 3:
        return "_".join([STANDARD] * num_hidden_layers)
    return "_".join([STANDARD] + [CONDENSED] * (num_hidden_layers - 3) + [TARGET, STANDARD])


def kv_sources_from_layer_types(layer_types: str, target_layer: int) -> list[int]:
    """Map the published LCKV layout string to the per-layer KV source list.

    Args:
        layer_types: ``"0_1_..._2_0"``, one entry per layer (0 standard, 1 condensed, 2 target).
        target_layer: index of the target layer; negative counts from the top as in Python.

    Returns:
        ``kv_sources`` with ``kv_sources[i] == i`` for standard and target layers and
        ``kv_sources[i] == target`` for condensed layers.

    Raises:
        ValueError: naming the field and the allowed values, for an unknown type, two targets, a
            target out of range or not marked ``2``, or condensed layers without a target.
    """
    types = layer_types.split("_")
    num_layers = len(types)
    unknown = sorted({t for t in types if t not in ALLOWED_LAYER_TYPES})
    if unknown:
        raise ValueError(f"layer_types: unknown layer type(s) {unknown}; allowed values are 0 (standard), 1 (condensed), 2 (target)")
    if not -num_layers <= target_layer < num_layers:
        raise ValueError(f"target_layer: {target_layer} is out of range; allowed values are -{num_layers}..{num_layers - 1}")
    target = target_layer % num_layers
    marked = [i for i, t in enumerate(types) if t == TARGET]
    if len(marked) > 1:
        raise ValueError(f"layer_types: {len(marked)} target layers (type 2) at {marked}; allowed is exactly one")
    if CONDENSED in types and not marked:
        raise ValueError("layer_types: condensed layers (type 1) need one target layer (type 2)")
    if marked and marked[0] != target:
        raise ValueError(
            f"target_layer: {target_layer} (layer {target}) is not the layer marked 2 in layer_types; allowed values are {marked[0]} or {marked[0] - num_layers}"
        )
    return [target if t == CONDENSED else i for i, t in enumerate(types)]


def validate_kv_sources(kv_sources: list[int], num_hidden_layers: int) -> None:
    """Check a general per-layer source list: one entry per layer, each a layer that computes its own KVs."""
    if len(kv_sources) != num_hidden_layers:
        raise ValueError(f"kv_sources: {len(kv_sources)} entries for {num_hidden_layers} layers; allowed is one entry per layer")
    for i, src in enumerate(kv_sources):
        if not 0 <= src < num_hidden_layers:
            raise ValueError(f"kv_sources: layer {i} reads layer {src}; allowed values are 0..{num_hidden_layers - 1}")
        if kv_sources[src] != src:
            raise ValueError(f"kv_sources: layer {i} reads layer {src}, which has no KVs of its own; allowed sources are layers with kv_sources[j] == j")


@strict
class OptLlamaConfig(LlamaConfig):
    r"""Llama configuration plus the LCKV fields.

    lckv_layer_types (`str`, *optional*):
        The published LCKV layout, ``"0_1_..._1_2_0"``. A string passed as ``layer_types`` (the
        published config format) is moved here. Defaults to one standard layer at each end and the
        target just below the top.
    target_layer (`int`, defaults to -2):
        Index of the target layer; negative counts from the top.
    kv_sources (`list[int]`, *optional*):
        General per-layer KV source list (CLA, YOCO, ...). Overrides ``lckv_layer_types`` when given.
    num_encoders (`int`, defaults to 8):
        ``m + b - 1`` in the paper: the parallel computation runs ``num_encoders + 1`` iterations.
    num_trained_encoders (`int`, defaults to 1):
        ``b - 1``: the last ``num_trained_encoders + 1`` iterations carry gradients.
    train_kv (`bool`, defaults to False):
        Add the MSE between the last two iterations' KVs to the training loss.
    sequential_forward (`bool`, defaults to False):
        Compute every forward without gradients token by token (the exact semantics) instead of by
        iterations; used by sequential evaluation.
    prefill (`str`, defaults to "iterative"):
        How a no-grad forward of several tokens that fills a cache (the prompt prefill) runs: "iterative" (the
        parallel iterations, approximate past ``num_encoders + 1`` tokens), "sequential" (token by token, exact,
        ``models.sequential_prefill``) or "auto" (the cheaper one for the batch size and prompt length).
    """

    model_type = "opt-llama"

    layer_types: list[str] | str | None = None
    lckv_layer_types: str | None = None
    target_layer: int = -2
    kv_sources: list[int] | None = None
    num_encoders: int = 8
    num_trained_encoders: int = 1
    train_kv: bool = False
    sequential_forward: bool = False
    prefill: str = "iterative"

    def __post_init__(self, **kwargs):
        if isinstance(self.layer_types, str):
            self.lckv_layer_types, self.layer_types = self.layer_types, None
        if self.lckv_layer_types is None:
            self.lckv_layer_types = default_lckv_layer_types(self.num_hidden_layers)
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        # Checked here too, so a bad field surfaces as a plain one-line ValueError, not wrapped by @strict.
        self.validate_lckv()
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        super().validate_architecture()
        self.validate_lckv()

    def validate_lckv(self) -> None:
        """Validate the LCKV fields; every error is a ValueError naming its field and the allowed values."""
        num_types = len(self.lckv_layer_types.split("_"))
        if num_types != self.num_hidden_layers:
            raise ValueError(
                f"layer_types: {num_types} entries for num_hidden_layers={self.num_hidden_layers}; allowed is one entry (0, 1 or 2) per layer"
            )
        if self.kv_sources is None:
            kv_sources_from_layer_types(self.lckv_layer_types, self.target_layer)
        else:
            validate_kv_sources(self.kv_sources, self.num_hidden_layers)
        if self.num_encoders < 0:
            raise ValueError(f"num_encoders: {self.num_encoders}; allowed values are integers >= 0")
        if not 0 <= self.num_trained_encoders <= self.num_encoders:
            raise ValueError(
                f"num_trained_encoders: {self.num_trained_encoders}; allowed values are 0..num_encoders ({self.num_encoders})"
            )
        check_prefill_mode(self.prefill)

    @property
    def layer_kv_sources(self) -> list[int]:
        """The per-layer KV source list every part of the model works from."""
        if self.kv_sources is not None:
            return list(self.kv_sources)
        return kv_sources_from_layer_types(self.lckv_layer_types, self.target_layer)

    @property
    def kv_sharing_modes(self) -> list[str | None]:
        """transformers' per-layer sharing marks: layers reading another layer's KVs get a DummyLayer cache."""
        return [None if src == i else "reuse" for i, src in enumerate(self.layer_kv_sources)]

    @property
    def num_kv_layers(self) -> int:
        """Number of layers whose KVs are cached."""
        return sum(src == i for i, src in enumerate(self.layer_kv_sources))


__all__ = ["OptLlamaConfig"]
