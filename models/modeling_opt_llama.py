"""Layer-Condensed KV Cache Llama (Wu & Tu, ACL 2024): attention, decoder layer, model, causal LM.

Shapes: ``B`` batch, ``T`` current tokens, ``P`` cached tokens, ``S = P + T`` (or the static cache
length) keys, ``Hq``/``Hkv`` query/KV heads, ``D`` head dim, ``H`` hidden size.

Every layer ``i`` attends to the KVs of layer ``kv_sources[i]``. Layers reading a layer above them
(condensed layers) use the strict mask and the iterative parallel computation of the cyclic block
(see ``layer_plan``); decoding is the same computation with ``T == 1``, which is exact.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.import_utils import is_torchdynamo_compiling

from . import kernels
from .cache_staging import staged_kv
from .configuration_opt_llama import OptLlamaConfig
from .layer_plan import iteration_schedule, layer_plan, reads_from_above
from .masks import build_masks, has_visible_key
from .sequential_prefill import sequential_prefill, uses_sequential_prefill

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class OptLlamaModelOutput(BaseModelOutputWithPast):
    """Adds ``kv_loss``: MSE between the last two iterations' target KVs (``train_kv``), else None."""

    kv_loss: torch.Tensor | None = None


@dataclass
class OptLlamaCausalLMOutput(CausalLMOutputWithPast):
    """Adds ``kv_loss`` (already included in ``loss``) so trainers can log it."""

    kv_loss: torch.Tensor | None = None


