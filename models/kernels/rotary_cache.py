"""A decode step's RoPE and cache write in one kernel (``triton_rotary_cache.py``): ``rotate_and_cache``; its RoPE
tables in one kernel (``triton_rotary_tables.py``): ``RotaryTablesMixin``.

An attention layer with its own KVs, at one token per row, rotates its queries and keys and then updates its cache
layer (``StaticLayer.update``: the new keys and values written at the layer's fill level ``cumulative_length``, which
then grows by one). ``rotate_and_cache`` does it with one kernel (the level's growth included, but for layer 0's)
where the cache layer is transformers' plain ``StaticLayer`` (the static cache of a compiled decode step), and
returns None everywhere else, where the caller rotates and calls ``cache.update`` as before: several tokens, another
cache layer (dynamic, sliding window, offloaded, staged LCKV layers), a gradient wanted, float64 (the kernel computes
in float32), a device the kernel does not run on. ``fused_projections.fuse_projections`` gives the attention modules
it fuses the kernel (``give_rotary_cache``: the module's ``rotary_cache``, and the kernel's counter as the module's
buffer ``rotary_cache_arrivals``, so that it moves with the module and a compiled step reads it as an input like the
cache), so ``--fused_projections`` turns it on for an LCKV model and a Llama alike. The attention classes take it
through ``RotaryCacheMixin``.

The counter is zero between launches: the last program of a launch to arrive sets it back to zero. So a module decodes
on one CUDA stream at a time (two launches sharing the counter at once would miscount), and ``RotaryCacheMixin`` zeroes
it after every conversion of the module (``.to()``, ``.to_empty()``, ``.cuda()``), whose new memory need not be zero.

``fuse_projections`` also gives the model's rotary embedding a kernel computing the step's cos/sin tables
(``RotaryTablesMixin``, ``triton_rotary_tables.py``): compiled, the tables were otherwise recomputed in every layer
that reads them.

The kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` is set before the first
``load_rotary_cache_kernel()`` (tests run the real kernel that way).
"""

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import nn
from transformers.cache_utils import Cache, StaticLayer
from transformers.modeling_rope_utils import dynamic_rope_update

from .flags import triton_devices

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class RotaryCacheKernel(NamedTuple):
    """The ops (``triton_rotary_cache.rotary_cache_write``, ``rotary_cache_write_advance``, which also advances the
    fill level, and ``triton_rotary_tables.rotary_tables``) and the device types they run on. A module holds it: copied
    as itself, pickled as "load it again" (a compiled op does not pickle)."""

    run: Callable
    run_advancing: Callable
    devices: frozenset[str]
    tables: Callable

    def __deepcopy__(self, memo: dict) -> "RotaryCacheKernel":
        return self

    def __reduce__(self):
        return load_rotary_cache_kernel, ()


def load_rotary_cache_kernel(environ: Mapping[str, str] | None = None) -> RotaryCacheKernel | None:
    """The kernel for the devices it can run on: CUDA, and the CPU under ``TRITON_INTERPRET=1`` of ``environ`` (default
    ``os.environ``); None without Triton or without either."""
    devices = triton_devices(environ)
    if not devices:
        return None
    from .triton_rotary_cache import rotary_cache_write, rotary_cache_write_advance
    from .triton_rotary_tables import rotary_tables

    return RotaryCacheKernel(rotary_cache_write, rotary_cache_write_advance, devices, rotary_tables)


def give_rotary_cache(module: nn.Module, kernel: RotaryCacheKernel | None) -> None:
    """Let ``module``, an attention writing its KVs into a cache, run ``kernel``: ``module.rotary_cache``, and the
    kernel's counter (int32 zero) as the non-persistent buffer ``module.rotary_cache_arrivals`` on the device of the
    module's parameters. Nothing where ``kernel`` is None."""
    if kernel is None:
        return
    module.rotary_cache = kernel
    device = next(module.parameters()).device
    module.register_buffer("rotary_cache_arrivals", torch.zeros(1, dtype=torch.int32, device=device), persistent=False)


