"""Pure PyTorch reference implementations: the fallback of every fused kernel.

Precision: the steps Llama computes in float32 whatever the model's dtype (RMSNorm's statistics, the rotary tables,
eager attention's softmax) run here in ``compute_dtype(dtype)``: float32 for float32, bfloat16 and float16 models
(bitwise as Llama), float64 for a float64 model, so that a float64 model computes in float64 throughout.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import dynamic_rope_update
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, repeat_kv

from .grouped_linear import GATE_UP_GROUP, FusedGroupsMixin, gated_product, runs_fused


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of Llama's float32 steps for a model in ``dtype``: at least float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


class PlainRMSNorm(nn.Module):
    """Root-mean-square norm, its statistics in ``compute_dtype`` (fp32, or fp64 for fp64 input).

    Input and output ``(..., hidden_size)``.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(compute_dtype(input_dtype))
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GatedMLPForward:
    """The forward of Llama's gated MLP, ``down(act(gate(x)) * up(x))``, for a module holding ``gate_proj``,
    ``up_proj``, ``down_proj``, ``act_fn`` and ``gate_up_proj`` (the fused gate/up product, or None): shared by the
    pure PyTorch MLP and transformers' Llama MLP once fused (``fused_projections``). Input and output
    ``(..., hidden_size)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not runs_fused(self.gate_up_proj, (self.gate_proj, self.up_proj)):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(gated_product(x, self.gate_up_proj, self.act_fn))


class PlainSwiGLUMLP(GatedMLPForward, FusedGroupsMixin, nn.Module):
    """Llama's gated MLP: ``down(act(gate(x)) * up(x))``. Input and output ``(..., hidden_size)``.
    ``fused_projections.fuse_projections`` may give it one product for gate and up (``gate_up_proj``)."""

    fused_groups = GATE_UP_GROUP

    def __init__(self, config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]
        self.gate_up_proj: nn.Linear | None = None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def plain_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(batch, heads, seq, head_dim)`` by ``cos``/``sin`` ``(batch, seq, head_dim)``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def plain_apply_rotary_pos_emb(
    q: torch.Tensor | None, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """RoPE on queries ``(B, Hq, T, D)`` and keys ``(B, Hkv, T, D)``; either may be None (condensed layers
    have no keys; a layer computing only its KVs has no queries) and stays None."""
    return tuple(None if x is None else plain_rotate(x, cos, sin) for x in (q, k))


class PlainRotaryEmbedding(LlamaRotaryEmbedding):
    """Llama's rotary embedding with its tables in ``compute_dtype`` of the input: float32 (bitwise Llama's) for
    float32/bf16/fp16 inputs; float64 for float64 inputs, frequencies included (computed from the config in float64 for
    the default RoPE; other RoPE types take transformers' float32 frequencies, upcast).

    ``forward(x, position_ids (B, T))`` -> ``cos``, ``sin`` ``(B, T, head_dim)`` in ``x``'s dtype.
    """

    def inverse_frequencies(self, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
        """The ``(head_dim / 2,)`` rotation frequencies in ``dtype`` (float32: the module's own buffer)."""
        if dtype == torch.float32 or self.rope_type != "default":
            return self.inv_freq.to(device=device, dtype=dtype)
        dim = self.inv_freq.shape[0] * 2
        exponents = torch.arange(0, dim, 2, dtype=dtype, device=device) / dim
        return 1.0 / (self.config.rope_parameters["rope_theta"] ** exponents)

    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = compute_dtype(x.dtype)
        freqs = position_ids[..., None].to(dtype) * self.inverse_frequencies(dtype, x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def plain_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention with its softmax in ``compute_dtype`` (bitwise Llama's below float64).

    query ``(B, Hq, T, D)``, key/value ``(B, Hkv, S, D)``, additive mask broadcastable to ``(B, Hq, T, S)`` ->
    output ``(B, T, Hq, D)`` and weights ``(B, Hq, T, S)``.
    """
    keys = repeat_kv(key, module.num_key_value_groups)
    values = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=compute_dtype(query.dtype)).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, values).transpose(1, 2).contiguous()
    return output, weights
