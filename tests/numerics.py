"""Tolerances of the oracle tests: float64 comparisons at one tolerance near float64's, float32 ones at a stated bound.

**float64.** A float64 model computes in float64 throughout (``models/kernels/plain.py``), and so did the original
code when its reference outputs were made (``tests/fixtures/make``). Two float64 computations of the same function
differ by rounding, ~1e-16 relative per operation, amplified by how sensitive the function is: measured on the
reference cases at most 3.9e-11 (``top_mha``'s decode, the most sensitive: 3.9e-11 with ATen's default CPU kernels on
one thread, 9.7e-12 with its AVX2 kernels on 3 threads, 2.1e-11 with AVX512 on 4), mostly below 1e-13.
``FLOAT64_ATOL = 1e-9`` covers that on any machine and is far below the differences of formula the tests tell apart
(one iteration fewer changes logits by more than 1e-3).

**float32.** float32 results differ from the exact ones by rounding that depends on the machine (vector width, thread
count, library). The bound is derived, in float64, from the computation itself: ``float32_error_bound`` runs it with
every rounding operation's result (pointwise ops, reductions, matrix products, softmax, attention) multiplied by
``1 + u * r``, ``u = 2**-24`` (float32's unit roundoff: the relative error of one float32 rounding), ``r`` uniform in
[-1, 1] from a seeded generator (deterministic), for ``SEEDS`` seeds, and takes the largest change of the output: how
much the function amplifies float32-sized errors at every step (``top_mha``'s amplification along the sequence
included). That models one rounding per operation; a float32 reduction of ``n`` terms rounds ``n`` times, which
grows its error like ``sqrt(n) * u`` (at most ``n * u``): the longest reductions here have 128 terms (sqrt = 11.3),
hence ``SAFETY_FACTOR = 16``. Measured (docs/checkpoint_formats.md): float32 results use at most 0.21 of the bound
(``max |float32 - float64| / bound``); the bound is 2.5e-4 to 2.3e-3 on the well-conditioned cases and 1.8e-2 to 0.23
on ``top_mha``.
"""

from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

FLOAT64_ATOL = 1e-9
FLOAT32_UNIT_ROUNDOFF = 2.0**-24
SAFETY_FACTOR = 16
SEEDS = (0, 1)
# Ops without a pointwise/reduction tag that round: matrix products, softmax, fused attention.
ROUNDING_OPS = {"mm", "addmm", "bmm", "baddbmm", "_softmax", "_scaled_dot_product_flash_attention_for_cpu"}
FINITE_LIMIT = 1e300  # mask fill values (finfo.min) are not perturbed: they would overflow to -inf
LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


class LowPrecisionSpy(TorchDispatchMode):
    """Counts, per op, the float32/bf16/fp16 tensors produced between the input embedding and ``lm_head`` of each
    forward (``found``: op name -> count); a float64 model should produce none."""

    def __init__(self, model):
        super().__init__()
        self.found, self.armed = Counter(), False
        model.get_input_embeddings().register_forward_pre_hook(lambda *_: setattr(self, "armed", True))
        model.lm_head.register_forward_pre_hook(lambda *_: setattr(self, "armed", False))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if self.armed and any(isinstance(t, torch.Tensor) and t.dtype in LOW_PRECISION for t in tree_leaves(result)):
            self.found[str(func)] += 1
        return result


def rounds(func) -> bool:
    """Whether an aten op computes a rounded result (not a view, copy or in-place write)."""
    if func.is_view or func._schema.is_mutable:
        return False
    tags = set(func.tags)
    return torch.Tag.pointwise in tags or torch.Tag.reduction in tags or func._overloadpacket.__name__ in ROUNDING_OPS


class RoundoffPerturbation(TorchDispatchMode):
    """Multiplies every floating result of a rounding op by ``1 + unit_roundoff * r``, ``r ~ U[-1, 1]`` (seeded)."""

    def __init__(self, seed: int, unit_roundoff: float = FLOAT32_UNIT_ROUNDOFF):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)
        self.unit_roundoff = unit_roundoff

    def _perturb(self, value):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return value
        noise = torch.rand(value.shape, generator=self.generator, dtype=value.dtype).to(value.device) * 2 - 1
        return torch.where(value.abs() < FINITE_LIMIT, value * (1 + self.unit_roundoff * noise), value)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        return tree_map(self._perturb, result) if rounds(func) else result


def float32_error_bound(compute: Callable[[], torch.Tensor]) -> float:
    """``SAFETY_FACTOR`` times the largest change of ``compute()`` (a float64 computation) when every rounding op's
    result is perturbed by float32's unit roundoff (see the module docstring)."""
    exact = compute()
    change = 0.0
    for seed in SEEDS:
        with RoundoffPerturbation(seed):
            change = max(change, (compute() - exact).abs().max().item())
    return SAFETY_FACTOR * change


def max_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()
