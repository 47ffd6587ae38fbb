"""The prefill modes of ``config.prefill`` and the rule behind ``"auto"`` (pure functions, no model).

``"iterative"`` runs the cyclic block ``num_encoders + 1`` times over the whole prompt; ``"sequential"`` feeds
the prompt token by token (``models.sequential_prefill``); ``"auto"`` picks the cheaper one.
"""

PREFILL_MODES = ("iterative", "sequential", "auto")

# "auto" rule (provisional, from arithmetic; to be replaced by the GPU crossover, see README). The iterative prefill
# is compute-bound and costs about k = 8 times a Llama's FLOPs; a sequential step costs the larger of one pass over
# the weights (bandwidth) and the batch's compute for one token. Sequential wins when B * F / R > floor / k, which
# for bf16 weights is B > R / (k * bandwidth) = 990 TFLOP/s / (8 * 3.35 TB/s) ~ 37 on an H100, more where the step
# has a launch floor above the weight read (small models). Prompts no longer than the iterations are exact
# iteratively and cost at most T passes, so they stay iterative.
SEQUENTIAL_MIN_BATCH = 64


def check_prefill_mode(value: str) -> None:
    """One-line ValueError naming the field, the value and the allowed values."""
    if value not in PREFILL_MODES:
        raise ValueError(f"prefill: {value!r}; allowed values are {', '.join(PREFILL_MODES)}")


def choose_prefill(mode: str, batch_size: int, prompt_length: int, num_iterations: int) -> str:
    """The prefill path, ``"iterative"`` or ``"sequential"``, for ``mode`` (``"auto"`` decides by cost).

    >>> choose_prefill("auto", 512, 2048, 9), choose_prefill("auto", 8, 2048, 9), choose_prefill("auto", 512, 9, 9)
    ('sequential', 'iterative', 'iterative')
    """
    check_prefill_mode(mode)
    if mode != "auto":
        return mode
    return "sequential" if prompt_length > num_iterations and batch_size >= SEQUENTIAL_MIN_BATCH else "iterative"
