"""Kernel selection: the one place that maps ``LCKV_*`` env flags to implementations.

The model asks for "the RMSNorm", "the rotary embedding", "the MLP" and "the LM loss" here and never
imports a kernel library itself. Every entry has a pure PyTorch path.
"""

from .plain import PlainRMSNorm, PlainSwiGLUMLP, plain_apply_rotary_pos_emb

RMSNorm = PlainRMSNorm
SwiGLUMLP = PlainSwiGLUMLP
apply_rotary_pos_emb = plain_apply_rotary_pos_emb

__all__ = ["RMSNorm", "SwiGLUMLP", "apply_rotary_pos_emb"]
