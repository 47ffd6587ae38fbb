"""Rooflines: what a forward costs at a GPU's peak matrix rate and HBM bandwidth (pure functions of config shapes).

``prefill="auto"`` (``models.prefill_modes``) compares the two prefill paths with them; ``test_latency.py`` states
its rooflines with them. docs/design.md ("Where LCKV's speed comes from") gives the same formulas.

Notation: ``B`` batch, ``T`` prompt tokens, ``L`` layers, ``Hq`` / ``Hkv`` query / KV heads, ``D`` head dim,
``b`` bytes per value (2 in bf16), ``P_i`` the weights of layer ``i``'s matrix multiplies (``q``, ``o``, the
MLP's three, and ``k``, ``v`` where the layer computes its own KVs), ``k = min(num_encoders + 1, T)`` iterations.
A pass costs ``max(FLOPs / peak rate, bytes / bandwidth)``: its matrix work and its reads overlap at best.
"""

import math
from dataclasses import dataclass
from functools import cache as memoize

import torch

from .kernels import cuda_index
from .layer_plan import layer_plan

# What a CUDA-graph-captured token step costs per layer beyond its roofline (kernel launch gaps and tails): the
# batch-1 sequential prefill of a 2048-token prompt, tinyllama-shape LCKV model (22 layers), took 2.78 s on an H200
# (bench/measure_prefill.py, bench/results/prefill_h200): 1.36 ms per token step against a roofline of about
# 0.41 ms, so (1.36 - 0.41) / 22 = 43 us per layer.
STEP_OVERHEAD_PER_LAYER_S = 43e-6


@dataclass(frozen=True)
class Hardware:
    """A GPU's HBM bandwidth (bytes/s), its dense bf16 matrix rate (FLOP/s) and the per-layer overhead of a captured
    token step (s)."""

    name: str
    hbm_bandwidth: float
    peak_flops: float
    step_overhead_per_layer: float = STEP_OVERHEAD_PER_LAYER_S


# Datasheet figures, matched against torch.cuda.get_device_name() (every listed substring, case-insensitive); the
# first match wins, so the more specific names come first.
GPUS: tuple[tuple[tuple[str, ...], Hardware], ...] = (
    (("H200",), Hardware("H200", 4.8e12, 989e12)),
    (("H100", "PCIe"), Hardware("H100 PCIe", 2.0e12, 756e12)),
    (("H100",), Hardware("H100 SXM", 3.35e12, 989e12)),
    (("A100", "40GB"), Hardware("A100 40GB", 1.555e12, 312e12)),
    (("A100",), Hardware("A100 80GB", 2.0e12, 312e12)),
)
UNKNOWN_GPU = Hardware("unknown GPU (H100 SXM figures)", 3.35e12, 989e12)


def gpu_hardware(device_name: str) -> Hardware:
    """The table's entry for a CUDA device name, ``UNKNOWN_GPU`` when none matches.

    >>> gpu_hardware("NVIDIA H100 80GB HBM3").name, gpu_hardware("NVIDIA A100-SXM4-40GB").name
    ('H100 SXM', 'A100 40GB')
    """
    name = device_name.casefold()
    return next((hw for keys, hw in GPUS if all(key.casefold() in name for key in keys)), UNKNOWN_GPU)


@memoize
def _cuda_hardware(index: int) -> Hardware:
    return gpu_hardware(torch.cuda.get_device_name(index))


def device_hardware(device: torch.device) -> Hardware | None:
    """The GPU behind ``device`` (looked up once per device), None for a device that is not CUDA."""
    if device.type != "cuda":
        return None
    return _cuda_hardware(cuda_index(device))


@dataclass(frozen=True)
class Shape:
    """What the rooflines need of a config: per layer its matrix weights ``P_i`` and, of them, its K/V projections'
    (0 for a layer reading another layer's KVs); heads; the layer plan's iteration structure."""

    layer_weights: tuple[int, ...]
    layer_kv_weights: tuple[int, ...]
    query_heads: int
    kv_heads: int
    head_dim: int
    block: range  # the cyclic block (empty: no iterations)
    num_iterations: int  # num_encoders + 1

    @property
    def num_layers(self) -> int:
        return len(self.layer_weights)

    def kv_read_bytes_per_token(self, value_bytes: int) -> int:
        """KV bytes all layers read per cached token: each layer reads one layer's ``2 Hkv D b`` (L x that)."""
        return self.num_layers * 2 * self.kv_heads * self.head_dim * value_bytes


