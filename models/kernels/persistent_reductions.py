"""One-pass ("persistent") row reductions in inductor's kernels for rows of up to ``WIDE_ROW_LIMIT`` values.

Inductor reduces a row either persistently (the whole row held in registers: one read of it) or in a loop over chunks
of the row. A decode step's RMSNorm (with the residual add before it) reduces each row of ``hidden_size`` values for
its mean square and then scales the same values; in the looped form the second pass reads the row again.
``InductorChoices.should_use_persistent_reduction`` loops above 1024 values along the row, so at TinyLlama's 2048
(and every larger hidden size) each of a step's 45 norms read its input twice. ``WidePersistentReductions`` keeps the
default where it says "persistent" and says so too for inner reductions (along the contiguous dimension) of up to
``WIDE_ROW_LIMIT`` values (a float32 row of 8192 values is 32 KB of one program's registers).

What it changes is the order of the float32 sum of squares (one tree over the row instead of per-chunk partial sums
added at the end): results equal to rounding. Measured on an H200 (docs/fast_decode.md, "One-pass norms"): the
TinyLlama batch-1 step 2.6-2.8% shorter (medians), batch 128 unchanged.

``enable_wide_persistent_reductions()`` installs it for what the calling thread compiles from then on (the tools
compile in their main thread): through ``inductor_config.inductor_choices_class`` (part of the compiled-graph cache
key, so a graph compiled without it is not reused, and the other way round; torch 2.13 keeps inductor's config per
thread, 2.11 for the process) and as the thread's choices handler (inductor keeps the first handler a thread used).
"""

from typing import Any

from torch._inductor import config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

WIDE_ROW_LIMIT = 8192  # LLaMA-65B's hidden size; TinyLlama 2048, Llama-2-7B 4096, LLaMA-33B 6656


class WidePersistentReductions(InductorChoices):
    """Inductor's heuristics, with persistent inner reductions up to ``WIDE_ROW_LIMIT`` values along the row."""

    @staticmethod
    def should_use_persistent_reduction(features: Any, cooperative_reduction: bool) -> bool:
        """Inductor's choice, or an inner reduction of at most ``WIDE_ROW_LIMIT`` values (known when compiling) where
        persistent reductions are on and the reduction is not split over programs (cooperative)."""
        if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
            return True
        return (
            inductor_config.triton.persistent_reductions
            and not cooperative_reduction
            and features.get_reduction_hint() == ReductionHint.INNER
            and V.graph.sizevars.statically_known_leq(features.reduction_numel, WIDE_ROW_LIMIT)
        )

    def uuid(self) -> str:
        """What the compiled-graph cache key records of this choice (``inductor_choices_class``)."""
        return f"{__name__}.{type(self).__name__}:{WIDE_ROW_LIMIT}"


def supports_wide_persistent_reductions() -> bool:
    """Whether this torch's inductor takes a choices class in its config (and its cache key), and no other one is set
    (another library's heuristics, which this would replace)."""
    if not hasattr(inductor_config, "inductor_choices_class"):
        return False
    return inductor_config.inductor_choices_class in (None, WidePersistentReductions)


def enable_wide_persistent_reductions() -> None:
    """``WidePersistentReductions`` for every step the calling thread compiles from now on (the whole process on a
    torch whose inductor config is not per thread)."""
    inductor_config.inductor_choices_class = WidePersistentReductions
    V.set_choices_handler(WidePersistentReductions())
