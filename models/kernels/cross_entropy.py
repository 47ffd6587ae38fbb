"""Fused linear cross-entropy (liger-kernel, Triton): the LM loss from hidden states without materialising logits."""

import torch
from liger_kernel.transformers.model.loss_utils import LigerForCausalLMLoss


def fused_linear_cross_entropy(
    hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, **loss_kwargs
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` of ``hidden_states @ lm_head_weight.T``, computed chunk by chunk.

    Args:
        hidden_states: ``(B, T, H)`` final hidden states (already cut to ``logits_to_keep``).
        lm_head_weight: ``(vocab, H)``.
        labels: ``(B, T)`` token ids, shifted inside like transformers' loss (or pass ``shift_labels``).
        loss_kwargs: ``num_items_in_batch`` (sum / count, as the Trainer passes it for gradient accumulation),
            ``ignore_index`` (default -100), ``shift_labels``; other keys are ignored.

    Returns:
        Scalar loss.
    """
    hidden_states = hidden_states.contiguous()
    return LigerForCausalLMLoss(hidden_states, lm_head_weight, labels, hidden_states.shape[-1], **loss_kwargs)
