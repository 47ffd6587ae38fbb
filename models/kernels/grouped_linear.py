"""One product for several linear layers that read the same input (``models/fused_projections.py`` makes the groups).

``concatenated_linear(parts)`` is a plain ``nn.Linear`` over the parts' weights stacked along the out features; the
parts' weights become views of its rows. ``grouped_products`` is what a module's forward calls: the fused product
split into the parts' outputs where it may run (``runs_fused``), else each part's own product. Here, in the kernels'
package, because the pure PyTorch and liger MLPs call it and a checkpoint's bundled code imports only sibling modules.
"""

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor

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
