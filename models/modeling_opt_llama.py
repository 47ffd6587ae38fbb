"""Layer-Condensed KV Cache Llama (Wu & Tu, ACL 2024): attention, decoder layer, model, causal LM.

Shapes: ``B`` batch, ``T`` current tokens, ``P`` cached tokens, ``S = P + T`` (or the static cache
length) keys, ``Hq``/``Hkv`` query/KV heads, ``D`` head dim, ``H`` hidden size.

Every layer ``i`` attends to the KVs of layer ``kv_sources[i]``. Layers reading a layer above them
(condensed layers) use the strict mask and the iterative parallel computation of the cyclic block
(see ``layer_plan``); decoding is the same computation with ``T == 1``, which is exact.
"""

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.import_utils import is_torchdynamo_compiling
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .cache_staging import committed_kv, staged_kv
from .configuration_opt_llama import LckvLlamaConfig, OptLlamaConfig
from .fast_decode import FastDecodeMixin
from .kernels import (
    QKV_GROUP,
    SPLIT_KV,
    FusedGroupsMixin,
    KernelSelection,
    PlainRotaryEmbedding,
    RotaryCacheMixin,
    SplitKvKernel,
    grouped_products,
    is_decode_mask,
    split_kv_mask,
)
from .layer_plan import iteration_schedule, layer_plan
from .masks import layer_mask_kinds, lckv_masks
from .sequential_prefill import builds_masks_per_step, sequential_prefill, uses_sequential_prefill
from .tensor_parallel import kv_heads_per_process

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class OptLlamaModelOutput(BaseModelOutputWithPast):
    """Adds ``kv_loss``: MSE between the last two iterations' target KVs (``train_kv``), else None."""

    kv_loss: torch.Tensor | None = None


@dataclass
class OptLlamaCausalLMOutput(CausalLMOutputWithPast):
    """Adds ``kv_loss`` (already included in ``loss``) so trainers can log it."""

    kv_loss: torch.Tensor | None = None


