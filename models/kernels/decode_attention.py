"""Decoding attention that reads only the filled part of a (static) KV cache: the ``sdpa_split_kv`` backend.

SDPA over a static cache reads every preallocated slot of every layer, filled or not, plus a dense mask.
For one query token this backend runs a split-KV Triton kernel (``triton_decode.py``) instead: per row it
reads keys and values only up to the last visible slot (``visible_lengths`` of the ``(B, 1, 1, S)`` mask the
model already passes, so no extra input and no recompilation as the cache fills), applies the mask inside
that span (left padding, the strict mask of condensed layers), and reads each GQA KV head once for all its
query heads. The grid and the launch (``decode_launch.launch_config``: tile, warps, stages, number of splits)
depend on shapes only, so a compiled decode step (CUDA graph) captures it once. Everything else (prefill, masks
it cannot read, dropout, devices without Triton) runs ``sdpa_packed_gqa``, which on the CPU is the whole story:
the pure PyTorch fallback.

The kernel runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` is set before
``configure_decode_kernel()`` loads it (tests run the real kernel that way).
"""

import os
from collections.abc import Callable, Mapping

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.import_utils import is_triton_available

from .attention import packed_sdpa_attention
from .decode_launch import launch_config

SPLIT_KV = "sdpa_split_kv"
CPU_PROCESSORS = 4  # the interpreter's stand-in for the SM count (tests only)

_kernel: Callable | None = None
_kernel_devices: frozenset[str] = frozenset()
_processors = CPU_PROCESSORS


def configure_decode_kernel(environ: Mapping[str, str] | None = None) -> None:
    """Load the Triton kernel for the devices it can run on: CUDA, and the CPU under ``TRITON_INTERPRET=1``.

    Without Triton (or with neither) the backend keeps the SDPA fallback. Called by ``import models``.
    """
    global _kernel, _kernel_devices
    environ = os.environ if environ is None else environ
    devices = {"cuda"} if torch.cuda.is_available() else set()
    if environ.get("TRITON_INTERPRET") == "1":
        devices.add("cpu")
    if not devices or not is_triton_available():  # the check triton_decode.py guards its import with
        _kernel, _kernel_devices = None, frozenset()
        return
    from .triton_decode import split_kv_decode

    _kernel, _kernel_devices = split_kv_decode, frozenset(devices)


def processors(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (looked up on first use, not at import: that would create a CUDA
    context before a process picks its GPU); the interpreter's stand-in on the CPU."""
    global _processors
    if device.type == "cuda" and _processors == CPU_PROCESSORS:
        _processors = torch.cuda.get_device_properties(device).multi_processor_count
    return _processors


def kernel_devices() -> frozenset[str]:
    """Device types on which ``sdpa_split_kv`` decodes with the Triton kernel (empty: SDPA everywhere)."""
    return _kernel_devices


def visible_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the last visible slot + 1 (0 when none): slots from there on are never read.

    Args:
        mask: ``(B, S)`` bool, True where the key is visible.

    Returns:
        ``(B,)`` int32.
    """
    slots = torch.arange(1, mask.shape[-1] + 1, device=mask.device, dtype=torch.int32)
    return torch.where(mask, slots, 0).amax(-1).to(torch.int32)


def runs_split_kv(query: torch.Tensor, key: torch.Tensor, attention_mask: object, dropout: float) -> bool:
    """One query token on a device with the kernel, no dropout, and no mask or a bool ``(B or 1, 1, 1, S)`` mask."""
    if query.shape[2] != 1 or dropout != 0.0 or query.device.type not in _kernel_devices:
        return False
    if attention_mask is None:
        return True
    return (
        isinstance(attention_mask, torch.Tensor)
        and attention_mask.dtype == torch.bool
        and attention_mask.dim() == 4
        and attention_mask.shape[1:3] == (1, 1)
        and attention_mask.shape[-1] == key.shape[2]
    )


def split_kv_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """``(B, Hq, 1, D)`` queries on ``(B, Hkv, S, D)`` keys/values, bool mask ``(B or 1, 1, 1, S)`` or None
    (all visible) -> ``(B, 1, Hq, D)``, as SDPA with that mask; a row with no visible key outputs zeros."""
    batch, _, _, head_dim = query.shape
    slots = key.shape[2]
    if attention_mask is None:
        mask, lengths = None, torch.full((batch,), slots, device=query.device, dtype=torch.int32)
    else:
        mask = attention_mask[:, 0, 0, :].expand(batch, slots)
        lengths = visible_lengths(mask)
    kv_heads = key.shape[1]
    launch = launch_config(batch, kv_heads, query.shape[1] // kv_heads, head_dim, slots, query.dtype.itemsize,
                           processors(query.device))
    scale = head_dim**-0.5 if scaling is None else scaling
    return _kernel(query, key, value, mask, lengths, scale, *launch)


def split_kv_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature: the split-KV kernel for decoding, ``sdpa_packed_gqa`` otherwise."""
    if runs_split_kv(query, key, attention_mask, dropout):
        return split_kv_decode_attention(query, key, value, attention_mask, scaling), None
    return packed_sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register_split_kv() -> None:
    """Make ``attn_implementation="sdpa_split_kv"`` available to every transformers model (SDPA's bool masks)."""
    ALL_ATTENTION_FUNCTIONS.register(SPLIT_KV, split_kv_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SPLIT_KV, sdpa_mask)
    configure_decode_kernel()
