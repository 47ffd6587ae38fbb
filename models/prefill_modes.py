"""The prefill modes of ``config.prefill`` and the rule behind ``"auto"`` (pure functions, no model).

``"iterative"`` runs the cyclic block ``num_encoders + 1`` times over the whole prompt; ``"sequential"`` feeds
the prompt token by token (``models.sequential_prefill``); ``"auto"`` picks the cheaper one.
"""

PREFILL_MODES = ("iterative", "sequential", "auto")

# "auto" rule, from the crossover measured on an 80 GB H100 (tinyllama shape, prompt 2048, bf16, README "Exact
# prefill"): the iterative prefill costs ~95 ms per sequence (48.9 s at batch 512, 0.25 s at batch 1); the sequential
# one ~20.5 s at batch 1 (host-bound steps) and at batch 512 (GPU-bound steps), so sequential wins from ~215
# sequences. Prompts no longer than the iterations are exact iteratively and cost at most T passes: iterative.
SEQUENTIAL_MIN_BATCH = 256


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
