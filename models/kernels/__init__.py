"""Kernel selection: the one place that maps ``LCKV_*`` env flags to implementations.

A model holds a ``KernelSelection``: "the RMSNorm", "the MLP", "the rotary embedding", "the attention" and "the
fused LM loss" it runs, resolved from the flags when the model is built (or passed to it), and never imports a
kernel library itself. Flags are read only then, so ``import models`` never fails on a flag value and a tool can
report a bad one as a usage error first; a model keeps its kernels when the flags change afterwards. Every flag
that cannot take effect falls back to the pure PyTorch path (``plain.py``) with one warning line.

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
from dataclasses import dataclass
from functools import partial

import torch

from .attention import STRICT_CAUSAL, configured_attention, fast_attention, sdpa_causal_attention
from .decode_attention import (
    SPLIT_KV,
    SplitKvKernel,
    is_decode_mask,
    load_split_kv_kernel,
    runs_split_kv,
    split_kv_mask,
    split_kv_sdpa_attention,
)
from .device_properties import cuda_index
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
from .grouped_linear import QKV_GROUP, FusedGroupsMixin, grouped_products
from .plain import PlainRMSNorm, PlainRotaryEmbedding, PlainSwiGLUMLP, plain_apply_rotary_pos_emb
from .rotary_cache import RotaryCacheMixin

INSTALL_HINT = "see requirements-gpu.txt"


def missing_reason(module: str) -> str:
    """Why the kernel module's import failed on ``module`` (the name ``ImportError`` gives): its package is not
    installed, or, where the name is under this package's own root, the code runs from a checkpoint's bundle, whose
    flat copy of this package holds no kernel modules."""
    root = module.split(".")[0]
    if root == __name__.split(".")[0]:
        return "the fused kernels are not in a checkpoint's bundled code (load it with this repository's models)"
    return f"{root} is not installed ({INSTALL_HINT})"


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
        warn_fallback(flag, missing_reason(error.name or str(error)), description)
        return fallback


@dataclass(frozen=True)
class KernelSelection:
    """The kernels one model runs, fixed when it is built: ``OptLlamaModel`` resolves one ``from_environ`` (or takes the
    one passed as ``kernel_selection``), builds its norms and MLPs from it and reads the rest from it at call time, so a
    model never mixes two selections and changing the flags afterwards changes only models built afterwards.

    The defaults are the pure PyTorch path (``plain.py``) and no split-KV decode kernel.

    Attributes:
        rms_norm: the RMSNorm class, ``(hidden_size, eps=...)``.
        swiglu_mlp: the gated MLP class, ``(config)``.
        apply_rotary_pos_emb: ``(q, k, cos, sin) -> (q, k)``, either of q / k may be None.
        fused_linear_cross_entropy: the training loss straight from the hidden states (no logits), or None: logits and
            transformers' loss.
        causal_attention: the mask-free causal attention ``fast_attention`` runs the strict mask on (as a shifted causal
            attention, ``STRICT_CAUSAL``), or None: the configured attention implementation with dense strict masks.
        split_kv: the Triton decode kernel of ``attn_implementation="sdpa_split_kv"`` and the device types it runs on,
            or None: that backend decodes through its SDPA fallback.
    """

    rms_norm: type[torch.nn.Module] = PlainRMSNorm
    swiglu_mlp: type[torch.nn.Module] = PlainSwiGLUMLP
    apply_rotary_pos_emb: Callable = plain_apply_rotary_pos_emb
    fused_linear_cross_entropy: Callable | None = None
    causal_attention: Callable | None = None
    split_kv: SplitKvKernel | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "KernelSelection":
        """Every kernel as the ``LCKV_*`` flags (and ``TRITON_INTERPRET``) of ``environ`` (default ``os.environ``) ask.

        A bad flag value is a one-line ValueError; a flag that cannot take effect logs one warning line (``_fused``).
        """
        return cls(
            rms_norm=_fused(FUSED_RMSNORM, "rms_norm", "FusedRMSNorm", environ, (PlainRMSNorm, PLAIN)),
            swiglu_mlp=_fused(FUSED_SWIGLU, "swiglu", "FusedSwiGLUMLP", environ, (PlainSwiGLUMLP, PLAIN)),
            apply_rotary_pos_emb=_fused(
                FUSED_ROTARY, "rotary", "fused_apply_rotary_pos_emb", environ, (plain_apply_rotary_pos_emb, PLAIN)
            ),
            fused_linear_cross_entropy=_fused(
                FUSED_CROSSENTROPY,
                "cross_entropy",
                "fused_linear_cross_entropy",
                environ,
                (None, "logits + cross-entropy"),
            ),
            causal_attention=_fused(
                FLASH_ATTN,
                "flash_attention",
                "flash_causal_attention",
                environ,
                (None, "the configured attention with a dense strict mask"),
                (
                    sdpa_causal_attention,
                    "torch SDPA (flash/efficient backends) with the strict mask as a shifted causal",
                ),
            ),
            split_kv=load_split_kv_kernel(environ),
        )

    def __deepcopy__(self, memo: dict) -> "KernelSelection":
        """Shared, not copied (a copied model runs the same kernels): it holds only classes and functions."""
        return self

    @property
    def strict_as_causal(self) -> bool:
        """Whether the mask builder may hand ``STRICT_CAUSAL`` to the attention instead of a dense strict mask."""
        return self.causal_attention is not None

    def split_kv_decodes(
        self,
        implementation: str,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: object,
        dropout: float,
    ) -> bool:
        """Whether ``attention_interface(implementation)`` runs the split-KV decode kernel on these inputs. Then it
        outputs exactly zero for a query that sees no key (its merge divides by a zero sum as by one), so a strict
        layer need not zero such queries itself, and it can rotate the queries as it reads them (``query_rotation``);
        every other path is assumed to do neither."""
        return implementation == SPLIT_KV and runs_split_kv(self.split_kv, query, key, attention_mask, dropout)

    def attention_interface(self, implementation: str) -> Callable:
        """The attention function (transformers' interface signature) for ``config._attn_implementation``."""
        if implementation == SPLIT_KV:
            base = partial(split_kv_sdpa_attention, kernel=self.split_kv)
        else:
            base = configured_attention(implementation)
        if self.causal_attention is None:
            return base
        # sdpa_split_kv decodes with its own kernel; every other backend gets the packed GQA decoding.
        return partial(fast_attention, base, self.causal_attention, pack_decode=implementation != SPLIT_KV)


__all__ = [
    "FLAGS",
    "QKV_GROUP",
    "SPLIT_KV",
    "FusedGroupsMixin",
    "STRICT_CAUSAL",
    "cuda_index",
    "KernelSelection",
    "PlainRotaryEmbedding",
    "RotaryCacheMixin",
    "flag_enabled",
    "grouped_products",
    "is_decode_mask",
    "split_kv_mask",
]
