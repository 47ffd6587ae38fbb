"""One product per group of projections that read the same input: Q/K/V, and the MLP's gate/up.

A decode step multiplies every weight matrix by a few rows, so each product costs its weights' bytes plus a fixed
cost per kernel; a K/V projection of a grouped-query model (256-1024 out features) is mostly that fixed cost, and a
small product leaves multiprocessors idle. ``fuse_projections(model)`` concatenates, in place, the weights each
attention multiplies by its input (q/k/v) and each MLP multiplies by its input (gate/up) into one matrix per group,
and the module runs one product for the group. The parts' weights become views of that matrix, so the memory, the
parameters and the state dict stay the same, and code calling a part alone (an LCKV layer's KV-only pass) still runs
it. Every output element is the same dot product as before; a different kernel may sum it in another order, so
results agree to rounding.

A module takes part when its class names its groups in ``fused_groups`` (``{fused attribute: part names}``):
``OptLlamaAttention`` and the pure PyTorch and liger MLPs do; transformers' ``LlamaAttention`` and ``LlamaMLP`` are
swapped to the subclasses below, whose forward runs the fused product. Layers whose parts are missing (an LCKV
condensed layer has no K/V) or differ in device, dtype, input size or bias keep their separate products.

The fused matrix is a buffer, not a parameter, so parameters are counted once; autograd therefore cannot reach the
parts through it, and a forward that needs gradients for them runs the parts (``runs_fused``). Fuse after the model
has its final device and dtype: ``.to()`` copies the parts and the buffer apart (values stay equal, the memory
doubles). One process only: tensor-parallel shards are left alone.
"""

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .tensor_parallel import world_size

QKV_GROUP = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
GATE_UP_GROUP = {"gate_up_proj": ("gate_proj", "up_proj")}


def concatenated_linear(parts: Sequence[nn.Linear]) -> nn.Linear:
    """A plain ``nn.Linear`` computing every part's product at once, ``(..., K) -> (..., sum of N_i)``, the parts'
    outputs side by side in their order. Its weight ``(sum of N_i, K)`` (and bias) is a non-persistent buffer; each
    part's weight becomes a view of its rows, keeping its ``requires_grad``."""
    weights = [part.weight.detach() for part in parts]
    biases = [part.bias.detach() for part in parts] if parts[0].bias is not None else None
    fused = nn.Linear(parts[0].in_features, sum(w.shape[0] for w in weights), bias=False, device="meta")
    del fused.weight, fused.bias  # buffers instead: not parameters (counted once) and not in the state dict
    fused.register_buffer("weight", torch.cat(weights), persistent=False)
    fused.register_buffer("bias", torch.cat(biases) if biases else None, persistent=False)
    for name, fused_tensor in (("weight", fused.weight), ("bias", fused.bias)):
        if fused_tensor is None:
            continue
        for part, rows in zip(parts, fused_tensor.split([p.out_features for p in parts]), strict=True):
            setattr(part, name, nn.Parameter(rows, requires_grad=getattr(part, name).requires_grad))
    return fused


def can_concatenate(parts: Sequence[nn.Linear | None]) -> bool:
    """Whether ``parts`` exist and can share one matrix: plain tensors on one device, one dtype and input size, all
    with or all without a bias."""
    if any(not isinstance(part, nn.Linear) or isinstance(part.weight, DTensor) for part in parts):
        return False
    first = parts[0]
    return all(
        part.in_features == first.in_features
        and part.weight.dtype == first.weight.dtype
        and part.weight.device == first.weight.device
        and (part.bias is None) == (first.bias is None)
        for part in parts
    )


def runs_fused(fused: nn.Linear | None, first_part: nn.Linear) -> bool:
    """Whether a module runs its fused product: it has one, and no gradient is wanted for the parts (the fused weight
    is a buffer that autograd would not trace back to them)."""
    return fused is not None and not (torch.is_grad_enabled() and first_part.weight.requires_grad)


def grouped_products(x: torch.Tensor, fused: nn.Linear | None, parts: Sequence[nn.Linear]) -> tuple[torch.Tensor, ...]:
    """Each part's product of ``x`` ``(..., K)``: ``(..., N_i)`` per part, from one fused product when
    ``runs_fused``."""
    if runs_fused(fused, parts[0]):
        return fused(x).split([part.out_features for part in parts], dim=-1)
    return tuple(part(x) for part in parts)


class FusedProjectionLlamaAttention(LlamaAttention):
    """transformers' ``LlamaAttention`` with Q, K and V from one product (``qkv_proj``, set by ``fuse_projections``);
    the rest as in ``LlamaAttention``: rotary, cache update, the configured attention, output projection."""

    fused_groups = QKV_GROUP

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states`` ``(B, T, H)`` -> output ``(B, T, H)`` and the attention weights where the backend
        returns them."""
        input_shape = hidden_states.shape[:-1]
        heads_shape = (*input_shape, -1, self.head_dim)
        queries, keys, values = (
            product.view(heads_shape).transpose(1, 2)  # (B, heads, T, D)
            for product in grouped_products(hidden_states, self.qkv_proj, (self.q_proj, self.k_proj, self.v_proj))
        )
        queries, keys = apply_rotary_pos_emb(queries, keys, *position_embeddings)
        if cache is not None:
            keys, values = cache.update(keys, values, self.layer_idx, kwargs=kwargs)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention(
            self,
            queries,
            keys,
            values,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


class FusedProjectionLlamaMLP(LlamaMLP):
    """transformers' ``LlamaMLP`` with gate and up from one product (``gate_up_proj``, set by ``fuse_projections``):
    ``(..., H) -> (..., H)``."""

    fused_groups = GATE_UP_GROUP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = grouped_products(x, self.gate_up_proj, (self.gate_proj, self.up_proj))
        return self.down_proj(self.act_fn(gate) * up)


# transformers' classes whose forward calls each projection separately -> the subclass running the fused product.
FUSED_SUBCLASSES: dict[type[nn.Module], type[nn.Module]] = {
    LlamaAttention: FusedProjectionLlamaAttention,
    LlamaMLP: FusedProjectionLlamaMLP,
}


def fuse_projections(model: nn.Module) -> int:
    """Give every attention and MLP of ``model`` one product per group of projections (see the module docstring), in
    place; returns the number of groups fused: 0 under tensor parallelism."""
    if world_size() > 1:
        return 0
    fused = 0
    for module in list(model.modules()):
        module_class = FUSED_SUBCLASSES.get(type(module), type(module))
        for fused_name, part_names in getattr(module_class, "fused_groups", {}).items():
            parts = [getattr(module, name, None) for name in part_names]
            if getattr(module, fused_name, None) is not None or not can_concatenate(parts):
                continue
            module.__class__ = module_class
            setattr(module, fused_name, concatenated_linear(parts))
            fused += 1
    return fused
