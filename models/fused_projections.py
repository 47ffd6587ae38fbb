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
parts through it, and a forward that needs gradients for any of them runs the parts (``runs_fused``). Writing into a
part (``load_state_dict``, an optimiser step) writes the fused matrix; ``.to()``, ``.half()`` and ``copy.deepcopy``
keep the parts views of it (``FusedGroupsMixin``). A part replaced after fusion (an adapter wrapping it) or given new
tensors (``load_state_dict(assign=True)``) is no longer a view: an eager forward sees that and runs the parts, a
compiled one does not check (fuse last). One process only: tensor-parallel shards are left alone.

An attention so fused also gets the kernel that rotates a decode step's query and key and writes its keys and values
into a static cache at once (``kernels/rotary_cache.py``): one launch where the compiled step ran three; and the
model's rotary embedding gets the kernel computing the step's cos/sin tables once, as a buffer every layer reads.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils.deprecation import deprecate_kwarg

from .kernels.grouped_linear import (
    GATE_UP_GROUP,
    QKV_GROUP,
    FusedGroupsMixin,
    can_concatenate,
    concatenated_linear,
    grouped_products,
)
from .kernels.plain import GatedMLPForward, PlainRotaryEmbedding
from .kernels.rotary_cache import (
    RotaryCacheMixin,
    RotaryTablesMixin,
    give_rotary_cache,
    load_rotary_cache_kernel,
)
from .tensor_parallel import world_size


class FusedProjectionLlamaAttention(RotaryCacheMixin, FusedGroupsMixin, LlamaAttention):
    """transformers' ``LlamaAttention`` with Q, K and V from one product (``qkv_proj``, set by ``fuse_projections``);
    the rest as in ``LlamaAttention``: rotary and cache update (one kernel at a decode step, ``rotate_into_cache``), the
    configured attention, output projection."""

    fused_groups = QKV_GROUP

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # as LlamaAttention.forward
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
        written = self.rotate_into_cache(cache, (queries, keys, values), position_embeddings)
        if written is not None:
            queries, _, keys, values = written
        else:
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


class FusedProjectionLlamaMLP(GatedMLPForward, FusedGroupsMixin, LlamaMLP):
    """transformers' ``LlamaMLP`` with gate and up from one product (``gate_up_proj``, set by ``fuse_projections``):
    ``(..., H) -> (..., H)``; the same module attributes, so the pure PyTorch MLP's forward."""

    fused_groups = GATE_UP_GROUP


class TabledLlamaRotaryEmbedding(RotaryTablesMixin, LlamaRotaryEmbedding):
    """transformers' ``LlamaRotaryEmbedding`` whose tables come from one kernel where it applies
    (``RotaryTablesMixin``)."""


class TabledPlainRotaryEmbedding(RotaryTablesMixin, PlainRotaryEmbedding):
    """The LCKV model's ``PlainRotaryEmbedding`` whose tables come from one kernel where it applies
    (``RotaryTablesMixin``; float64 tables stay with the class's forward)."""


# transformers' classes whose forward calls each projection separately -> the subclass running the fused product.
FUSED_SUBCLASSES: dict[type[nn.Module], type[nn.Module]] = {
    LlamaAttention: FusedProjectionLlamaAttention,
    LlamaMLP: FusedProjectionLlamaMLP,
}
# The rotary embeddings -> the subclass computing a step's tables with one kernel.
TABLED_SUBCLASSES: dict[type[nn.Module], type[nn.Module]] = {
    LlamaRotaryEmbedding: TabledLlamaRotaryEmbedding,
    PlainRotaryEmbedding: TabledPlainRotaryEmbedding,
}


def fuse_projections(model: nn.Module) -> int:
    """Give every attention and MLP of ``model`` one product per group of projections (see the module docstring), an
    attention so fused the decode step's RoPE + cache-write kernel, and the rotary embedding the kernel of its tables
    (``rotary_cache``, where Triton runs), in place; returns the number of groups fused: 0 under tensor parallelism."""
    if world_size() > 1:
        return 0
    fused = 0
    rotary_cache = load_rotary_cache_kernel()
    rotary_embeddings = [module for module in model.modules() if type(module) in TABLED_SUBCLASSES]
    for module in list(model.modules()):
        module_class = FUSED_SUBCLASSES.get(type(module), type(module))
        for fused_name, part_names in getattr(module_class, "fused_groups", {}).items():
            parts = [getattr(module, name, None) for name in part_names]
            if getattr(module, fused_name, None) is not None or not can_concatenate(parts):
                continue
            module.__class__ = module_class
            setattr(module, fused_name, concatenated_linear(parts))
            if issubclass(module_class, RotaryCacheMixin):
                give_rotary_cache(module, rotary_cache)
            fused += 1
    if fused and rotary_cache is not None:  # a model with nothing to fuse is left as it was
        for module in rotary_embeddings:
            module.__class__ = TABLED_SUBCLASSES[type(module)]
            module.rotary_cache = rotary_cache
    return fused
