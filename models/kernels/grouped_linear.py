"""One product for several linear layers that read the same input (``models/fused_projections.py`` makes the groups).

``concatenated_linear(parts)`` is a plain ``nn.Linear`` over the parts' weights stacked along the out features; the
parts' weights become views of its rows, and ``FusedGroupsMixin`` keeps them so through conversions and copies.
``grouped_products`` is what a module's forward calls: the fused product split into the parts' outputs where it may
run (``runs_fused``), else each part's own product. Here, in the kernels' package, because the pure PyTorch and liger
MLPs call it and a checkpoint's bundled code imports only sibling modules.
"""

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.activations import SiLUActivation

QKV_GROUP = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
GATE_UP_GROUP = {"gate_up_proj": ("gate_proj", "up_proj")}


def link_parts(fused: nn.Linear, parts: Sequence[nn.Linear]) -> None:
    """Make each part's weight (and bias) a view of its rows of ``fused``'s, in order: the parameters stay the same
    objects (``.data`` is rebound), so an optimiser or a ``load_state_dict`` writing into them writes the fused
    matrix."""
    for name in ("weight", "bias"):
        fused_tensor = getattr(fused, name)
        if fused_tensor is None:
            continue
        for part, rows in zip(parts, fused_tensor.split([p.out_features for p in parts]), strict=True):
            getattr(part, name).data = rows


def concatenated_linear(parts: Sequence[nn.Linear]) -> nn.Linear:
    """A plain ``nn.Linear`` computing every part's product at once, ``(..., K) -> (..., sum of N_i)``, the parts'
    outputs side by side in their order. Its weight ``(sum of N_i, K)`` (and bias) is a non-persistent buffer; each
    part's weight becomes a view of its rows (``link_parts``)."""
    weights = [part.weight.detach() for part in parts]
    biases = [part.bias.detach() for part in parts] if parts[0].bias is not None else None
    fused = nn.Linear(parts[0].in_features, sum(w.shape[0] for w in weights), bias=False, device="meta")
    del fused.weight, fused.bias  # buffers instead: not parameters (counted once) and not in the state dict
    fused.register_buffer("weight", torch.cat(weights), persistent=False)
    fused.register_buffer("bias", torch.cat(biases) if biases else None, persistent=False)
    link_parts(fused, parts)
    return fused


def are_views_of(fused: nn.Linear, parts: Sequence[nn.Module]) -> bool:
    """Whether ``parts`` are still linear layers whose weights and biases are ``fused``'s rows, in order (a part
    replaced after fusion, or given new tensors by ``load_state_dict(assign=True)``, is not)."""
    offset = 0
    for part in parts:
        if not isinstance(part, nn.Linear):
            return False
        for name, fused_tensor in (("weight", fused.weight), ("bias", fused.bias)):
            tensor = getattr(part, name)
            if (tensor is None) != (fused_tensor is None):
                return False
            if tensor is not None and tensor.data_ptr() != fused_tensor[offset].data_ptr():
                return False
        offset += part.out_features
    return offset == fused.out_features


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


def runs_fused(fused: nn.Linear | None, parts: Sequence[nn.Module]) -> bool:
    """Whether a module runs its fused product: it has one; no gradient is wanted for any parameter of the parts (the
    fused matrix is a buffer that autograd would not trace back to them); and, checked outside a compiled region
    (where a pointer check would break the graph), the parts are still views of it."""
    if fused is None:
        return False
    if torch.is_grad_enabled() and any(p.requires_grad for part in parts for p in part.parameters()):
        return False
    return torch.compiler.is_compiling() or are_views_of(fused, parts)


def is_silu(activation: nn.Module) -> bool:
    """Whether ``activation`` (an ``ACT2FN`` entry) is SiLU: "silu" and "swish"."""
    return isinstance(activation, (nn.SiLU, SiLUActivation))


def gated_product(x: torch.Tensor, gate_up: nn.Linear, activation: nn.Module) -> torch.Tensor:
    """``act(gate) * up`` of a fused gate/up layer's product of ``x`` ``(..., K)`` -> ``(..., I)``: one kernel where the
    layer offers it (``silu_gated``: a one-row GEMV of ``SmallBatchLinear`` with SiLU), else the product split in
    halves."""
    gated = getattr(gate_up, "silu_gated", None)
    if gated is not None and is_silu(activation):
        out = gated(x)
        if out is not None:
            return out
    gate, up = gate_up(x).chunk(2, dim=-1)
    return activation(gate) * up


def grouped_products(x: torch.Tensor, fused: nn.Linear | None, parts: Sequence[nn.Linear]) -> tuple[torch.Tensor, ...]:
    """Each part's product of ``x`` ``(..., K)``: ``(..., N_i)`` per part, from one fused product when
    ``runs_fused``."""
    if runs_fused(fused, parts):
        return fused(x).split([part.out_features for part in parts], dim=-1)
    return tuple(part(x) for part in parts)


class FusedGroupsMixin:
    """For a module whose class names its projection groups in ``fused_groups`` (``{fused attribute: part names}``):
    a fused group's parts stay views of its matrix through a conversion (``.to()``, ``.half()``) and a copy
    (``copy.deepcopy``, pickling), which convert or copy parameters and buffers apart; afterwards each part is made a
    view of the converted (copied) matrix again, whose values are the same."""

    fused_groups: dict[str, tuple[str, ...]] = {}

    def _apply(self, fn, recurse: bool = True):
        module = super()._apply(fn, recurse)
        self.link_fused_groups()
        return module

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.link_fused_groups()

    def link_fused_groups(self) -> None:
        """``link_parts`` for every fused group of this module."""
        for fused_name, part_names in self.fused_groups.items():
            fused = getattr(self, fused_name, None)
            if fused is not None:
                link_parts(fused, [getattr(self, name) for name in part_names])