def model_shape(config, as_llama: bool = False, tp: int = 1) -> Shape:
    """The ``Shape`` of a Llama or LCKV config; ``as_llama``: of a Llama with the same dimensions; ``tp``: of one of
    ``tp`` tensor-parallel processes, which holds ``1/tp`` of every layer's query heads, KV heads (at least one) and
    MLP features, so its matrix work, weights and KV reads are ``1/tp`` of the model's."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    query_heads, kv_heads = config.num_attention_heads // tp, max(config.num_key_value_heads // tp, 1)
    sources = list(range(layers)) if as_llama else list(getattr(config, "layer_kv_sources", None) or range(layers))
    kv = 2 * hidden * kv_heads * head_dim
    shared = 2 * hidden * query_heads * head_dim + 3 * hidden * config.intermediate_size // tp  # q, o, MLP
    kv_weights = tuple(kv if source == i else 0 for i, source in enumerate(sources))
    return Shape(
        layer_weights=tuple(shared + w for w in kv_weights),
        layer_kv_weights=kv_weights,
        query_heads=query_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        block=layer_plan(sources).block,
        num_iterations=1 if as_llama else getattr(config, "num_encoders", 0) + 1,
    )


@dataclass(frozen=True)
class Cost:
    """Matrix FLOPs and HBM bytes of some work."""

    flops: float
    bytes: float

    def seconds(self, hardware: Hardware) -> float:
        """``max(flops / peak rate, bytes / bandwidth)``."""
        return max(self.flops / hardware.peak_flops, self.bytes / hardware.hbm_bandwidth)


def attention_flops(shape: Shape, queries: float, keys: float) -> float:
    """``4 Hq D`` per query-key pair (``QK^T`` and ``PV``, 2 FLOPs per multiply-add) of one layer."""
    return 4 * shape.query_heads * shape.head_dim * queries * keys


def parallel_prefill_cost(shape: Shape, batch: int, length: int, value_bytes: int = 2) -> Cost:
    """One pass of every layer over the prompt, as a Llama prefills (``shape`` of a Llama):
    ``FLOPs = 2 B T sum_i P_i + L 4 Hq D B T^2 / 2`` (causal attention: ``T^2 / 2`` pairs per layer),
    ``bytes = b sum_i P_i`` (every weight read once)."""
    weights = sum(shape.layer_weights)
    return Cost(
        flops=2 * batch * length * weights + shape.num_layers * attention_flops(shape, batch * length, length / 2),
        bytes=value_bytes * weights,
    )


def extra_iterations(shape: Shape, length: int) -> int:
    """Passes of the cyclic block beyond the first in an iterative prefill of ``length`` tokens: ``k - 1`` with
    ``k = min(num_encoders + 1, T)``; 0 without a block (a Llama)."""
    return min(shape.num_iterations, length) - 1 if shape.block else 0


def full_layer_runs(shape: Shape, length: int) -> int:
    """Layer runs with queries and attention of an iterative prefill of ``length`` tokens: ``L + (k - 1) (|block| - 1)``
    with ``k = min(num_encoders + 1, T)`` (the block's last layer computes only its KVs before the last iteration);
    ``L`` for a Llama."""
    return shape.num_layers + extra_iterations(shape, length) * max(len(shape.block) - 1, 0)


def iterative_prefill_cost(shape: Shape, batch: int, length: int, value_bytes: int = 2) -> Cost:
    """The iterative prefill: the layers outside the cyclic block once, the block ``k = min(num_encoders + 1, T)``
    times over the whole prompt, its last layer (the target) computing only its K/V projections in all but the last
    iteration (``OptLlamaModel._run_block``). With ``R`` full layer runs (``L + (k - 1) (|block| - 1)``) and
    ``W = sum_i P_i + (k - 1) (sum_{i in block, not last} P_i + P_kv,last)`` the weights used:
    ``FLOPs = 2 B T W + R 4 Hq D B T^2 / 2``, ``bytes = b W`` (weights read once per layer run)."""
    extra = extra_iterations(shape, length)
    block = list(shape.block)
    weights = sum(shape.layer_weights)
    if block:
        weights += extra * (sum(shape.layer_weights[i] for i in block[:-1]) + shape.layer_kv_weights[block[-1]])
    return Cost(
        flops=2 * batch * length * weights
        + full_layer_runs(shape, length) * attention_flops(shape, batch * length, length / 2),
        bytes=value_bytes * weights,
    )


def token_step_cost(shape: Shape, batch: int, filled: float, value_bytes: int = 2) -> Cost:
    """One token of every sequence through every layer, each layer reading the KV of the ``filled`` tokens cached
    so far (the current one included): ``FLOPs = B (2 sum_i P_i + L 4 Hq D filled)``,
    ``bytes = b sum_i P_i + B filled L 2 Hkv D b`` (the weights once, each layer one layer's KV of every sequence)."""
    weights = sum(shape.layer_weights)
    return Cost(
        flops=batch * (2 * weights + shape.num_layers * attention_flops(shape, 1, filled)),
        bytes=value_bytes * weights + batch * filled * shape.kv_read_bytes_per_token(value_bytes),
    )


def sum_of_max_linear(a0: float, a1: float, b0: float, b1: float, steps: int) -> float:
    """``sum_{t=0}^{steps-1} max(a0 + a1 t, b0 + b1 t)`` in closed form: before the lines cross the one with the
    smaller slope is the larger, after it the other.

    >>> sum_of_max_linear(0, 2, 5, 0, 5)  # 5 + 5 + 5 + 6 + 8
    29.0
    """

    def line_sum(c0: float, c1: float, start: int, stop: int) -> float:  # sum of c0 + c1 t over t in [start, stop)
        return (stop - start) * (c0 + c1 * (start + stop - 1) / 2) if stop > start else 0.0

    if a1 == b1:
        return line_sum(max(a0, b0), a1, 0, steps)
    split = min(max(math.ceil((b0 - a0) / (a1 - b1)), 0), steps)  # the steps t < split lie before the crossing
    before, after = ((a0, a1), (b0, b1)) if a1 < b1 else ((b0, b1), (a0, a1))
    return line_sum(*before, 0, split) + line_sum(*after, split, steps)


def sequential_prefill_seconds(
    shape: Shape, batch: int, length: int, hardware: Hardware, value_bytes: int = 2
) -> float:
    """``T`` captured token steps, step ``t`` (0-based) reading ``t + 1`` filled tokens, each costing its roofline
    plus the fixed overhead of a captured step: ``sum_t max(FLOPs_t / peak, bytes_t / bandwidth) + T L overhead``
    (``token_step_cost``; both terms are linear in ``t``, so the sum has a closed form)."""
    start, slope = token_step_cost(shape, batch, 1, value_bytes), token_step_cost(shape, batch, 2, value_bytes)
    compute = (start.flops / hardware.peak_flops, (slope.flops - start.flops) / hardware.peak_flops)
    memory = (start.bytes / hardware.hbm_bandwidth, (slope.bytes - start.bytes) / hardware.hbm_bandwidth)
    steps = sum_of_max_linear(*compute, *memory, length)
    return steps + length * shape.num_layers * hardware.step_overhead_per_layer


def decode_roofline_seconds(
    weight_bytes: int, kv_bytes_per_token: int, batch: int, prompt_length: int, steps: int, bandwidth: float
) -> float:
    """``steps`` decode steps after a prompt, each reading every weight once and, per sequence, the KV of the tokens
    filled so far in every layer: step ``j = 1..steps`` reads ``prompt_length + j`` tokens, so
    ``(steps W + B kv (steps P + steps (steps + 1) / 2)) / bandwidth``."""
    kv_tokens = steps * prompt_length + steps * (steps + 1) / 2
    return (steps * weight_bytes + batch * kv_bytes_per_token * kv_tokens) / bandwidth
