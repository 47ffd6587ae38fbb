"""What the kernel tuners share (bench/tune_decode_attention.py, bench/measure_small_batch_gemv.py): timing one kernel
launch as a decode step runs it, and writing a measured launch table into the module that reads it.

Timing on CUDA: up to ``GRAPH_CALLS`` calls captured in one CUDA graph (no host launch cost, which would dominate a
call of a few microseconds), each call on the next of enough input copies that together exceed twice the L2 cache
(every call reads its inputs from HBM, as each layer of a step does); ``triton.testing.do_bench`` over graph
replays, median, divided by the calls. Wall time on a CPU (Triton's interpreter).
"""

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

CPU_TIMED_CALLS = 2  # the interpreter is slow: a warm-up call and two timed ones
GRAPH_CALLS = 64  # at most this many kernel calls per captured graph on CUDA (the graph's launch amortised)...
GRAPH_MS = 2.0  # ...or fewer, as long as the graph runs this long: a large shape's calls take milliseconds each


def input_copies(inputs_bytes: int, l2_bytes: int) -> int:
    """How many copies of a call's inputs make a rotation that no L2 cache of ``l2_bytes`` holds: their bytes exceed
    twice the L2, so a call never finds its KV still cached from its last turn.

    >>> input_copies(2 * 2**20, 50 * 2**20), input_copies(4 * 2**30, 50 * 2**20)
    (51, 1)
    """
    return 2 * l2_bytes // max(inputs_bytes, 1) + 1


def time_ms(calls: list[Callable[[], object]], device: str, warmup_ms: float, rep_ms: float) -> float:
    """Median milliseconds per call of ``calls`` (the same launch on rotating inputs, compiled already). On CUDA:
    after one eager round, up to ``GRAPH_CALLS`` calls (at least one round, fewer where the eager round says the graph
    would run past ``GRAPH_MS``), cycling through ``calls``, captured in one CUDA graph, then do_bench over replays.
    On a CPU: wall time of ``CPU_TIMED_CALLS`` calls after one."""
    if torch.device(device).type == "cuda":
        import triton.testing

        start = time.perf_counter()
        for call in calls:
            call()
        torch.cuda.synchronize(device)
        eager_ms = (time.perf_counter() - start) * 1e3 / len(calls)  # launch cost included: an upper bound
        graph_calls = max(len(calls), min(GRAPH_CALLS, math.ceil(GRAPH_MS / eager_ms)))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for index in range(graph_calls):
                calls[index % len(calls)]()
        replay_ms = triton.testing.do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        del graph
        return replay_ms / graph_calls
    call = calls[0]
    call()
    times = []
    for _ in range(CPU_TIMED_CALLS):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def replace_table(source: str, literal: str) -> str:
    """A module's source (``decode_launch.py``, ``gemv_launch.py``) with its ``TUNED`` assignment and the
    comment line right above it (which run measured it) replaced by ``literal`` (``table_literal``'s output)."""
    lines = source.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("TUNED:")), None)
    if start is None or start == 0 or not lines[start - 1].startswith("# "):
        raise ValueError("no comment line followed by a `TUNED:` assignment")
    if lines[start].rstrip().endswith("{}"):  # an empty table on one line
        end = start
    else:
        end = next((i for i in range(start, len(lines)) if lines[i].rstrip("\n") == "}"), None)
    if end is None:
        raise ValueError("the `TUNED` assignment has no closing `}` line")
    return "".join(lines[: start - 1]) + literal + "".join(lines[end + 1 :])


def apply_table(path: Path, literal: str) -> None:
    """``replace_table`` in the file ``path``, through a temporary file: the module is never half written."""
    staged = path.with_name(path.name + ".partial")
    staged.write_text(replace_table(path.read_text(), literal))
    os.replace(staged, path)
    print(f"written into {path}")
