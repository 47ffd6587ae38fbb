"""Measurement helpers the latency tool and the benchmarks share: a per-token timer and the baseline of ratios."""

import time

import torch
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer


class StepTimer(BaseStreamer):
    """Streamer that records a (synchronized) timestamp per generated token and drives a progress bar."""

    def __init__(self, device: torch.device, bar: tqdm):
        self.device, self.bar, self.times = device, bar, []

    def put(self, value: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        if len(self.times) > 1:  # the first put is the prompt
            self.bar.update(1)

    def end(self) -> None:
        pass


def baseline_name(results: dict[str, dict]) -> str:
    """The first Llama (``model_type`` llama) among ``results``, else the first model: the baseline of ratios."""
    return next((name for name, r in results.items() if r["model_type"] == "llama"), next(iter(results)))