class OptLlamaAttention(RotaryCacheMixin, FusedGroupsMixin, nn.Module):
    """Multi-head attention whose keys/values come from layer ``kv_source``.

    A layer with its own KVs (``kv_source == layer_idx``) has ``k_proj``/``v_proj``; a condensed layer has
    none and attends to the KVs handed to it by the model. A strict layer (``config.layer_strict``) attends
    only to positions before the query; a window layer only to the last ``config.sliding_window`` positions.
    ``fused_projections.fuse_projections`` may give a layer with its own KVs one product for Q, K and V (``qkv_proj``).
    """

    fused_groups = QKV_GROUP

    def __init__(self, config: OptLlamaConfig, layer_idx: int, kernel_selection: KernelSelection):
        super().__init__()
        self.config = config
        self.kernel_selection = kernel_selection
        self.layer_idx = layer_idx
        self.kv_source = config.layer_kv_sources[layer_idx]
        self.has_own_kv = self.kv_source == layer_idx
        self.is_strict = config.layer_strict[layer_idx]
        self.sliding_window = config.sliding_window if layer_idx in config.sliding_window_layers else None
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, config.num_attention_heads * self.head_dim, bias=bias)
        if self.has_own_kv:
            self.k_proj = nn.Linear(hidden, config.num_key_value_heads * self.head_dim, bias=bias)
            self.v_proj = nn.Linear(hidden, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, hidden, bias=bias)
        self.qkv_proj: nn.Linear | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        given_keys: torch.Tensor | None,
        given_values: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        commit: bool = True,
        visible: torch.Tensor | None = None,
        kv_only: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, KV | None, KV | None]:
        """Attend from ``hidden_states`` ``(B, T, H)``.

        Args:
            given_keys, given_values: ``(B, Hkv, S, D)`` KVs to attend to: the source's for a condensed layer, the
                previous iteration's for a target under ``iteration_style="previous"``; None to attend to this
                layer's own KVs (cached ones and the current tokens').
            commit: write this layer's new KVs to ``cache`` now; otherwise stage them (iterative block).
            visible: ``(B, T, 1)``, 0 for queries that see no key under the strict mask.
            kv_only: compute this layer's KVs and stop (no queries, no attention; the output is None).

        Returns:
            output ``(B, T, H)``; attention weights ``(B, Hq, T, S)`` where the backend returns them; this layer's
            ``(B, Hkv, S, D)`` KVs as its readers see them (cached + current, None for condensed layers); its new
            ``(B, Hkv, T, D)`` KVs of the current tokens (None for condensed layers).
        """
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        cos, sin = position_embeddings
        implementation = self.config._attn_implementation
        dropout = 0.0 if not self.training else self.attention_dropout
        query_states, key_states, value_states = (
            None if product is None else product.view(hidden_shape).transpose(1, 2)
            for product in self._project(hidden_states, kv_only)
        )

        new_kv = own_kv = None
        if self.has_own_kv:
            written = None
            if given_keys is None and commit and query_states is not None:
                written = self.rotate_into_cache(cache, (query_states, key_states, value_states), position_embeddings)
            if written is not None:  # rotated and committed to the cache by one kernel (kernels/rotary_cache.py)
                query_states, key_states, given_keys, given_values = written
                own_kv = (given_keys, given_values)
            else:
                query_states, key_states = self.kernel_selection.apply_rotary_pos_emb(
                    query_states, key_states, cos, sin
                )
                if given_keys is None:
                    own_kv = given_keys, given_values = self._store(key_states, value_states, cache, commit)
            new_kv = (key_states, value_states)
        # The split-KV decode kernel zeroes a query that sees no key, and rotates a condensed layer's queries itself.
        kernel_decodes = not kv_only and self.kernel_selection.split_kv_decodes(
            implementation, query_states, given_keys, attention_mask, dropout
        )
        if not self.has_own_kv:
            if kernel_decodes:  # no rotation kernel of its own
                kwargs["query_rotation"] = position_embeddings
            else:
                query_states, _ = self.kernel_selection.apply_rotary_pos_emb(query_states, None, cos, sin)

        attn_output = attn_weights = None
        if not kv_only:
            attn_output, attn_weights = self.kernel_selection.attention_interface(implementation)(
                self,
                query_states,
                given_keys,
                given_values,
                attention_mask,
                dropout=dropout,
                scaling=self.scaling,
                **kwargs,
            )
            attn_output = attn_output.reshape(*input_shape, -1).contiguous()
            if self.is_strict and not kernel_decodes:
                # Eager softmax over an all-masked row is uniform, not zero: zero it for every other backend.
                attn_output = attn_output * visible.to(attn_output.dtype)
                if attn_weights is not None:
                    attn_weights = attn_weights * visible[:, None].to(attn_weights.dtype)
            attn_output = self.o_proj(attn_output)
        if self.has_own_kv and own_kv is None:
            # Stored only after the read: a static cache stages into the very slots the given KVs view.
            own_kv = self._store(*new_kv, cache, commit)
        return attn_output, attn_weights, own_kv, new_kv

    def _project(
        self, hidden_states: torch.Tensor, kv_only: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Queries (None with ``kv_only``), keys and values (None for a condensed layer) of ``hidden_states``
        ``(B, T, H)``, each ``(B, T, heads * D)``: one product where Q, K and V are fused and all three are wanted."""
        if not self.has_own_kv:
            return None if kv_only else self.q_proj(hidden_states), None, None
        if kv_only:
            return None, self.k_proj(hidden_states), self.v_proj(hidden_states)
        return grouped_products(hidden_states, self.qkv_proj, (self.q_proj, self.k_proj, self.v_proj))

    def _store(self, keys: torch.Tensor, values: torch.Tensor, cache: Cache | None, commit: bool) -> KV:
        """Commit (``cache.update``) or stage this layer's new KVs; returns cached + new ``(B, Hkv, S, D)``."""
        if cache is not None and commit:
            return cache.update(keys, values, self.layer_idx)
        return staged_kv(cache, self.layer_idx, keys, values)


class OptLlamaDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm attention + MLP block, as in Llama; attention reads the KVs it is given."""

    def __init__(self, config: OptLlamaConfig, layer_idx: int, kernel_selection: KernelSelection):
        super().__init__()
        self.self_attn = OptLlamaAttention(config, layer_idx, kernel_selection)
        self.mlp = kernel_selection.swiglu_mlp(config)
        self.input_layernorm = kernel_selection.rms_norm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = kernel_selection.rms_norm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        given_keys: torch.Tensor | None = None,
        given_values: torch.Tensor | None = None,
        kv_only: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, KV | None, KV | None]:
        """``hidden_states`` ``(B, T, H)`` -> same shape, plus the attention's weights and KVs (see
        ``OptLlamaAttention``).

        With ``kv_only`` the layer only computes its KVs and returns ``hidden_states`` unchanged.
        """
        attn_output, attn_weights, own_kv, new_kv = self.self_attn(
            self.input_layernorm(hidden_states), given_keys, given_values, kv_only=kv_only, **kwargs
        )
        if kv_only:
            return hidden_states, None, own_kv, new_kv
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, attn_weights, own_kv, new_kv


class LayerOutputTap(nn.Module):
    """Identity the model calls once per layer with that layer's final input, output and attention weights, so
    transformers' output capturing records exactly those: the iterations call the block's layers several times, and
    only the final call of each layer counts. As for a Llama layer, the first call's input (the embeddings) is recorded
    as the initial hidden state."""

    def forward(
        self, layer_input: torch.Tensor, hidden_states: torch.Tensor, attn_weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return hidden_states, attn_weights


class OptLlamaPreTrainedModel(PreTrainedModel):
    config_class = OptLlamaConfig
    config: OptLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OptLlamaDecoderLayer"]
    # transformers' flash-attention mask path drops the strict (diagonal) mask of condensed layers, so
    # "flash_attention_2" is refused; LCKV_FLASH_ATTN runs flash kernels through models/kernels instead.
    _supports_flash_attn = False
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    # The model calls `layer_outputs` once per layer with its final input and output (see LayerOutputTap).
    _can_record_outputs = {
        "hidden_states": OutputRecorder(LayerOutputTap, index=0),
        "attentions": OutputRecorder(LayerOutputTap, index=1),
    }


class LayerStackOutput(NamedTuple):
    """What ``OptLlamaModel.forward_layers`` returns: the normed last hidden states ``(B, T, H)``, the ``kv_loss`` of
    the iterative block (``train_kv`` in training, else None), and the reported layer outputs (None unless asked)."""

    last_hidden_state: torch.Tensor
    kv_loss: torch.Tensor | None
    reported: list | None


@dataclass
class StackPass:
    """What one pass through the layer stack shares, and the KVs it carries from layer to layer.

    ``kv_store[j]`` holds layer ``j``'s KVs as its readers see them (cached + current tokens). ``reported`` collects,
    when the caller asked for hidden states or attentions, each layer's final ``(input, output, attention weights)``.
    """

    layers: nn.ModuleList
    kv_sources: list[int]
    mask_kinds: list[str]
    masks: dict
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    cache: Cache | None
    layer_kwargs: dict
    visible: torch.Tensor | None = None  # the masks' "visible" (B, T, 1), in the hidden states' dtype
    split_kv: SplitKvKernel | None = None  # decoding one token per row through sdpa_split_kv's kernel: its mask views
    kv_store: dict = field(default_factory=dict)
    shared_masks: dict = field(default_factory=dict)  # mask kind -> its split_kv_mask, shared by the kind's layers
    reported: list | None = None

    def run(
        self, layer_idx: int, hidden: torch.Tensor, commit: bool, kv_only: bool = False, attend_carried: bool = False
    ):
        """Run layer ``layer_idx`` on ``hidden`` ``(B, T, H)``; returns the new hidden states and its new KVs (or None).

        ``attend_carried``: the layer's queries read its KVs carried in ``kv_store`` (the previous iteration's)
        instead of the ones it computes now.
        """
        source = self.kv_sources[layer_idx]
        given = self.kv_store[source] if source != layer_idx or attend_carried else (None, None)
        kind = self.mask_kinds[layer_idx]
        layer_input = hidden
        hidden, attn_weights, own_kv, new_kv = self.layers[layer_idx](
            hidden,
            *given,
            position_embeddings=self.position_embeddings,
            attention_mask=self.masks[kind],
            cache=self.cache,
            commit=commit,
            visible=self.visible,
            kv_only=kv_only,
            **self.shared_mask_of(kind, hidden.shape[0]),
            **self.layer_kwargs,
        )
        if own_kv is not None:
            self.kv_store[layer_idx] = own_kv
        if self.reported is not None and not kv_only:
            self.reported.append((layer_input, hidden, attn_weights))
        return hidden, new_kv

    def shared_mask_of(self, kind: str, batch: int) -> dict:
        """``{"shared_mask": ...}`` for the split-KV kernel of a layer with mask kind ``kind`` (a bool ``(B or 1, 1, 1,
        S)`` mask): its rows and their key lengths, made once by the kernel's ``view_mask`` op for all the kind's
        layers. Many layers share a mask; a compiled TinyLlama LCKV step had otherwise made the rows in each of 18
        layers (one kernel each). ``{}`` otherwise."""
        mask = self.masks[kind]
        if self.split_kv is None or not is_decode_mask(mask):
            return {}
        if kind not in self.shared_masks:
            self.shared_masks[kind] = split_kv_mask(mask, batch, mask.shape[-1], mask.device, self.split_kv)
        return {"shared_mask": self.shared_masks[kind]}


class OptLlamaModel(OptLlamaPreTrainedModel):
    """The decoder stack. ``kernel_selection``: the kernels it runs (``models.kernels.KernelSelection``); default: the
    ones the ``LCKV_*`` flags of the environment ask for now. The model and every layer keep it for their lifetime."""

    def __init__(self, config: OptLlamaConfig, kernel_selection: KernelSelection | None = None):
        super().__init__(config)
        self.kernel_selection = kernel_selection if kernel_selection is not None else KernelSelection.from_environ()
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [OptLlamaDecoderLayer(config, i, self.kernel_selection) for i in range(config.num_hidden_layers)]
        )
        self.norm = self.kernel_selection.rms_norm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = PlainRotaryEmbedding(config=config)
        self.layer_outputs = LayerOutputTap()
        self.kv_sources = config.layer_kv_sources
        self.plan = layer_plan(self.kv_sources)
        self.mask_kinds, self.mask_sizing = layer_mask_kinds(
            self.kv_sources, config.layer_strict, config.sliding_window_layers, config.cache_layer_types
        )
        self.gradient_checkpointing = False
        # The static cache of the last sequential forward without cached tokens (models.scratch_cache.ScratchCache)
        self.scratch_cache = None
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> OptLlamaModelOutput:
        """``input_ids`` ``(B, T)`` (or ``inputs_embeds`` ``(B, T, H)``) -> ``last_hidden_state`` ``(B, T, H)``.

        ``output_hidden_states`` gives ``num_hidden_layers + 1`` tensors (the embeddings, then each layer's final
        output, the last one normed); ``output_attentions`` the ``(B, Hq, T, S)`` weights (eager attention only).
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("input_ids / inputs_embeds: pass exactly one of them")
        if inputs_embeds is None:
            check_input_ids(input_ids, self.embed_tokens.num_embeddings)
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        query_length = inputs_embeds.shape[1]
        streaming = hasattr(cache, "positions_for")
        if streaming:
            # Sink + window cache (models/cache_streaming.py): it evicts to make room for the new tokens and gives them
            # their cache slots as positions, which it keeps below the limit, so the stream may run on without one.
            position_ids, attention_mask = cache.positions_for(query_length, attention_mask, inputs_embeds.device)
        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(query_length, device=inputs_embeds.device) + past_length).unsqueeze(0)
        if not streaming:
            self.check_positions(past_length + query_length)

        sequential = (
            query_length > 1 and not self.training and uses_sequential_prefill(self.config, inputs_embeds, cache)
        )
        reporting = self._reporting(kwargs, sequential)
        kv_loss = None
        if sequential:
            hidden, reported = sequential_prefill(
                self, inputs_embeds, attention_mask, position_ids, cache, reporting, **kwargs
            )
        else:
            # A dict: precomputed by `generate` (static cache), see create_masks_for_generate.
            if isinstance(attention_mask, dict):
                masks = attention_mask
            else:
                masks = lckv_masks(
                    self.config,
                    inputs_embeds,
                    attention_mask,
                    cache,
                    position_ids,
                    past_length,
                    self.mask_sizing,
                    strict_as_causal=self.kernel_selection.strict_as_causal,
                )
            hidden, kv_loss, reported = self.forward_layers(
                inputs_embeds, masks, position_ids, cache, reporting, **kwargs
            )
        for layer_input, layer_output, attn_weights in reported or ():
            self.layer_outputs(layer_input, layer_output, attn_weights)
        return OptLlamaModelOutput(last_hidden_state=hidden, cache=cache, kv_loss=kv_loss)

    def _reporting(self, kwargs: dict, sequential: bool) -> bool:
        """Whether the caller asked for hidden states or attentions; refuses attentions this forward cannot return."""
        wants = {
            name: kwargs.get(f"output_{name}", getattr(self.config, f"output_{name}", False))
            for name in ("hidden_states", "attentions")
        }
        if wants["attentions"]:
            implementation = self.config._attn_implementation
            if implementation != "eager" or self.kernel_selection.strict_as_causal:
                raise ValueError(
                    f"output_attentions: attn_implementation={implementation!r}"
                    f"{' with LCKV_FLASH_ATTN' if implementation == 'eager' else ''} "
                    "returns no attention weights; allowed is attn_implementation='eager' without LCKV_FLASH_ATTN"
                )
            if sequential:
                raise ValueError(
                    "output_attentions: not available from a token-by-token forward "
                    "(sequential_forward or a sequential "
                    "prefill: each token attends to a different number of keys); allowed with the iterative forward"
                )
        return bool(wants["hidden_states"] or wants["attentions"])

    def check_positions(self, total_length: int | torch.Tensor) -> None:
        """A one-line ValueError when ``total_length`` (cached + new tokens) exceeds ``max_position_embeddings``."""
        if is_torchdynamo_compiling():  # a static cache's length is a tensor; checked eagerly (prefill), not per step
            return
        limit = self.config.max_position_embeddings
        if total_length > limit:
            raise ValueError(
                f"sequence length: {total_length} tokens exceed max_position_embeddings={limit}; "
                "use a shorter input or the streaming cache (run_streaming.py)"
            )

    def forward_layers(
        self,
        inputs_embeds: torch.Tensor,
        masks: dict,
        position_ids: torch.Tensor,
        cache: Cache | None,
        reporting: bool = False,
        layers: range | None = None,
        **kwargs,
    ) -> "LayerStackOutput":
        """One pass of ``inputs_embeds`` ``(B, T, H)`` through the layer stack (the iterative block included),
        committing the new KVs to ``cache``; the masks are ``lckv_masks``' (or ``generate``'s precomputed ones) for
        these tokens.

        This is the whole model below the embeddings and above the caller's bookkeeping: ``forward`` runs it once over
        all tokens, the sequential prefill once per token. ``reporting``: collect each layer's final
        ``(input, output, attention weights)`` for output capturing.

        ``layers``: run only these consecutive layers (default all), the cyclic block whole or not at all; the input
        is then the hidden states entering the first of them, and the output leaves the last of them, normed only
        where that is the top layer. A layer reading a source outside them reads what the source committed to
        ``cache`` (a static cache). The sequential prefill runs the block token by token and the layers below and
        above it over many tokens at once (``models.sequential_prefill``).
        """
        plan = self.plan
        layers = range(len(self.layers)) if layers is None else layers
        if plan.is_iterative and (plan.block[0] in layers) != (plan.block[-1] in layers):
            raise ValueError(
                f"layers: {layers} cuts the cyclic block {plan.block}; allowed are runs that hold it whole"
            )
        visible = masks.get("visible")
        stack = StackPass(
            layers=self.layers,
            kv_sources=self.kv_sources,
            mask_kinds=self.mask_kinds,
            masks=masks,
            position_embeddings=self.rotary_emb(inputs_embeds, position_ids=position_ids),
            cache=cache,
            layer_kwargs=kwargs,
            # Cast once per forward, not in each of the (many, under iterations) strict layer runs.
            visible=None if visible is None else visible.to(inputs_embeds.dtype),
            split_kv=self.kernel_selection.split_kv
            if inputs_embeds.shape[1] == 1 and self.config._attn_implementation == SPLIT_KV
            else None,
            reported=[] if reporting else None,
        )
        for source in {self.kv_sources[i] for i in layers} - set(layers):
            stack.kv_store[source] = committed_kv(cache, source)
        hidden = inputs_embeds
        for layer_idx in plan.below:
            if layer_idx in layers:
                hidden, _ = stack.run(layer_idx, hidden, commit=True)
        kv_loss = None
        if plan.is_iterative and plan.block[0] in layers:
            hidden, kv_loss = self._run_block(hidden, stack)
        for layer_idx in plan.above:
            if layer_idx in layers:
                hidden, _ = stack.run(layer_idx, hidden, commit=True)
        # capture_outputs reports the normed last state in place of the last layer's output, as for Llama.
        output = self.norm(hidden) if layers.stop == len(self.layers) else hidden
        return LayerStackOutput(output, kv_loss, stack.reported)

    def _run_block(self, block_input: torch.Tensor, stack: StackPass):
        """Iterate the cyclic block; the carried sources start from zero KVs (docs/design.md section 5).

        Under ``iteration_style="previous"`` (the published code) the carried sources' own queries also read the
        previous iteration's KVs; under ``"current"`` they read the KVs they compute in this iteration.

        ``self.training`` decides the schedule and ``kv_loss`` (as dropout and the fused loss): evaluation computes the
        same thing with or without ``torch.no_grad``. Whether autograd records is only asked for what it records.
        """
        config = self.config
        training = self.training
        records_graph = torch.is_grad_enabled()
        num_iterations, num_trained = iteration_schedule(
            config.num_encoders + 1, config.num_trained_encoders + 1, None if training else block_input.shape[1]
        )
        batch_size, query_length = block_input.shape[:2]
        carried = self.plan.carried_sources
        zeros = block_input.new_zeros(batch_size, kv_heads_per_process(self), query_length, config.head_dim)
        for source in carried:
            stack.kv_store[source] = staged_kv(stack.cache, source, zeros, zeros)
        attend_carried = config.iteration_style == "previous"

        # The block ends at its highest target; before the last iteration only that target's KVs go on to the
        # next one, so it skips its queries, attention and MLP there. Only the last iteration reports outputs.
        last_layer = self.plan.block[-1]
        reported, stack.reported = stack.reported, None
        previous_kvs, new_kvs = {}, {}
        for iteration in range(num_iterations):
            final = iteration == num_iterations - 1
            if final:
                stack.reported = reported
            with torch.set_grad_enabled(records_graph and iteration >= num_iterations - num_trained):
                hidden = block_input
                previous_kvs, new_kvs = new_kvs, {}
                for layer_idx in self.plan.block:
                    kv_only = not final and layer_idx == last_layer
                    # The last iteration commits each layer's KVs as it computes them: the same values a commit after
                    # the block would write, but a second write of the staged slots there made inductor copy the whole
                    # cache layer in a compiled step (docs/design.md section 6).
                    hidden, new_kv = stack.run(
                        layer_idx,
                        hidden,
                        commit=final,
                        kv_only=kv_only,
                        attend_carried=attend_carried and layer_idx in carried,
                    )
                    if new_kv is not None:
                        new_kvs[layer_idx] = new_kv

        kv_loss = None
        if config.train_kv and training and previous_kvs:  # a training regulariser: evaluation loss stays the LM loss
            kv_loss = sum(
                nn.functional.mse_loss(new_kvs[s][0], previous_kvs[s][0])
                + nn.functional.mse_loss(new_kvs[s][1], previous_kvs[s][1])
                for s in carried
            ) / len(carried)
        return hidden, kv_loss


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """A one-line ValueError for empty ``input_ids`` or ids outside ``[0, vocab_size)`` (checked outside
    compilation)."""
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(
            f"input_ids: shape {tuple(input_ids.shape)}; allowed are 2D (batch >= 1, length >= 1) tensors of token ids"
        )
    if is_torchdynamo_compiling() or input_ids.device.type == "meta":
        return
    outside = (input_ids < 0) | (input_ids >= vocab_size)
    if outside.any():  # one device-to-host read per forward
        raise ValueError(
            f"input_ids: token id {input_ids[outside][0].item()} is outside the vocabulary; "
            f"allowed are ids 0..{vocab_size - 1}"
        )


