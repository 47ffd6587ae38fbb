"""Fused RMSNorm (liger-kernel, Triton). Needs CUDA and liger-kernel."""

import torch
from liger_kernel.transformers.functional import liger_rms_norm

from .plain import PlainRMSNorm


class FusedRMSNorm(PlainRMSNorm):
    """Same parameters and numerics (fp32 statistics, Llama casting) as ``PlainRMSNorm``; one Triton kernel.

    Input and output ``(..., hidden_size)``.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return liger_rms_norm(hidden_states, self.weight, self.variance_epsilon, casting_mode="llama")
