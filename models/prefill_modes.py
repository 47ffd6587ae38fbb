"""The prefill modes of ``config.prefill`` and the cost model behind ``"auto"`` (pure functions, no model).

``"iterative"`` runs the cyclic block ``num_encoders + 1`` times over the whole prompt; ``"sequential"`` feeds
the prompt token by token (``models.sequential_prefill``); ``"auto"`` picks the one that costs less for the config,
batch, prompt length and GPU, from the rooflines of ``models.roofline`` (docs/design.md, section 8):

- iterative: ``ITERATIVE_SLOWDOWN x max(FLOPs / peak rate, bytes / bandwidth)`` of the whole iterative pass
  (``iterative_prefill_cost``: matrix work of every layer run, attention over ``T^2 / 2`` pairs per layer run,
  weights read once per layer run);
- sequential: ``sum_t max(FLOPs_t / peak rate, bytes_t / bandwidth) + T L overhead`` over its ``T`` captured token
  steps (``sequential_prefill_seconds``: step ``t`` reads the weights and, in every layer, the KV filled so far).
"""

from .roofline import Hardware, iterative_prefill_cost, model_shape, sequential_prefill_seconds

PREFILL_MODES = ("iterative", "sequential", "auto")

# How much slower than its roofline the iterative prefill runs (launch-bound passes, attention and matrix work not
# overlapped), measured on an H200 with the tinyllama shape, prompt 2048, bf16 (bench/measure_prefill.py,
# bench/results/prefill_h200): 3.9x at batch 32, 3.8x at batch 256 and 512 (2.8x at batch 512 on an H100).
ITERATIVE_SLOWDOWN = 3.8


def check_prefill_mode(value: str) -> None:
    """One-line ValueError naming the field, the value and the allowed values."""
    if value not in PREFILL_MODES:
        raise ValueError(f"prefill: {value!r}; allowed values are {', '.join(PREFILL_MODES)}")


def prefill_seconds(
    config, batch_size: int, prompt_length: int, hardware: Hardware, value_bytes: int = 2, tp: int = 1
) -> dict[str, float]:
    """The cost model's seconds of each path (``"iterative"``, ``"sequential"``) for an LCKV ``config``, on one of
    ``tp`` tensor-parallel processes."""
    shape = model_shape(config, tp=tp)
    return {
        "iterative": ITERATIVE_SLOWDOWN
        * iterative_prefill_cost(shape, batch_size, prompt_length, value_bytes).seconds(hardware),
        "sequential": sequential_prefill_seconds(shape, batch_size, prompt_length, hardware, value_bytes),
    }


def choose_prefill(
    mode: str,
    config,
    batch_size: int,
    prompt_length: int,
    hardware: Hardware | None,
    value_bytes: int = 2,
    captured: bool = True,
    tp: int = 1,
) -> str:
    """The prefill path, ``"iterative"`` or ``"sequential"``, for ``mode``; ``"auto"`` takes the one
    ``prefill_seconds`` finds cheaper on ``hardware`` (for one of ``tp`` tensor-parallel processes).

    ``"auto"`` stays iterative without a GPU to price (``hardware`` None: a CPU), when the token step is not
    captured (``captured`` False: a dynamic or offloaded cache steps eagerly, at a host cost the model does not
    price) and for prompts no longer than the iterations (then the iterative prefill is exact as well).
    """
    check_prefill_mode(mode)
    if mode != "auto":
        return mode
    if hardware is None or not captured or prompt_length <= config.num_encoders + 1:
        return "iterative"
    seconds = prefill_seconds(config, batch_size, prompt_length, hardware, value_bytes, tp)
    return "sequential" if seconds["sequential"] < seconds["iterative"] else "iterative"