def token_weighted(kv_loss: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None, ignore_index: int = -100):
    """Weigh this batch's mean ``kv_loss`` like its token-summed LM loss.

    With ``num_items_in_batch`` (the Trainer's token count over all devices and accumulation steps) the LM
    loss is a sum over that global count, which the Trainer neither averages over accumulation steps nor
    divides by the number of processes. Scaling by this batch's share of the tokens keeps ``kv_loss`` a
    token-weighted mean over the whole global batch instead of counting it once per process and step.
    """
    if num_items_in_batch is None:
        return kv_loss
    local_items = (labels[..., 1:] != ignore_index).sum()
    return kv_loss * local_items.to(kv_loss.device) / num_items_in_batch


class OptLlamaForCausalLM(FastDecodeMixin, OptLlamaPreTrainedModel, GenerationMixin):
    """Greedy search and sampling with a static cache run the captured decode loop (``models.fast_decode``)."""

    # The forward builds, from a 2D padding mask, the masks create_masks_for_generate builds (both call lckv_masks).
    forward_builds_generate_masks = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Tensor parallelism (tp_plan="auto"): the vocabulary split over the processes, logits gathered. The layers' plan
    # is the config's base_model_tp_plan (Llama's: q/k/v/o and the MLP by heads and features; condensed layers have no
    # k/v to shard, they read their source's share of the KV heads).
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def create_masks_for_generate(
        self, config, inputs_embeds, attention_mask, cache, position_ids, **kwargs
    ) -> dict | torch.Tensor | None:
        """``generate`` with a static cache builds the masks outside the compiled step, sized to the cache (no
        recompilation per step); ``attention_mask`` is the 2D padding mask ``(B, P + T)`` or None. A prompt that the
        sequential prefill runs with masks built per step (a layer reads a window-only cache) keeps the padding mask:
        its steps are built from it, as for a dynamic cache."""
        query_length = inputs_embeds.shape[1]
        if (
            query_length > 1
            and builds_masks_per_step(self.model, cache)
            and uses_sequential_prefill(config, inputs_embeds, cache)
        ):
            return attention_mask
        past_length = attention_mask.shape[-1] - query_length if attention_mask is not None else cache.get_seq_length()
        return lckv_masks(
            config,
            inputs_embeds,
            attention_mask,
            cache,
            position_ids,
            past_length,
            self.model.mask_sizing,
            strict_as_causal=self.model.kernel_selection.strict_as_causal,
        )

    def __init__(self, config: OptLlamaConfig, kernel_selection: KernelSelection | None = None):
        super().__init__(config)
        self.model = OptLlamaModel(config, kernel_selection)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> OptLlamaCausalLMOutput:
        """Logits ``(B, T', vocab)`` for the last ``logits_to_keep`` positions (all when 0); ``loss`` with
        ``labels``."""
        outputs: OptLlamaModelOutput = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = loss = None
        fused_loss = self.model.kernel_selection.fused_linear_cross_entropy
        if labels is not None and self.training and fused_loss is not None:
            # The loss straight from the hidden states: the (B, T', vocab) logits are never materialised.
            loss = fused_loss(hidden_states, self.lm_head.weight, labels, **kwargs)
        else:
            logits = self.lm_head(hidden_states)
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if loss is not None and outputs.kv_loss is not None:
            loss = loss + token_weighted(outputs.kv_loss, labels, kwargs.get("num_items_in_batch"))
        return OptLlamaCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            kv_loss=outputs.kv_loss,
        )


class LckvLlamaForCausalLM(OptLlamaForCausalLM):
    """The same model, registered for configs in the ``lckv-llama`` format (transformers' Auto classes key models by
    config class); it saves in that format."""

    config_class = LckvLlamaConfig


class LckvLlamaModel(OptLlamaModel):
    config_class = LckvLlamaConfig


__all__ = ["LckvLlamaForCausalLM", "LckvLlamaModel", "OptLlamaForCausalLM", "OptLlamaModel", "OptLlamaPreTrainedModel"]
