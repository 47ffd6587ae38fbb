"""Measurement helpers the tools and the benchmarks share: per-token and compiled-step timers, the random model the
benchmarks decode with, KV bytes a cache holds, streaming perplexity, the baseline of ratios, configs sized for a
length."""

import math
import sys
import time

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, Cache, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin
from transformers.generation.streamers import BaseStreamer

from models.cache_streaming import SinkWindowCache
from models.fast_decode import enable_fast_decode
from models.tensor_parallel import build_sharded, check_heads_split, world_size

from . import cli


class StepTimer(BaseStreamer):
    """Streamer that records a timestamp per generated token and drives a progress bar.

    ``generate`` hands over tokens already copied to the host, which waited for them: the timestamp is when the
    token exists, with no synchronisation here (one would also wait for the steps a captured decode loop has queued
    since, ``models.fast_decode``, whose tokens arrive in bursts: the first right after the prefill, the last at the
    end, so the mean step between them is exact).
    """

    def __init__(self, bar: tqdm):
        self.bar, self.times = bar, []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) > 1:  # the first put is the prompt
            self.bar.update(1)

    def end(self) -> None:
        pass


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for on a CPU), so a host clock times it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profiler_activities(device: torch.device) -> list[torch.profiler.ProfilerActivity]:
    """What ``torch.profiler`` records for work on ``device``: CPU ops, and CUDA kernels on a GPU."""
    cuda = [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    return [torch.profiler.ProfilerActivity.CPU, *cuda]


def build_random_model(
    config: PretrainedConfig, dtype: torch.dtype, device: str, attn_implementation: str
) -> PreTrainedModel:
    """A causal LM of ``config`` with random weights, as the benchmarks decode with it: under ``torchrun`` sharded over
    the processes, each building its shard on its own device (``build_sharded``); else built directly on ``device`` (a
    30B model initialised on the CPU takes minutes). In eval mode, with generate's captured decoding loop
    (``enable_fast_decode``), a Llama too, sharded or not: without it a Llama runs generate's own loop, which waits for
    every token, so a timed compiled call also holds the host's launch of it."""
    cli.warn_kernel_flags_without_effect(config)
    if world_size() > 1:
        model = build_sharded(config, dtype, attn_implementation=attn_implementation)
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return enable_fast_decode(model).eval()


def baseline_name(results: dict[str, dict]) -> str:
    """The first Llama (``model_type`` llama) among ``results``, else the first model: the baseline of ratios."""
    return next((name for name, r in results.items() if r["model_type"] == "llama"), next(iter(results)))


def cache_tokens(cache: SinkWindowCache) -> int:
    """Most tokens any KV layer of ``cache`` holds now."""
    return max(layer.get_seq_length() for layer in cache.kv_layers)


def kv_layers_holding(cache: Cache) -> list[CacheLayerMixin]:
    """The layers of ``cache`` (any transformers ``Cache``) that hold key/value tensors now."""
    return [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]


def kv_bytes(cache: Cache) -> int:
    """Bytes of the key and value tensors ``cache`` (any transformers ``Cache``) holds."""
    return sum(t.numel() * t.element_size() for layer in kv_layers_holding(cache) for t in (layer.keys, layer.values))


def streaming_nll(
    model, input_ids: torch.Tensor, cache: SinkWindowCache, desc: str = "streaming ppl", disable: bool = False
) -> tuple[torch.Tensor, int]:
    """Feed ``input_ids`` ``(B, N)`` one token per step; return the next-token NLL ``(B, N - 1)`` and the peak cache
    tokens.

    The progress bar shows the running perplexity (over the batch and the tokens so far).
    """
    batch, length = input_ids.shape
    nll = torch.empty(batch, length - 1, device=input_ids.device)
    peak_tokens = 0
    refresh = max(1, (length - 1) // 100)
    with torch.no_grad(), tqdm(range(length - 1), desc=desc, disable=disable, file=sys.stderr) as bar:
        for t in bar:
            logits = model(input_ids[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1].float()
            nll[:, t] = torch.nn.functional.cross_entropy(logits, input_ids[:, t + 1], reduction="none")
            peak_tokens = max(peak_tokens, cache_tokens(cache))
            if (t + 1) % refresh == 0:
                bar.set_postfix(ppl=f"{math.exp(nll[:, : t + 1].mean().item()):.2f}", refresh=False)
    return nll, peak_tokens


def ppl_by_position(nll: torch.Tensor, bucket: int) -> list[dict]:
    """Perplexity of ``nll`` ``(B, N)`` in position buckets of ``bucket`` tokens: ``[{"start", "end", "ppl"}]``."""
    return [
        {
            "start": start,
            "end": min(start + bucket, nll.shape[1]),
            "ppl": math.exp(nll[:, start : start + bucket].mean().item()),
        }
        for start in range(0, nll.shape[1], bucket)
    ]


def measure_stream(
    model,
    input_ids: torch.Tensor,
    cache: SinkWindowCache,
    bucket: int,
    desc: str = "streaming ppl",
    disable: bool = False,
) -> dict:
    """Stream ``input_ids`` ``(B, N)`` through ``cache``: perplexity (overall and in buckets of positions), speed,
    memory."""
    cuda = model.device.type == "cuda"
    synchronize(model.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    nll, peak_tokens = streaming_nll(model, input_ids, cache, desc=desc, disable=disable)
    synchronize(model.device)
    seconds = time.perf_counter() - start
    return dict(
        window_size=cache.window_size,
        num_sink_tokens=cache.num_sink_tokens,
        num_streams=input_ids.shape[0],
        num_tokens=input_ids.shape[1],
        ppl=math.exp(nll.mean().item()),
        tokens_per_s=nll.numel() / seconds,
        seconds=seconds,
        max_cache_tokens=peak_tokens,
        cache_bytes=kv_bytes(cache),
        peak_memory_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        ppl_by_position=ppl_by_position(nll, bucket),
    )


class CompiledStepTimer:
    """Times each call of the compiled decode forward that ``generate`` runs (``model._compiled_call``).

    ``generate``'s per-step wall time also holds its Python loop (logits processors, sampling, stopping
    criteria, the streamer); this isolates the CUDA-graph step to compare with the roofline. CUDA events on
    a GPU (no extra synchronisation), wall time on a CPU. Use as a context manager around ``generate``; it
    times nothing where ``generate`` compiled nothing (transformers compiles the decode step on CUDA only).
    """

    def __init__(self, model):
        self.model, self.call, self.spans = model, getattr(model, "_compiled_call", None), []
        self.cuda = model.device.type == "cuda"

    def __enter__(self) -> "CompiledStepTimer":
        if self.call is not None:
            self.model._compiled_call = self  # transformers' get_compiled_call() hands back this attribute
        return self

    def __exit__(self, *exc) -> None:
        if self.call is not None:
            self.model._compiled_call = self.call

    def __call__(self, *args, **kwargs):
        start = self._mark()
        out = self.call(*args, **kwargs)
        self.spans.append((start, self._mark()))
        return out

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def span_ms(self) -> list[float]:
        """Milliseconds of each call, the first (warm-up) call left out."""
        if self.cuda and self.spans:
            torch.cuda.synchronize(self.model.device)
        return [start.elapsed_time(end) if self.cuda else 1e3 * (end - start) for start, end in self.spans[1:]]

    def mean_ms(self) -> float | None:
        """Mean milliseconds per call, the first (warm-up) call left out; None when nothing was compiled."""
        spans = self.span_ms()
        return sum(spans) / len(spans) if spans else None

    def spread_ms(self) -> dict | None:
        """The fastest, median and slowest call in milliseconds and the number of calls, the first (warm-up) call
        left out: whether a mean hides a slow stretch. None when nothing was compiled."""
        spans = sorted(self.span_ms())
        if not spans:
            return None
        return {"min": spans[0], "median": spans[len(spans) // 2], "max": spans[-1], "calls": len(spans)}


def load_config_for_length(path: str, total_len: int) -> PretrainedConfig:
    """The config of ``--configs`` entry ``path``, with room for ``total_len`` positions."""
    config = cli.load_config("--configs", path)
    config.max_position_embeddings = max(config.max_position_embeddings, total_len)
    try:
        check_heads_split(config, world_size())  # each tensor-parallel process takes whole heads
    except ValueError as error:
        raise cli.UsageError(f"--configs: {path}: {error}") from None
    return config
