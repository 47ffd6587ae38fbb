"""Pure PyTorch reference implementations: the fallback of every fused kernel."""

import torch
from torch import nn
from transformers.activations import ACT2FN


class PlainRMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32. Input and output ``(..., hidden_size)``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class PlainSwiGLUMLP(nn.Module):
    """Llama's gated MLP: ``down(act(gate(x)) * up(x))``. Input and output ``(..., hidden_size)``."""

    def __init__(self, config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def plain_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(batch, heads, seq, head_dim)`` by ``cos``/``sin`` ``(batch, seq, head_dim)``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def plain_apply_rotary_pos_emb(
    q: torch.Tensor | None, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """RoPE on queries ``(B, Hq, T, D)`` and keys ``(B, Hkv, T, D)``; either may be None (condensed layers
    have no keys; a layer computing only its KVs has no queries) and stays None."""
    return tuple(None if x is None else plain_rotate(x, cos, sin) for x in (q, k))
