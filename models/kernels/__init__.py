"""Kernel selection: the one place that maps ``LCKV_*`` env flags to implementations.

The model asks for "the RMSNorm", "the MLP", "the rotary embedding", "the attention" and "the fused LM
loss" here and never imports a kernel library itself. Flags are read when a kernel is first asked for (the
first model built), so ``import models`` never fails on a flag value and a tool can report a bad one as a
usage error first; after changing them in-process, call ``configure()`` before building a model. Every flag that cannot take effect falls
back to the pure PyTorch path (``plain.py``) with one warning line.

=========================  ==================================================================================
flag (``1`` on, ``0`` off)  fused path
=========================  ==================================================================================
LCKV_FLASH_ATTN            flash-attn (else torch SDPA) for mask-free causal attention; the strict mask runs
                           as a shifted causal attention instead of a dense mask
LCKV_FUSED_RMSNORM         liger-kernel RMSNorm
LCKV_FUSED_ROTARY          liger-kernel RoPE
LCKV_FUSED_SWIGLU          liger-kernel SiLU-and-multiply in the MLP
LCKV_FUSED_CROSSENTROPY    liger-kernel fused linear cross-entropy (training with labels: no logits)
=========================  ==================================================================================
"""

import importlib
from collections.abc import Callable, Mapping
from functools import partial

import torch

from .attention import STRICT_CAUSAL, configured_attention, fast_attention, sdpa_causal_attention
from .decode_attention import split_kv_sdpa_attention
from .flags import (
    FLAGS,
    FLASH_ATTN,
    FUSED_CROSSENTROPY,
    FUSED_RMSNORM,
    FUSED_ROTARY,
    FUSED_SWIGLU,
    flag_enabled,
    warn_fallback,
)
from .plain import PlainRMSNorm, PlainRotaryEmbedding, PlainSwiGLUMLP, plain_apply_rotary_pos_emb

INSTALL_HINT = "see requirements-gpu.txt"


# (implementation, what the warning calls it): what runs when a flag cannot take effect.
Fallback = tuple[object, str]
PLAIN = "the pure PyTorch path"


def _fused(
    flag: str,
    module: str,
    name: str,
    environ: Mapping[str, str] | None,
    no_cuda: Fallback,
    no_package: Fallback | None = None,
):
    """``module.name`` when ``flag`` is on and it can run; ``no_cuda[0]`` when the flag is off.

    Without CUDA the result is ``no_cuda[0]``; without the kernel's package ``no_package[0]`` (default
    ``no_cuda``). Each fallback of a flag that is on logs one line naming the flag, the reason and the fallback.
    """
    if not flag_enabled(flag, environ):
        return no_cuda[0]
    if not torch.cuda.is_available():
        warn_fallback(flag, "CUDA is not available", no_cuda[1])
        return no_cuda[0]
    try:
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    except ImportError as error:
        fallback, description = no_package or no_cuda
        package = (error.name or str(error)).split(".")[0]
        warn_fallback(flag, f"{package} is not installed ({INSTALL_HINT})", description)
        return fallback


def configure(environ: Mapping[str, str] | None = None) -> None:
    """(Re)select every kernel from the ``LCKV_*`` flags of ``environ`` (default ``os.environ``)."""
    global RMSNorm, SwiGLUMLP, apply_rotary_pos_emb, fused_linear_cross_entropy, causal_attention, _configured
    RMSNorm = _fused(FUSED_RMSNORM, "rms_norm", "FusedRMSNorm", environ, (PlainRMSNorm, PLAIN))
    SwiGLUMLP = _fused(FUSED_SWIGLU, "swiglu", "FusedSwiGLUMLP", environ, (PlainSwiGLUMLP, PLAIN))
    apply_rotary_pos_emb = _fused(
        FUSED_ROTARY, "rotary", "fused_apply_rotary_pos_emb", environ, (plain_apply_rotary_pos_emb, PLAIN)
    )
    # None: the model computes logits and transformers' loss.
    fused_linear_cross_entropy = _fused(
        FUSED_CROSSENTROPY, "cross_entropy", "fused_linear_cross_entropy", environ, (None, "logits + cross-entropy")
    )
    # None: the configured attention implementation with dense strict masks.
    causal_attention = _fused(
        FLASH_ATTN,
        "flash_attention",
        "flash_causal_attention",
        environ,
        (None, "the configured attention with a dense strict mask"),
        (sdpa_causal_attention, "torch SDPA (flash/efficient backends) with the strict mask as a shifted causal"),
    )
    _configured = True


def fast_strict_mask() -> bool:
    """Whether the mask builder may hand ``STRICT_CAUSAL`` to the attention instead of a dense strict mask."""
    _ensure_configured()
    return causal_attention is not None


def attention_interface(implementation: str) -> Callable:
    """The attention function (transformers' interface signature) for ``config._attn_implementation``."""
    _ensure_configured()
    base = configured_attention(implementation)
    if causal_attention is None:
        return base
    # sdpa_split_kv decodes with its own kernel; every other backend gets the packed GQA decoding.
    return partial(fast_attention, base, causal_attention, pack_decode=base is not split_kv_sdpa_attention)


RMSNorm: type[torch.nn.Module]
SwiGLUMLP: type[torch.nn.Module]
apply_rotary_pos_emb: Callable
fused_linear_cross_entropy: Callable | None
causal_attention: Callable | None
SELECTED = ("RMSNorm", "SwiGLUMLP", "apply_rotary_pos_emb", "fused_linear_cross_entropy", "causal_attention")


_configured = False  # set by configure(); a plain bool, so torch.compile can trace the check


def _ensure_configured() -> None:
    """Select every kernel from ``os.environ`` on first use."""
    if not _configured:
        configure()


def __getattr__(name: str):
    """PEP 562: ``kernels.RMSNorm`` and the other selected kernels exist once ``configure()`` has run."""
    if name in SELECTED:
        configure()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FLAGS",
    "STRICT_CAUSAL",
    "PlainRotaryEmbedding",
    "RMSNorm",
    "SwiGLUMLP",
    "apply_rotary_pos_emb",
    "attention_interface",
    "causal_attention",
    "configure",
    "fast_strict_mask",
    "flag_enabled",
    "fused_linear_cross_entropy",
]
