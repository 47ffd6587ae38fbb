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
``load_split_kv_kernel()`` loads it (tests run the real kernel that way).
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import packed_sdpa_attention, with_query_rotation
from .decode_launch import launch_config
from .device_properties import cuda_index, multiprocessor_count
from .flags import triton_devices
from .rotary_cache import DTYPES as ROTATION_DTYPES  # the dtypes the kernels rotate in float32 and round once

SPLIT_KV = "sdpa_split_kv"
CPU_PROCESSORS = 4  # the interpreter's stand-in for the SM count (tests only)


@dataclass(frozen=True)
class SplitKvKernel:
    """The split-KV decode op (``triton_decode.split_kv_decode``'s signature), the op making its view of a mask
    (``triton_decode.split_kv_mask_view``) and the device types they run on. A model holds it in its
    ``KernelSelection``; pickled as "load it again" (``torch.save`` of a whole model), since a compiled op does not
    pickle."""

    run: Callable
    view_mask: Callable
    devices: frozenset[str]

    def __reduce__(self):
        return load_split_kv_kernel, ()


def load_split_kv_kernel(environ: Mapping[str, str] | None = None) -> SplitKvKernel | None:
    """The Triton kernel for the devices it can run on: CUDA, and the CPU under ``TRITON_INTERPRET=1`` of ``environ``
    (default ``os.environ``); None without Triton or without either (the backend then decodes through SDPA)."""
    devices = triton_devices(environ)
    if not devices:
        return None
    from .triton_decode import split_kv_decode, split_kv_mask_view

    return SplitKvKernel(split_kv_decode, split_kv_mask_view, devices)


def processors(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; the interpreter's stand-in on the CPU."""
    return multiprocessor_count(cuda_index(device)) if device.type == "cuda" else CPU_PROCESSORS


def visible_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the last visible slot + 1 (0 when none): slots from there on are never read.

    Args:
        mask: ``(B, S)`` bool, True where the key is visible.

    Returns:
        ``(B,)`` int32.
    """
    slots = torch.arange(1, mask.shape[-1] + 1, device=mask.device, dtype=torch.int32)
    return torch.where(mask, slots, 0).amax(-1).to(torch.int32)


class SplitKvMask(NamedTuple):
    """What the split-KV kernel reads of a bool mask ``(B or 1, 1, 1, S)``: its rows ``(B, S)`` (None: every slot
    visible) and each row's length, its last visible slot + 1 (``(B,)`` int32)."""

    rows: torch.Tensor | None
    lengths: torch.Tensor


def split_kv_mask(
    attention_mask: torch.Tensor | None,
    batch: int,
    slots: int,
    device: torch.device,
    kernel: SplitKvKernel | None = None,
) -> SplitKvMask:
    """The kernel's view of ``attention_mask`` (bool ``(B or 1, 1, 1, S)``, or None) for ``batch`` rows. With
    ``kernel`` (where it runs on the mask's device), made by its ``view_mask`` op: one kernel whose outputs any number
    of layers read, for a caller that shares the view (``StackPass``); else in PyTorch, where a compiled step fuses it
    into the kernels around it."""
    if attention_mask is None:
        return SplitKvMask(None, torch.full((batch,), slots, device=device, dtype=torch.int32))
    if kernel is not None and attention_mask.device.type in kernel.devices:
        return SplitKvMask(*kernel.view_mask(attention_mask, batch))
    rows = attention_mask[:, 0, 0, :].expand(batch, slots)
    return SplitKvMask(rows, visible_lengths(rows))


def runs_split_kv(
    kernel: SplitKvKernel | None, query: torch.Tensor, key: torch.Tensor, attention_mask: object, dropout: float
) -> bool:
    """One query token on a device with the kernel, no dropout, and no mask or a bool ``(B or 1, 1, 1, S)`` mask."""
    if kernel is None or query.shape[2] != 1 or dropout != 0.0 or query.device.type not in kernel.devices:
        return False
    return attention_mask is None or (is_decode_mask(attention_mask) and attention_mask.shape[-1] == key.shape[2])


def is_decode_mask(mask: object) -> bool:
    """Whether ``mask`` is one the kernel reads: a bool ``(B or 1, 1, 1, S)`` tensor."""
    return isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1:3] == (1, 1)


def split_kv_decode_attention(
    kernel: Callable,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    shared_mask: SplitKvMask | None = None,
    query_rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``kernel`` (``SplitKvKernel.run``) on ``(B, Hq, 1, D)`` queries on ``(B, Hkv, S, D)`` keys/values, bool mask
    ``(B or 1, 1, 1, S)`` or None (all visible) -> ``(B, 1, Hq, D)``, as SDPA with that mask; a row with no visible key
    outputs zeros. ``shared_mask``: ``split_kv_mask`` of the mask when the caller has it already (a model makes it once
    per mask for all its layers), else made here. ``query_rotation``: ``(cos, sin)``, each ``(B or 1, 1, D)``, to apply
    RoPE to the queries inside the kernel (they arrive unrotated; float64 queries are rotated first, in float64: the
    kernel rotates in float32), or None."""
    if query_rotation is not None and query.dtype not in ROTATION_DTYPES:
        query, query_rotation = with_query_rotation(query, query_rotation), None
    batch, _, _, head_dim = query.shape
    slots = key.shape[2]
    if shared_mask is None:
        shared_mask = split_kv_mask(attention_mask, batch, slots, query.device)
    kv_heads = key.shape[1]
    launch = launch_config(
        batch, kv_heads, query.shape[1] // kv_heads, head_dim, slots, query.dtype.itemsize, processors(query.device)
    )
    scale = head_dim**-0.5 if scaling is None else scaling
    return kernel(query, key, value, *shared_mask, scale, *launch, *(query_rotation or ()))


def split_kv_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    kernel: SplitKvKernel | None,
    shared_mask: SplitKvMask | None = None,
    query_rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature (with ``kernel`` bound): the split-KV kernel for decoding,
    ``sdpa_packed_gqa`` otherwise. ``shared_mask``: the mask's ``split_kv_mask``, where the caller made it once for
    several layers. ``query_rotation``: ``(cos, sin)`` of RoPE still to apply to the queries (an LCKV condensed layer
    hands them over where the kernel runs, ``KernelSelection.split_kv_decodes``): inside the kernel, else first."""
    if runs_split_kv(kernel, query, key, attention_mask, dropout):
        output = split_kv_decode_attention(
            kernel.run, query, key, value, attention_mask, scaling, shared_mask, query_rotation
        )
        return output, None
    query = with_query_rotation(query, query_rotation)
    return packed_sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register_split_kv() -> None:
    """Make ``attn_implementation="sdpa_split_kv"`` available to every transformers model (SDPA's bool masks), with the
    kernel this process can run now (an LCKV model uses the one of its own ``KernelSelection``). Called by
    ``import models``."""
    ALL_ATTENTION_FUNCTIONS.register(SPLIT_KV, partial(split_kv_sdpa_attention, kernel=load_split_kv_kernel()))
    ALL_MASK_ATTENTION_FUNCTIONS.register(SPLIT_KV, sdpa_mask)