class RotaryCacheMixin:
    """For an attention module with its own KVs that ``fuse_projections`` may give the kernel (``give_rotary_cache``):
    ``rotate_into_cache`` runs it with the module's kernel, counter and layer index, and a conversion of the module
    leaves the counter zero (``to_empty()`` makes it of uninitialised memory, which the kernel would miscount)."""

    rotary_cache: RotaryCacheKernel | None = None  # set by give_rotary_cache, with its rotary_cache_arrivals buffer
    layer_idx: int

    def _apply(self, fn, recurse: bool = True):
        module = super()._apply(fn, recurse)
        arrivals = getattr(self, "rotary_cache_arrivals", None)
        if arrivals is not None:
            arrivals.zero_()
        return module

    def rotate_into_cache(
        self, cache: Cache | None, qkv: tuple[torch.Tensor, ...], position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``rotate_and_cache`` of ``qkv`` (queries, keys, values) with ``position_embeddings`` (cos, sin) and this
        module's kernel, counter and layer."""
        arrivals = getattr(self, "rotary_cache_arrivals", None)
        return rotate_and_cache(self.rotary_cache, arrivals, cache, self.layer_idx, *qkv, *position_embeddings)


class RotaryTablesMixin:
    """For a rotary embedding (transformers' ``LlamaRotaryEmbedding``, ``PlainRotaryEmbedding``) that
    ``fuse_projections`` gives the kernels (``rotary_cache``): ``forward(x, position_ids (B, T))`` -> ``cos``, ``sin``
    ``(B, T, D)`` in ``x``'s dtype from one kernel (``triton_rotary_tables.py``: an opaque op, so a compiled step
    computes the tables once and every layer reads them) where it applies: tables computed in float32 (``x`` in
    ``DTYPES``) from integer positions on a device the kernel runs on. The class's own forward everywhere else."""

    rotary_cache: RotaryCacheKernel | None = None  # set by fuse_projections
    inv_freq: torch.Tensor
    attention_scaling: float

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kernel = self.rotary_cache
        if (
            kernel is None
            or x.device.type not in kernel.devices
            or x.dtype not in DTYPES
            or position_ids.device != x.device
            or position_ids.dtype.is_floating_point
            or position_ids.dim() != 2
        ):
            return super().forward(x, position_ids)
        return self.kernel_tables(x, position_ids)

    @dynamic_rope_update  # as the class's forward: a dynamic RoPE updates inv_freq for the length first
    def kernel_tables(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's ``cos``, ``sin`` ``(B, T, D)`` in ``x``'s dtype."""
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float32).contiguous()
        return self.rotary_cache.tables(position_ids, inv_freq, float(self.attention_scaling), x.dtype)


def writable_layer(
    kernel: RotaryCacheKernel | None,
    cache: Cache | None,
    layer_idx: int,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
) -> StaticLayer | None:
    """Layer ``layer_idx`` of ``cache`` when ``kernel`` may rotate ``queries`` and ``keys`` and write ``keys`` and
    ``values`` ``(B, Hkv, T, D)`` into it itself: one token, no gradient wanted, a plain initialized ``StaticLayer``
    of the same shape, dtype and device in a cache that is not offloaded, with a free slot (checked on the host outside
    a compiled step; inside one, the kernel writes nothing past the last slot); else None."""
    if kernel is None or cache is None or keys.device.type not in kernel.devices or keys.shape[-2] != 1:
        return None
    if keys.dtype not in DTYPES or keys.shape[-1] % 2 or getattr(cache, "offloading", False):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (queries, keys, values)):
        return None
    layer = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
    if type(layer) is not StaticLayer or not layer.is_initialized:
        return None
    for new, cached in ((keys, layer.keys), (values, layer.values)):
        if new.dtype != cached.dtype or new.device != cached.device:
            return None
        if new.shape[:2] != cached.shape[:2] or new.shape[-1] != cached.shape[-1]:
            return None
    if not torch.compiler.is_compiling() and int(layer.cumulative_length) >= layer.max_cache_len:
        return None  # full: StaticLayer.update raises
    return layer


def rotate_and_cache(
    kernel: RotaryCacheKernel | None,
    arrivals: torch.Tensor | None,
    cache: Cache | None,
    layer_idx: int,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """RoPE on ``queries`` ``(B, Hq, 1, D)`` and ``keys`` ``(B, Hkv, 1, D)`` (``cos``/``sin`` ``(B, 1, D)``) and
    ``cache.update(keys, values, layer_idx)`` in one kernel (``arrivals``: the module's ``rotary_cache_arrivals``;
    without it on the keys' device the level is advanced after the kernel); returns the rotated queries and keys and
    the layer's cached keys and values ``(B, Hkv, S, D)``, as the two steps would. None where ``writable_layer`` says
    no: nothing is done, the caller runs the two steps."""
    layer = writable_layer(kernel, cache, layer_idx, queries, keys, values)
    if layer is None:
        return None
    inputs = (queries, keys, values, cos, sin, layer.keys, layer.values, layer.cumulative_length)
    # Layer 0's fill level is the cache's length (``Cache.get_seq_length``), read for the step's positions and masks:
    # advanced inside the kernel, it made inductor make every layer's mask again after that write (45 more kernels in
    # a compiled TinyLlama Llama step); advanced after the kernel, the masks are made once, up front.
    if layer_idx != 0 and arrivals is not None and arrivals.device == keys.device:
        rotated_queries, rotated_keys = kernel.run_advancing(*inputs, arrivals)
    else:
        rotated_queries, rotated_keys = kernel.run(*inputs)
        layer.cumulative_length.add_(keys.shape[-2])
    return rotated_queries, rotated_keys, layer.keys, layer.values
