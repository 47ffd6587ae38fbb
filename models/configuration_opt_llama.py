"""Configurations of the Layer-Condensed KV Cache (LCKV) Llama: model_types ``opt-llama`` and ``lckv-llama``.

Both are one model (``OptLlamaForCausalLM``) described by one internal representation: the per-layer KV
source list ``layer_kv_sources``, the layers with a sliding window (``sliding_window_layers``), whether
every layer drops the diagonal (``force_nodiag``) and how the iterations treat the target
(``iteration_style``). The two classes differ only in the format they read and write:

* ``opt-llama`` reads the published ``layer_types="0_1_..._2_0"`` string with ``target_layer`` (the
  original ``dev-lckv-publish`` release, whose checkpoints the paper's numbers come from). In transformers
  v5 ``layer_types`` is a reserved field (attention kinds per layer, read by the cache and mask builders),
  so the LCKV string is kept as ``lckv_layer_types``, and ``layer_types`` holds transformers' meaning.
* ``lckv-llama`` reads and writes the later format of the original code (its ``main`` branch):
  ``layer_types="0s_4_4_4_4_5s"`` (the layer each layer reads, ``s`` = sliding window), ``forward_passes``,
  ``backward_passes``, ``use_sequential``, ``force_nodiag``, ``sliding_window``.

Semantics defaults (see docs/checkpoint_formats.md): a config that arrives in the published
format (a ``layer_types`` string in an ``opt-llama`` config) computes like the published code
(``force_nodiag=True``, ``iteration_style="previous"``); any other ``opt-llama`` config, this project's
saved checkpoints included, computes as this project always did (``False``, ``"current"``). Both fields
are then saved explicitly.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from .config_checks import POSITIVE_FIELDS, check_local_source, check_shape_fields
from .layer_layouts import (
    default_published_layout,
    lckv_layout,
    parse_lckv_layout,
    parse_published_layout,
    validate_kv_sources,
    validate_window_layers,
)
from .layer_plan import layer_plan, strict_layers, window_cached_layers
from .prefill_modes import check_prefill_mode

ITERATION_STYLES = ("current", "previous")


@strict
class OptLlamaConfig(LlamaConfig):
    r"""Llama configuration plus the LCKV fields (model_type ``opt-llama``).

    lckv_layer_types (`str`, *optional*):
        The published LCKV layout, ``"0_1_..._1_2_0"``. A string passed as ``layer_types`` (the published
        config format) is moved here. Defaults to one standard layer at each end and the target just below the top.
    target_layer (`int`, defaults to -2):
        Index of the target layer; negative counts from the top.
    kv_sources (`list[int]`, *optional*):
        General per-layer KV source list (CLA, YOCO, ...). Overrides ``lckv_layer_types`` when given.
    sliding_window (`int`, *optional*), sliding_window_layers (`list[int]`, *optional*):
        The layers whose attention sees only the last ``sliding_window`` positions (the query's own included).
    num_encoders (`int`, defaults to 8):
        ``m + b - 1`` in the paper: the parallel computation runs ``num_encoders + 1`` iterations.
    num_trained_encoders (`int`, defaults to 1):
        ``b - 1``: the last ``num_trained_encoders + 1`` iterations carry gradients.
    train_kv (`bool`, defaults to False):
        Add the MSE between the last two iterations' KVs to the training loss.
    sequential_forward (`bool`, defaults to False):
        Compute every evaluation-mode (``model.eval()``) forward token by token (the exact semantics) instead of by
        iterations.
    prefill (`str`, defaults to "iterative"):
        How an evaluation-mode forward of several tokens (the prompt prefill) runs: "iterative" (the parallel
        iterations, approximate past ``num_encoders + 1`` tokens), "sequential" (token by token, exact,
        ``models.sequential_prefill``; every such forward, with a cache or without, as ``sequential_forward``) or
        "auto" (where the forward fills a cache, the cheaper one for the batch size and prompt length; without a cache,
        iterative).
    force_nodiag (`bool`, *optional*):
        Every layer attends only to earlier tokens (drops the diagonal). Otherwise only layers reading a
        layer above them do. Default: True for a published-format config, else False.
    iteration_style (`str`, *optional*):
        Which KVs the target layer's own queries attend to in an iteration: ``"current"`` (the ones it has just
        computed, as in ``lckv-llama``) or ``"previous"`` (the previous iteration's, as in the published code).
        Default: ``"previous"`` for a published-format config, else ``"current"``.
    """

    model_type = "opt-llama"

    layer_types: list[str] | str | None = None
    lckv_layer_types: str | None = None
    target_layer: int = -2
    kv_sources: list[int] | None = None
    sliding_window: int | None = None
    sliding_window_layers: list[int] | None = None
    num_encoders: int = 8
    num_trained_encoders: int = 1
    train_kv: bool = False
    sequential_forward: bool = False
    prefill: str = "iterative"
    force_nodiag: bool | None = None
    iteration_style: str | None = None

    def __post_init__(self, **kwargs):
        check_shape_fields(self.shape_fields())
        layout = self.layer_types if isinstance(self.layer_types, str) else None
        self.adopt_layout(layout)
        if self.sliding_window_layers is None:
            self.sliding_window_layers = []
        # Checked before transformers' own validators, so a bad field is a plain one-line ValueError.
        self.validate_lckv()
        self.layer_types = self.cache_layer_types
        super().__post_init__(**kwargs)
        check_shape_fields(self.shape_fields())  # again with the head dim and KV heads transformers derived

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """transformers' reading of a config source (``from_pretrained``), with one clear error for a local path that
        does not exist."""
        check_local_source(pretrained_model_name_or_path)
        return super().get_config_dict(pretrained_model_name_or_path, **kwargs)

    def shape_fields(self) -> dict:
        return {name: getattr(self, name, None) for name in POSITIVE_FIELDS}

    def adopt_layout(self, layout: str | None) -> None:
        """Take a ``layer_types`` string in this format's syntax and settle the semantics defaults."""
        if layout is not None:
            self.lckv_layer_types = layout
        if self.lckv_layer_types is None:
            self.lckv_layer_types = default_published_layout(self.num_hidden_layers)
        published = layout is not None
        if self.force_nodiag is None:
            self.force_nodiag = published
        if self.iteration_style is None:
            self.iteration_style = "previous" if published else "current"

    def validate_architecture(self):
        super().validate_architecture()
        self.validate_lckv()

    def validate_lckv(self) -> None:
        """Validate the LCKV fields; every error is a ValueError naming its field and the allowed values."""
        if self.kv_sources is None:
            num_types = len(self.lckv_layer_types.split("_"))
            if num_types != self.num_hidden_layers:
                raise ValueError(
                    f"layer_types: {num_types} entries for num_hidden_layers={self.num_hidden_layers}; "
                    "allowed is one entry per layer"
                )
        kv_sources = self.layer_kv_sources
        validate_kv_sources(kv_sources, self.num_hidden_layers, self.kv_sources_field)
        validate_window_layers(self.sliding_window_layers, self.num_hidden_layers)
        if self.sliding_window_layers:
            strict = strict_layers(kv_sources, self.force_nodiag)
            smallest = 2 if any(strict[i] for i in self.sliding_window_layers) else 1
            if not isinstance(self.sliding_window, int) or self.sliding_window < smallest:
                raise ValueError(
                    f"sliding_window: {self.sliding_window!r}; allowed are integers >= {smallest} when layers "
                    f"{self.sliding_window_layers} use a sliding window"
                    f"{' (a strict layer then still sees one earlier token)' if smallest == 2 else ''}"
                )
        if self.num_encoders < 0:
            raise ValueError(f"num_encoders: {self.num_encoders}; allowed values are integers >= 0")
        if not 0 <= self.num_trained_encoders <= self.num_encoders:
            raise ValueError(
                f"num_trained_encoders: {self.num_trained_encoders}; "
                f"allowed values are 0..num_encoders ({self.num_encoders})"
            )
        check_prefill_mode(self.prefill)
        if self.iteration_style not in ITERATION_STYLES:
            raise ValueError(
                f"iteration_style: {self.iteration_style!r}; "
                f"allowed values are {', '.join(map(repr, ITERATION_STYLES))}"
            )
        if self.iteration_style == "previous" and not self.force_nodiag:
            # A target reading the previous iteration's KV of its own token would need more iterations than tokens.
            raise ValueError(
                "iteration_style: 'previous' needs force_nodiag=True (the published code's combination); "
                "allowed with force_nodiag=False is 'current'"
            )

    def original_format(self) -> dict:
        """This config as the original code writes its ``config.json``: the layout string under the name
        ``layer_types``. ``save_pretrained`` keeps it as ``lckv_layer_types`` instead, because transformers' Trainer
        reads a checkpoint's ``config.json`` with its base config class, which refuses a string ``layer_types``."""
        fields = self.to_dict()
        layout = fields.pop("lckv_layer_types", None)
        if self.kv_sources is None and layout is not None:
            fields["layer_types"] = layout
        return fields

    @property
    def kv_sources_field(self) -> str:
        """How errors in the KV sources name what the user wrote: ``kv_sources`` (a published layout string parses
        into valid sources, or fails naming ``layer_types`` itself)."""
        return "kv_sources"

    @property
    def layer_kv_sources(self) -> list[int]:
        """The per-layer KV source list every part of the model works from."""
        if self.kv_sources is not None:
            return list(self.kv_sources)
        return parse_published_layout(self.lckv_layer_types, self.target_layer)

    @property
    def layer_strict(self) -> list[bool]:
        """Per layer: attends only to earlier positions (drops the diagonal)."""
        return strict_layers(self.layer_kv_sources, self.force_nodiag)

    @property
    def cache_layer_types(self) -> list[str]:
        """transformers' per-layer attention kinds, as its cache builders read them.

        A layer gets a window-bounded cache only where every reader of its KVs has the window and the layer is
        outside the cyclic block (whose staged KVs need the full cache layout).
        """
        windowed = window_cached_layers(
            self.layer_kv_sources, self.sliding_window_layers, layer_plan(self.layer_kv_sources).block
        )
        return ["sliding_attention" if w else "full_attention" for w in windowed]

    @property
    def kv_sharing_modes(self) -> list[str | None]:
        """transformers' per-layer sharing marks: layers reading another layer's KVs get a DummyLayer cache."""
        return [None if src == i else "reuse" for i, src in enumerate(self.layer_kv_sources)]

    @property
    def num_kv_layers(self) -> int:
        """Number of layers whose KVs are cached."""
        return sum(src == i for i, src in enumerate(self.layer_kv_sources))


@strict
class LckvLlamaConfig(OptLlamaConfig):
    r"""The same model in the ``lckv-llama`` format of the original code's later releases.

    layer_types (`str`): ``"0s_4_4_4_4_5s"``: entry ``i`` is the layer whose KVs layer ``i`` reads; ``s`` marks a
        sliding-window layer. Default: every layer reads its own KVs.
    forward_passes (`int`, defaults to 7), backward_passes (`int`, defaults to 2):
        ``m`` and ``b`` of the paper; stored as ``num_encoders = m + b - 1`` and ``num_trained_encoders = b - 1``.
    use_sequential (`bool`): stored as ``sequential_forward``.
    sliding_window (`int`, defaults to 4096), force_nodiag (`bool`, defaults to False).
    """

    model_type = "lckv-llama"
    # The fields the model reads that this format writes under other names (``to_dict`` leaves them out): a dict of
    # this format has no ``sequential_forward`` although the model reads it, so never test a field by ``to_dict()``.
    FORMAT_NAMES = {
        "num_encoders": "forward_passes and backward_passes", "num_trained_encoders": "backward_passes",
        "sequential_forward": "use_sequential", "kv_sources": "layer_types", "sliding_window_layers": "layer_types",
        "target_layer": "layer_types",
    }  # fmt: skip

    forward_passes: int | None = None
    backward_passes: int | None = None
    use_sequential: bool | None = None
    sliding_window: int | None = 4096

    def __setattr__(self, name: str, value) -> None:
        # This format's names of fields the model reads under other names: given to the constructor or set afterwards
        # (transformers' from_pretrained sets its keyword arguments on the config it built, as lm-eval's
        # ``use_sequential=True`` model argument does), each goes into the field the model reads and stays None:
        # num_encoders & co. are the truth.
        if name in ("forward_passes", "backward_passes", "use_sequential") and value is not None:
            self.adopt_format_field(name, value)
            value = None
        super().__setattr__(name, value)

    def adopt_format_field(self, name: str, value: int | bool) -> None:
        """``use_sequential`` -> ``sequential_forward``; ``forward_passes`` (m) or ``backward_passes`` (b) ->
        ``num_encoders = m + b - 1`` and ``num_trained_encoders = b - 1``, the other of the two as the config has it
        now (the defaults 7 and 2 before either is given)."""
        if name == "use_sequential":
            self.sequential_forward = value
            return
        forward = value if name == "forward_passes" else self.num_encoders - self.num_trained_encoders
        backward = value if name == "backward_passes" else self.num_trained_encoders + 1
        if backward < 1 or forward < 0:
            raise ValueError(
                f"forward_passes/backward_passes: {forward}/{backward}; "
                "allowed are forward_passes >= 0 and backward_passes >= 1"
            )
        self.num_encoders, self.num_trained_encoders = forward + backward - 1, backward - 1

    def adopt_layout(self, layout: str | None) -> None:
        layout = self.lckv_layer_types if layout is None else layout  # saved by save_pretrained under that name
        if layout is not None:
            self.kv_sources, self.sliding_window_layers = parse_lckv_layout(layout)
        elif self.kv_sources is None:
            self.kv_sources = list(range(self.num_hidden_layers))
        self.lckv_layer_types = None
        if self.force_nodiag is None:
            self.force_nodiag = False
        if self.iteration_style is None:
            self.iteration_style = "current"

    @property
    def kv_sources_field(self) -> str:
        """The layout string: an lckv-llama user writes ``layer_types``, never the internal ``kv_sources``."""
        return f"layer_types {lckv_layout(self.kv_sources, self.sliding_window_layers)!r}"

    def to_dict(self) -> dict:
        """The ``lckv-llama`` fields: the layout string (as ``lckv_layer_types``, see ``original_format``),
        ``forward_passes``/``backward_passes``, ``use_sequential``."""
        fields = super().to_dict()
        for name in self.FORMAT_NAMES:
            fields.pop(name, None)
        fields["lckv_layer_types"] = lckv_layout(self.layer_kv_sources, self.sliding_window_layers)
        fields["forward_passes"] = self.num_encoders - self.num_trained_encoders
        fields["backward_passes"] = self.num_trained_encoders + 1
        fields["use_sequential"] = self.sequential_forward
        return fields

    def original_format(self) -> dict:
        fields = self.to_dict()
        fields["layer_types"] = fields.pop("lckv_layer_types")
        return fields


__all__ = ["LckvLlamaConfig", "OptLlamaConfig"]
