"""Fused SwiGLU activation (liger-kernel, Triton): ``silu(gate) * up`` in one kernel. Needs CUDA and liger-kernel."""

import torch
from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction
from liger_kernel.transformers.functional import liger_swiglu

from .flags import FUSED_SWIGLU
from .grouped_linear import runs_fused
from .plain import PlainSwiGLUMLP

SUPPORTED_ACTIVATIONS = ("silu", "swish")


class FusedSwiGLUMLP(PlainSwiGLUMLP):
    """``PlainSwiGLUMLP`` (same parameters) with the gate activation and product fused. ``(..., H)`` -> ``(..., H)``.
    With gate and up as one product (``gate_up_proj``) the kernel reads both halves of it in place."""

    def __init__(self, config) -> None:
        if config.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"{FUSED_SWIGLU}=1: hidden_act={config.hidden_act!r} is not fused; allowed values are "
                f"{', '.join(SUPPORTED_ACTIVATIONS)} (or unset {FUSED_SWIGLU})"
            )
        super().__init__(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_fused(self.gate_up_proj, (self.gate_proj, self.up_proj)):
            return self.down_proj(LigerFusedGateUpSiLUMulFunction.apply(self.gate_up_proj(x)))
        return self.down_proj(liger_swiglu(self.gate_proj(x), self.up_proj(x)))
