"""The GPU's SM clock, power draw and clock-event reasons while a measurement runs, sampled with ``nvidia-smi``.

A GPU at its board power limit lowers its SM clock. On an H200 (700 W) a whole TinyLlama LCKV run at batch 4,096
(P2048 + G2048, 250 s) drew 690-697 W at 1,635-1,830 MHz instead of the 1,980 MHz maximum, and its decode steps took
8% longer than the same steps timed in short bursts, which run at full clock (docs/performance.md, "Whole runs and the
power limit"). So a timing means little without the clock it ran at: ``ClockSampler`` polls ``nvidia-smi`` in a child
process while the timed code runs and summarises what it saw (``summarize``); without a CUDA device or ``nvidia-smi``
its summary says which is missing.
"""

import shutil
import statistics
import subprocess
import threading
from dataclasses import dataclass

import torch

QUERY = ("clocks.sm", "clocks.max.sm", "power.draw", "clocks_throttle_reasons.active")
# Clock-event reason bits (NVML's nvmlClocksEventReason*): what holds the SM clock below its maximum.
POWER_CAP = 0x4  # the board's power limit (software power cap)
SLOWDOWN = 0x8 | 0x20 | 0x40 | 0x80  # hardware slowdown, software thermal, hardware thermal, external power brake


@dataclass(frozen=True)
class ClockSample:
    """One ``nvidia-smi`` reading: SM clock and its maximum (MHz), power draw (W, None where the board does not report
    it), and the clock-event reason bits."""

    sm_clock_mhz: float
    max_sm_clock_mhz: float
    power_w: float | None
    reasons: int | None


def leading_number(field: str) -> float | None:
    """``693.58`` of ``693.58 W``; None for ``[N/A]``, ``[Not Supported]`` and the like."""
    try:
        return float(field.split()[0])
    except (ValueError, IndexError):
        return None


def parse_sample(line: str) -> ClockSample | None:
    """One line of ``nvidia-smi --query-gpu=<QUERY> --format=csv,noheader``, e.g. ``1650 MHz, 1980 MHz, 693.58 W,
    0x0000000000000004``; None for anything else (an error line, clocks not reported). A power or reason field the
    board does not report is None."""
    fields = [field.strip() for field in line.split(",")]
    if len(fields) != len(QUERY):
        return None
    clock, max_clock, power = (leading_number(field) for field in fields[:3])
    if clock is None or max_clock is None:
        return None
    try:
        reasons = int(fields[3], 16)
    except ValueError:  # "[Not Supported]"
        reasons = None
    return ClockSample(clock, max_clock, power, reasons)


def summarize(samples: list[ClockSample]) -> dict:
    """What the samples say about the clock a timing ran at: the SM clock (min / median / max, and the maximum the
    GPU allows), the power draw (median / max), and the fractions of samples held by the power cap and by a thermal or
    hardware slowdown (None where no sample reported its reasons)."""
    if not samples:
        return {"samples": 0}
    clocks = [sample.sm_clock_mhz for sample in samples]
    powers = [sample.power_w for sample in samples if sample.power_w is not None]
    reasons = [sample.reasons for sample in samples if sample.reasons is not None]
    return {
        "samples": len(samples),
        "sm_clock_mhz": {"min": min(clocks), "median": statistics.median(clocks), "max": max(clocks)},
        "max_sm_clock_mhz": max(sample.max_sm_clock_mhz for sample in samples),
        "power_w": {"median": statistics.median(powers), "max": max(powers)} if powers else None,
        "power_capped_fraction": sum(bool(r & POWER_CAP) for r in reasons) / len(reasons) if reasons else None,
        "slowdown_fraction": sum(bool(r & SLOWDOWN) for r in reasons) / len(reasons) if reasons else None,
    }


def describe(summary: dict | None) -> str:
    """``summarize``'s result in a few words for a tool's summary line ("SM clock 1665 of 1980 MHz, power-capped 100%
    of the time"); empty where nothing was sampled."""
    if not summary or not summary.get("samples"):
        return ""
    text = f"SM clock {summary['sm_clock_mhz']['median']:.0f} of {summary['max_sm_clock_mhz']:.0f} MHz"
    if summary["power_capped_fraction"]:
        text += f", power-capped {summary['power_capped_fraction']:.0%} of the time"
    if summary["slowdown_fraction"]:
        text += f", thermal or hardware slowdown {summary['slowdown_fraction']:.0%} of the time"
    return text


def nvidia_smi_id(device: torch.device) -> str | None:
    """``device``'s id for ``nvidia-smi -i`` (its UUID, which does not depend on ``CUDA_VISIBLE_DEVICES``), or None
    for a device that is not a CUDA GPU."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"GPU-{torch.cuda.get_device_properties(index).uuid}"


class ClockSampler:
    """``with ClockSampler(gpu_id) as clocks: <timed code>``, then ``clocks.summary``: ``summarize`` of an
    ``nvidia-smi`` reading every ``interval_ms`` for the GPU ``gpu_id`` (``nvidia_smi_id``), from its first reading
    (waited for, at most ``FIRST_READING_S``, before the block runs) to the block's end; ``{"unavailable": why}`` where
    ``interval_ms`` is 0, there is no GPU id, no ``command`` or it does not start; with no reading, what
    ``nvidia-smi`` printed instead is the summary's ``error``.

    A thread reads the readings as they come: a pipe read only at the end would fill (64 KiB, about 12 minutes of
    readings at 0.5 s) and stop them, and a file would let ``nvidia-smi`` outlive a process killed inside the block
    (a pipe whose reader is gone ends it at its next write)."""

    FIRST_READING_S = 5.0

    def __init__(self, gpu_id: str | None, interval_ms: int = 1000, command: str = "nvidia-smi"):
        self.gpu_id, self.interval_ms, self.command = gpu_id, interval_ms, command
        self.process: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.first_line = threading.Event()
        self.reader: threading.Thread | None = None
        self.summary: dict = {}

    def __enter__(self) -> "ClockSampler":
        if self.interval_ms == 0:
            self.summary = {"unavailable": "not read (interval 0)"}
            return self
        executable = shutil.which(self.command)
        if self.gpu_id is None or executable is None:
            self.summary = {"unavailable": "not a CUDA device" if self.gpu_id is None else f"no {self.command}"}
            return self
        try:
            self.process = subprocess.Popen(
                [executable, "-i", self.gpu_id, f"--query-gpu={','.join(QUERY)}", "--format=csv,noheader"]
                + ["-lms", str(self.interval_ms)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        except OSError as error:
            self.summary = {"unavailable": f"{self.command} did not start: {error}"}
            return self
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()
        self.first_line.wait(self.FIRST_READING_S)
        return self

    def read(self) -> None:
        """The reader thread: every line ``nvidia-smi`` prints, until it ends."""
        for line in self.process.stdout:
            self.lines.append(line)
            self.first_line.set()

    def __exit__(self, *exc_info) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.reader.join(timeout=10)
        samples = [sample for sample in map(parse_sample, self.lines) if sample is not None]
        self.summary = summarize(samples)
        if not samples:  # what nvidia-smi said instead (an unknown id, an unsupported field)
            self.summary["error"] = next((line.strip() for line in self.lines if line.strip()), "")
