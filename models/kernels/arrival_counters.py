"""Zeroed int32 counters a Triton kernel borrows to find the last of its programs, and leaves at zero.

"The last program to arrive does the rest" saves a kernel launch where the rest is small: the RoPE + cache-write
kernel's last KV program advances the cache's fill level (``triton_rotary_cache.py``). Each program counts itself
with an atomic add after its own work; the one that sees the count reach the number of programs does the rest and
writes the zero back, so the counters are zero between launches and one set serves every launch on the device, one
after another on its stream (not two streams at once). Where the rest is large it costs more than the launch it saves
(the split-KV kernel's merge, docs/fast_decode.md).

The counters live for the process: a captured CUDA graph keeps their address. They are made outside a capture (a
compiled step's warm-up runs each op before its graph is recorded); a kernel first launched inside a capture gets
None and runs without them.
"""

import torch

_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def arrival_counters(device: torch.device, count: int) -> torch.Tensor | None:
    """``count`` int32 counters on ``device``, zero between kernel launches; None while a CUDA graph is being captured
    and no such counters exist yet (memory made then would belong to the graph's pool)."""
    key = (device, count)
    counters = _COUNTERS.get(key)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _COUNTERS[key] = torch.zeros(count, dtype=torch.int32, device=device)
    return counters
