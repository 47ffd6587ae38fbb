"""Causal attention through flash-attn (optional package; GQA read natively, bf16/fp16 only)."""

import torch
from flash_attn import flash_attn_func
from torch import nn


def flash_causal_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """Query ``(B, Hq, T, D)``, key/value ``(B, Hkv, T, D)`` -> ``(B, T, Hq, D)``, causal."""
    return flash_attn_func(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout, softmax_scale=scaling, causal=True
    )
