"""Fused rotary position embedding (liger-kernel, Triton). Needs CUDA and liger-kernel."""

import torch
from liger_kernel.transformers.functional import liger_rope


def fused_apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RoPE on queries ``(B, Hq, T, D)`` and keys ``(B, Hkv, T, D)`` with ``cos``/``sin`` ``(B, T, D)``.

    Condensed layers have no keys (``k`` None): the kernel rotates queries and keys together, so a
    zero one-head key stands in and is dropped (fresh memory: the kernel works in place).
    """
    keys = q.new_zeros(q.shape[0], 1, *q.shape[2:]) if k is None else k
    q, keys = liger_rope(q, keys, cos, sin)
    return q, None if k is None else keys
