"""The GPU clock sampler of test_latency.py (tools/gpu_clocks.py): parsing ``nvidia-smi``'s readings (real ones of an
H200 at its power limit, tests/fixtures/nvidia_smi_clocks_h200.csv), their summary, the sampler driving a stand-in
``nvidia-smi``, and what it records without a GPU or without the command."""

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tools.gpu_clocks import ClockSample, ClockSampler, describe, parse_sample, summarize

FIXTURE = Path(__file__).parent / "fixtures" / "nvidia_smi_clocks_h200.csv"
LINES = FIXTURE.read_text().splitlines()


def test_parse_sample_reads_nvidia_smi_lines():
    assert parse_sample("1650 MHz, 1980 MHz, 693.58 W, 0x0000000000000004") == ClockSample(1650, 1980, 693.58, 4)
    assert parse_sample("1980 MHz, 1980 MHz, [N/A], 0x0000000000000000") == ClockSample(1980, 1980, None, 0)
    assert parse_sample("1980 MHz, 1980 MHz, 70 W, [Not Supported]") == ClockSample(1980, 1980, 70.0, None)
    for line in ("", "No devices were found", "[N/A], 1980 MHz, 70 W, 0x0", "1650 MHz, 1980 MHz, 693.58 W"):
        assert parse_sample(line) is None


def test_summary_of_a_power_capped_run():
    """The fixture's readings, summarised, against the same figures taken from its text directly."""
    samples = [parse_sample(line) for line in LINES]
    assert all(samples) and len(samples) == len(LINES)
    summary = summarize(samples)
    clocks = [float(line.split()[0]) for line in LINES]
    capped = sum(line.endswith("0x0000000000000004") for line in LINES)
    assert summary["samples"] == len(LINES)
    assert summary["sm_clock_mhz"] == {"min": min(clocks), "median": statistics.median(clocks), "max": max(clocks)}
    powers = [float(line.split(", ")[2].split()[0]) for line in LINES]
    assert summary["max_sm_clock_mhz"] == 1980 and summary["power_w"] == {
        "median": statistics.median(powers),
        "max": max(powers),
    }
    assert summary["power_capped_fraction"] == capped / len(LINES) and 0.5 < summary["power_capped_fraction"] < 1
    assert summary["slowdown_fraction"] == 0
    busy = summarize([sample for sample in samples if sample.reasons == 4])  # the timed stretches alone
    assert (
        describe(busy) == (f"SM clock {busy['sm_clock_mhz']['median']:.0f} of 1980 MHz, power-capped 100% of the time")
        and busy["sm_clock_mhz"]["max"] < 1980
    )
    thermal = summarize([ClockSample(1500, 1980, 600.0, 0x4 | 0x20), ClockSample(1980, 1980, None, 0)])
    assert thermal["slowdown_fraction"] == 0.5 and thermal["power_w"] == {"median": 600.0, "max": 600.0}
    assert describe(thermal).endswith("thermal or hardware slowdown 50% of the time")
    assert summarize([]) == {"samples": 0} and describe({"samples": 0}) == "" == describe(None)
    unreported = summarize([ClockSample(1980, 1980, 70.0, None)])  # a board that reports no reasons
    assert unreported["power_capped_fraction"] is None is unreported["slowdown_fraction"]
    assert describe(unreported) == "SM clock 1980 of 1980 MHz"


def stand_in(tmp_path: Path, body: str, then: str = "time.sleep(60)", shebang: str = sys.executable) -> str:
    """An executable standing in for ``nvidia-smi``: runs ``body`` (Python), writes its arguments to ``args`` beside
    it, then runs ``then``."""
    script = tmp_path / "nvidia-smi-stand-in"
    args = f"open({str(tmp_path / 'args')!r}, 'w').write(' '.join(sys.argv[1:]))"
    script.write_text(f"#!{shebang}\nimport sys, time\n{body}\n{args}\n{then}\n")
    script.chmod(0o755)
    return str(script)