class OptLlamaAttention(nn.Module):
    """Multi-head attention whose keys/values come from layer ``kv_source``.

    A layer with its own KVs (``kv_source == layer_idx``) has ``k_proj``/``v_proj``; a condensed layer has
    none and attends to the KVs handed to it by the model.
    """

    def __init__(self, config: OptLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        kv_sources = config.layer_kv_sources
        self.kv_source = kv_sources[layer_idx]
        self.has_own_kv = self.kv_source == layer_idx
        self.is_strict = reads_from_above(kv_sources, layer_idx)
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

    def forward(
        self,
        hidden_states: torch.Tensor,
        source_keys: torch.Tensor | None,
        source_values: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        commit: bool = True,
        visible: torch.Tensor | None = None,
        kv_only: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor | None, KV, KV | None]:
        """Attend from ``hidden_states`` ``(B, T, H)``.

        Args:
            source_keys, source_values: ``(B, Hkv, S, D)`` KVs of ``kv_source`` (None for own-KV layers).
            commit: write this layer's new KVs to ``cache`` now; otherwise stage them (iterative block).
            visible: ``(B, T, 1)``, 0 for queries that see no key under the strict mask.
            kv_only: compute this layer's KVs and stop (no queries, no attention; the output is None).

        Returns:
            output ``(B, T, H)``; the ``(B, Hkv, S, D)`` KVs attended to; the layer's new ``(B, Hkv, T, D)``
            KVs of the current tokens (None for condensed layers).
        """
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        cos, sin = position_embeddings
        query_states = None if kv_only else self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        new_kv = None
        if self.has_own_kv:
            key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            query_states, key_states = kernels.apply_rotary_pos_emb(query_states, key_states, cos, sin)
            new_kv = (key_states, value_states)
            if cache is not None and commit:
                source_keys, source_values = cache.update(key_states, value_states, self.layer_idx)
            else:
                source_keys, source_values = staged_kv(cache, self.layer_idx, key_states, value_states)
        else:
            query_states, _ = kernels.apply_rotary_pos_emb(query_states, None, cos, sin)
        if kv_only:
            return None, (source_keys, source_values), new_kv

        attention_interface = kernels.attention_interface(self.config._attn_implementation)
        attn_output, _ = attention_interface(
            self,
            query_states,
            source_keys,
            source_values,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        if self.is_strict:
            # Eager softmax over an all-masked row is uniform, not zero: zero it for every backend.
            attn_output = attn_output * visible.to(attn_output.dtype)
        attn_output = self.o_proj(attn_output)
        return attn_output, (source_keys, source_values), new_kv


class OptLlamaDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm attention + MLP block, as in Llama; attention reads the KVs it is given."""

    def __init__(self, config: OptLlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = OptLlamaAttention(config, layer_idx)
        self.mlp = kernels.SwiGLUMLP(config)
        self.input_layernorm = kernels.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = kernels.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        source_keys: torch.Tensor | None = None,
        source_values: torch.Tensor | None = None,
        kv_only: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, KV, KV | None]:
        """``hidden_states`` ``(B, T, H)`` -> same shape, plus the attention's KVs (see ``OptLlamaAttention``).

        With ``kv_only`` the layer only computes its KVs and returns ``hidden_states`` unchanged.
        """
        attn_output, attended_kv, new_kv = self.self_attn(
            self.input_layernorm(hidden_states), source_keys, source_values, kv_only=kv_only, **kwargs
        )
        if kv_only:
            return hidden_states, attended_kv, new_kv
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, attended_kv, new_kv


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


class OptLlamaModel(OptLlamaPreTrainedModel):
    def __init__(self, config: OptLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([OptLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = kernels.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.kv_sources = config.layer_kv_sources
        self.plan = layer_plan(self.kv_sources)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
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
        """``input_ids`` ``(B, T)`` (or ``inputs_embeds`` ``(B, T, H)``) -> ``last_hidden_state`` ``(B, T, H)``."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("input_ids / inputs_embeds: pass exactly one of them")
        if inputs_embeds is None:
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
            self._check_positions(past_length + query_length)

        if query_length > 1 and not torch.is_grad_enabled() and uses_sequential_prefill(self.config, inputs_embeds.shape[0], query_length, cache):
            return sequential_prefill(self, inputs_embeds, attention_mask, position_ids, cache, use_cache, **kwargs)
        return self._forward_parallel(inputs_embeds, attention_mask, position_ids, cache, past_length, **kwargs)

    def _check_positions(self, total_length: int | torch.Tensor) -> None:
        if is_torchdynamo_compiling():  # a static cache's length is a tensor; checked eagerly (prefill), not per step
            return
        limit = self.config.max_position_embeddings
        if total_length > limit:
            raise ValueError(
                f"sequence length: {total_length} tokens exceed max_position_embeddings={limit}; "
                "use a shorter input or the streaming cache (run_streaming.py)"
            )

    def _forward_parallel(self, inputs_embeds, attention_mask, position_ids, cache, past_length, **kwargs):
        plan = self.plan
        batch_size, query_length = inputs_embeds.shape[:2]
        if isinstance(attention_mask, dict):  # precomputed by `generate` (static cache), see create_masks_for_generate
            masks = attention_mask
        else:
            masks = lckv_masks(self.config, inputs_embeds, attention_mask, cache, position_ids, past_length, plan.is_iterative)
        visible = masks.get("visible")
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)

        # No annotations: evaluating `dict[int, KV]` at each call breaks torch.compile's graph (decode step).
        def run_layer(layer_idx, hidden, kv_store, commit, kv_only=False):
            source = self.kv_sources[layer_idx]
            source_kv = kv_store[source] if source != layer_idx else (None, None)
            mask = masks["strict" if reads_from_above(self.kv_sources, layer_idx) else "causal"]
            hidden, attended_kv, new_kv = self.layers[layer_idx](
                hidden,
                *source_kv,
                position_embeddings=position_embeddings,
                attention_mask=mask,
                cache=cache,
                commit=commit,
                visible=visible,
                kv_only=kv_only,
                **kwargs,
            )
            if new_kv is not None:
                kv_store[layer_idx] = attended_kv
            return hidden, new_kv

        kv_store: dict[int, KV] = {}
        hidden = inputs_embeds
        for layer_idx in plan.below:
            hidden, _ = run_layer(layer_idx, hidden, kv_store, commit=True)
        kv_loss = None
        if plan.is_iterative:
            hidden, kv_loss = self._run_block(hidden, kv_store, run_layer, cache)
        for layer_idx in plan.above:
            hidden, _ = run_layer(layer_idx, hidden, kv_store, commit=True)
        return OptLlamaModelOutput(last_hidden_state=self.norm(hidden), cache=cache, kv_loss=kv_loss)

    def _run_block(self, block_input, kv_store, run_layer, cache):
        """Iterate the cyclic block; the carried sources start from zero KVs (DESIGN.md section 3)."""
        config = self.config
        training = torch.is_grad_enabled()
        num_iterations, num_trained = iteration_schedule(
            config.num_encoders + 1, config.num_trained_encoders + 1, None if training else block_input.shape[1]
        )
        batch_size, query_length = block_input.shape[:2]
        zeros = block_input.new_zeros(batch_size, config.num_key_value_heads, query_length, config.head_dim)
        for source in self.plan.carried_sources:
            kv_store[source] = staged_kv(cache, source, zeros, zeros)

        # The block ends at its highest target; before the last iteration only that target's KVs go on to the
        # next one, so it skips its queries, attention and MLP there.
        last_layer = self.plan.block[-1]
        previous_kvs, new_kvs = {}, {}
        for iteration in range(num_iterations):
            final = iteration == num_iterations - 1
            with torch.set_grad_enabled(training and iteration >= num_iterations - num_trained):
                hidden = block_input
                previous_kvs, new_kvs = new_kvs, {}
                for layer_idx in self.plan.block:
                    kv_only = not final and layer_idx == last_layer
                    hidden, new_kv = run_layer(layer_idx, hidden, kv_store, commit=False, kv_only=kv_only)
                    if new_kv is not None:
                        new_kvs[layer_idx] = new_kv

        if cache is not None:
            for layer_idx, (keys, values) in new_kvs.items():
                cache.update(keys, values, layer_idx)
        kv_loss = None
        if config.train_kv and training and previous_kvs:  # a training regulariser: evaluation loss stays the LM loss
            kv_loss = sum(
                nn.functional.mse_loss(new_kvs[s][0], previous_kvs[s][0])
                + nn.functional.mse_loss(new_kvs[s][1], previous_kvs[s][1])
                for s in self.plan.carried_sources
            ) / len(self.plan.carried_sources)
        return hidden, kv_loss


def lckv_masks(
    config, inputs_embeds, attention_mask, cache, position_ids, past_length, need_strict: bool
) -> dict[str, torch.Tensor | None]:
    """The causal and (``need_strict``: some layer reads from above) strict masks and ``visible`` ``(B, T, 1)``."""
    batch_size, query_length = inputs_embeds.shape[:2]
    masks = build_masks(config, inputs_embeds, attention_mask, cache, position_ids, need_strict)
    if need_strict:
        masks["visible"] = has_visible_key(attention_mask, past_length, query_length, batch_size, inputs_embeds.device)
    return masks


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


class OptLlamaForCausalLM(OptLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, cache, position_ids, **kwargs) -> dict:
        """``generate`` with a static cache builds the masks outside the compiled step, sized to the cache (no
        recompilation per step); ``attention_mask`` is the 2D padding mask ``(B, P + T)`` or None."""
        query_length = inputs_embeds.shape[1]
        past_length = attention_mask.shape[-1] - query_length if attention_mask is not None else cache.get_seq_length()
        return lckv_masks(
            config, inputs_embeds, attention_mask, cache, position_ids, past_length, self.model.plan.is_iterative
        )

    def __init__(self, config: OptLlamaConfig):
        super().__init__(config)
        self.model = OptLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
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
        """Logits ``(B, T', vocab)`` for the last ``logits_to_keep`` positions (all when 0); ``loss`` with ``labels``."""
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
        if labels is not None and self.training and kernels.fused_linear_cross_entropy is not None:
            # The loss straight from the hidden states: the (B, T', vocab) logits are never materialised.
            loss = kernels.fused_linear_cross_entropy(hidden_states, self.lm_head.weight, labels, **kwargs)
        else:
            logits = self.lm_head(hidden_states)
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if loss is not None and outputs.kv_loss is not None:
            loss = loss + token_weighted(outputs.kv_loss, labels, kwargs.get("num_items_in_batch"))
        return OptLlamaCausalLMOutput(
            loss=loss, logits=logits, cache=outputs.cache, kv_loss=outputs.kv_loss
        )


__all__ = ["OptLlamaForCausalLM", "OptLlamaModel", "OptLlamaPreTrainedModel"]
