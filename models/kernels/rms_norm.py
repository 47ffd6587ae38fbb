"""Fused RMSNorm (liger-kernel, Triton). Needs CUDA and liger-kernel."""

import torch
from liger_kernel.transformers.functional import liger_rms_norm

from .plain import PlainRMSNorm


class FusedRMSNorm(PlainRMSNorm):
    """Same parameters as ``PlainRMSNorm`` and, below float64, its numerics (fp32 statistics, Llama casting); one
    Triton kernel. Its statistics stay fp32 for float64 input: float64 runs use the plain path (the flag off).

    Input and output ``(..., hidden_size)``.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return liger_rms_norm(hidden_states, self.weight, self.variance_epsilon, casting_mode="llama")