def wait_for(path: Path) -> None:
    """Until ``path`` exists (the stand-in has printed), at most 30 s."""
    for _ in range(300):
        if path.exists():
            return
        time.sleep(0.1)
    raise TimeoutError(path)


def test_sampler_runs_nvidia_smi_for_its_gpu_while_the_code_runs(tmp_path):
    """The sampler starts the command for the GPU's id with the query, keeps all it printed until stopped (more than
    a pipe holds: 5 x 364 readings, about 89 KB, some 30 minutes of readings at 1 s), and summarises it; the
    command is stopped at the end of the block."""
    body = f"print(open({str(FIXTURE)!r}).read() * 5, flush=True)"
    with ClockSampler("GPU-1234", interval_ms=250, command=stand_in(tmp_path, body)) as clocks:
        wait_for(tmp_path / "args")
    assert clocks.process.returncode is not None  # stopped
    assert clocks.summary == summarize([parse_sample(line) for line in LINES] * 5)
    args = (tmp_path / "args").read_text()
    assert args.startswith("-i GPU-1234 --query-gpu=clocks.sm,clocks.max.sm,power.draw,clocks_throttle_reasons.active")
    assert args.endswith("--format=csv,noheader -lms 250")


def test_what_the_sampler_records_without_readings(tmp_path):
    """Switched off, no CUDA device, no command, or a command that gives no reading: the summary says which, and what
    it said."""
    with ClockSampler(None) as clocks:
        pass
    assert clocks.summary == {"unavailable": "not a CUDA device"}
    with ClockSampler("GPU-1234", interval_ms=0, command=stand_in(tmp_path, "")) as clocks:
        pass
    assert clocks.summary == {"unavailable": "not read (interval 0)"} and clocks.process is None
    with ClockSampler("GPU-1234", command=str(tmp_path / "missing")) as clocks:
        pass
    assert clocks.summary == {"unavailable": f"no {tmp_path / 'missing'}"}
    body = "print('No devices were found', file=sys.stderr)\nsys.exit(6)"
    with ClockSampler("GPU-1234", command=stand_in(tmp_path, body)) as clocks:
        clocks.process.wait(30)
    assert clocks.summary == {"samples": 0, "error": "No devices were found"}
    with ClockSampler("GPU-1234", command=stand_in(tmp_path, "", shebang="/no/such/interpreter")) as clocks:
        pass
    assert clocks.process is None and clocks.summary["unavailable"].startswith(
        f"{tmp_path}/nvidia-smi-stand-in did not"
    )


def ended(pid: int) -> bool:
    """Whether process ``pid`` has ended (gone, or a zombie nobody has reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def test_nvidia_smi_ends_with_a_process_killed_inside_the_block(tmp_path):
    """A measuring process killed inside the block (a crash, the OOM killer) runs no ``__exit__``; the sampler's
    ``nvidia-smi`` must not poll the GPU forever: its next write to the pipe whose reader is gone ends it."""
    reading = "1980 MHz, 1980 MHz, 70.00 W, 0x0000000000000000"
    command = stand_in(
        tmp_path, "import os", then=f"while True:\n    print({reading!r}, flush=True)\n    time.sleep(0.1)"
    )
    pid_file = tmp_path / "pid"
    body = (
        f"import os, signal, subprocess, time\nfrom tools.gpu_clocks import ClockSampler\n"
        f"with ClockSampler('GPU-1234', command={command!r}) as clocks:\n"
        f"    open({str(pid_file)!r}, 'w').write(str(clocks.process.pid))\n"
        f"    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    measuring = subprocess.run([sys.executable, "-c", body], cwd=Path(__file__).parents[1], timeout=60)
    assert measuring.returncode == -signal.SIGKILL
    pid = int(pid_file.read_text())
    for _ in range(100):
        if ended(pid):
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the stand-in nvidia-smi outlived the process that started it")
