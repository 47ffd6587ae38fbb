"""Fused rotary position embedding (liger-kernel, Triton). Needs CUDA and liger-kernel."""

import torch
from liger_kernel.transformers.functional import liger_rope


def fused_apply_rotary_pos_emb(
    q: torch.Tensor | None, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """RoPE on queries ``(B, Hq, T, D)`` and keys ``(B, Hkv, T, D)`` with ``cos``/``sin`` ``(B, T, D)``.

    Either may be None (condensed layers have no keys; a layer computing only its KVs has no queries): the
    kernel rotates both together, so a zero one-head tensor stands in for the missing one and is dropped
    (fresh memory: the kernel works in place).
    """
    present = q if q is not None else k
    if present is None:
        return None, None
    stand_in = present.new_zeros(present.shape[0], 1, *present.shape[2:])
    rotated_q, rotated_k = liger_rope(stand_in if q is None else q, stand_in if k is None else k, cos, sin)
    return (None if q is None else rotated_q), (None if k is None else rotated_k)
