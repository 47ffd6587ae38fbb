"""Linear layers of decode steps through Triton kernels: ``SmallBatchLinear``. One row runs the GEMV
(``triton_gemv.py``; as a fused gate/up projection, one row may also come out as ``silu(gate) * up`` from the same
kernel: ``SmallBatchLinear.silu_gated``); more rows run the skinny GEMM (``triton_skinny_gemm.py``) only for the
shapes its measured table names (``skinny_gemm_launch.TUNED``), and cuBLAS otherwise.

Decoding at batch 1 multiplies each weight matrix by one row, so a step's time is the weights' bytes over the
memory bandwidth; cuBLAS's kernels for these shapes leave most multiprocessors idle on hidden sizes of 2048-8192
(docs/performance.md). ``use_small_batch_linear(model)`` turns the model's plain ``nn.Linear`` layers into
``SmallBatchLinear`` in place, for any causal LM (an LCKV model or a transformers Llama): same parameters, same state
dict, and ``F.linear`` for everything the kernels do not cover (more than ``MAX_ROWS`` rows outside the GEMM's table,
training, autocast, a device or dtype they do not run on). One process only: not under tensor parallelism. The
launch is a pure function of the shapes (``gemv_launch``: a measured table, else a rule; ``skinny_gemm_launch``: a
measured table), so a compiled decode step captures one kernel per layer.

The kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` is set before the first
``load_gemv_kernel()`` (tests run the real kernels that way). Their float32 sums run in another order than cuBLAS's:
results agree to rounding, not bit for bit.

Shapes: ``M`` rows (batch x tokens), ``K`` in features, ``N`` out features.
"""

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..tensor_parallel import world_size
from .flags import triton_devices
from .gemv_launch import gemv_launch
from .skinny_gemm_launch import skinny_gemm_launch

# Rows the GEMV takes; more run the skinny GEMM where its table names the shape, else F.linear. Program p computes
# row p % M, so every row's programs read the weight again: on an H200 it ran 1.1-2.0x faster than cuBLAS at one row,
# 2-4x slower at 8 on all but the K/V projection (2-7 rows not measured; docs/fast_decode.md).
MAX_ROWS = 1
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def unit_stride_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` as ``(rows, its last dim)`` with unit stride along that dim: the layout the Triton kernels read."""
    flat = tensor.reshape(rows, tensor.shape[-1])
    return flat if flat.stride(1) == 1 else flat.contiguous()


class GemvKernel(NamedTuple):
    """The GEMV op (``triton_gemv.small_batch_gemv``), the device types it runs on, the skinny GEMM op for more rows
    (``triton_skinny_gemm.skinny_gemm``; None: cuBLAS) and the SiLU-gated GEMV of a fused gate/up weight
    (``triton_gemv.small_batch_silu_gated_gemv``; None: none). A swapped model holds it per layer: copied as itself,
    pickled as "load it again" (a compiled op does not pickle)."""

    run: Callable
    devices: frozenset[str]
    skinny_gemm: Callable | None = None
    silu_gated: Callable | None = None

    def __deepcopy__(self, memo: dict) -> "GemvKernel":
        return self

    def __reduce__(self):
        return load_gemv_kernel, ()


def load_gemv_kernel(environ: Mapping[str, str] | None = None) -> GemvKernel | None:
    """The GEMV for the devices it can run on: CUDA, and the CPU under ``TRITON_INTERPRET=1`` of ``environ`` (default
    ``os.environ``); None without Triton or without either."""
    devices = triton_devices(environ)
    if not devices:
        return None
    from .triton_gemv import small_batch_gemv, small_batch_silu_gated_gemv
    from .triton_skinny_gemm import skinny_gemm

    return GemvKernel(small_batch_gemv, devices, skinny_gemm, small_batch_silu_gated_gemv)


class SmallBatchLinear(nn.Linear):
    """``nn.Linear`` whose products of at most ``MAX_ROWS`` rows run the Triton GEMV, and of more rows the skinny GEMM
    where its measured table names the shape (``skinny_gemm_launch``): ``(..., K) -> (..., N)``."""

    gemv: GemvKernel | None = None  # set by use_small_batch_linear (loaded once, outside any compiled region)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        product = self._product(rows, x) if self._runs_kernels(x) else None
        if product is None:
            return super().forward(x)
        op, launch = product
        return self._run(op, launch, x, rows)

    def silu_gated(self, x: torch.Tensor) -> torch.Tensor | None:
        """``silu(gate) * up`` of this layer's product of ``x`` ``(..., K)``, whose out features are a fused gate/up
        pair (gate rows, then up rows, no bias) -> ``(..., N / 2)`` from one GEMV; None where that kernel does not run
        (the caller splits ``forward(x)`` itself)."""
        rows = x.numel() // self.in_features
        if not self._runs_kernels(x) or self.gemv.silu_gated is None or rows > MAX_ROWS or self.bias is not None:
            return None
        launch = gemv_launch(rows, self.out_features, self.in_features, x.dtype.itemsize)
        return None if launch.block_n % 2 else self._run(self.gemv.silu_gated, launch, x, rows)

    def _runs_kernels(self, x: torch.Tensor) -> bool:
        """Whether a Triton kernel may compute this layer's product of ``x`` (else ``F.linear``)."""
        kernel = self.gemv
        return not (
            kernel is None
            or x.device.type not in kernel.devices
            or x.dtype not in DTYPES
            or x.dtype != self.weight.dtype
            or not self.weight.is_contiguous()
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))  # no backward here
            or torch.is_autocast_enabled(x.device.type)  # F.linear casts; the Triton kernels would not
        )

    def _run(self, op: Callable, launch: tuple[int, ...], x: torch.Tensor, rows: int) -> torch.Tensor:
        """``op`` on ``x`` as ``(rows, x's last dim)`` with unit stride along it, ``(..., op's out width)`` back, plus
        the bias."""
        out = op(unit_stride_rows(x, rows), self.weight, *launch)
        out = out.view(*x.shape[:-1], out.shape[-1])
        return out if self.bias is None else out + self.bias

    def _product(self, rows: int, x: torch.Tensor) -> tuple[Callable, tuple[int, ...]] | None:
        """The Triton op and launch for ``rows`` rows of ``x``: the GEMV up to ``MAX_ROWS``, else the skinny GEMM where
        its table names the shape; None: ``F.linear``."""
        kernel, value_bytes = self.gemv, x.dtype.itemsize
        if rows <= MAX_ROWS:
            return kernel.run, gemv_launch(rows, self.out_features, self.in_features, value_bytes)
        launch = skinny_gemm_launch(rows, self.out_features, self.in_features, value_bytes)
        return None if launch is None or kernel.skinny_gemm is None else (kernel.skinny_gemm, launch)


def use_small_batch_linear(model: nn.Module, kernel: GemvKernel | None = None) -> int:
    """Make every plain ``nn.Linear`` of ``model`` a ``SmallBatchLinear`` running ``kernel`` (default
    ``load_gemv_kernel()``), in place; the number of layers changed: 0 where no kernel runs on the model's device, and
    under tensor parallelism (its sharded layers keep ``nn.Linear``'s forward whatever their class)."""
    kernel = kernel or load_gemv_kernel()
    device = next(model.parameters()).device
    if kernel is None or device.type not in kernel.devices or world_size() > 1:
        return 0
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear and not isinstance(module.weight, DTensor):
            module.__class__ = SmallBatchLinear
            module.gemv = kernel
            changed += 1
    return changed
