"""bench/measure_guard_checks.py: a CPU smoke run (both settings measured, through the captured loop) and its bad
input."""

import json
import math

import pytest

from bench import measure_guard_checks
from models import fast_decode

from .conftest import CONFIGS


def test_cpu_smoke_run(tmp_path, monkeypatch):
    """Each setting reaches the captured loop: the checked runs never skip a guard check, the skipped ones do after the
    checked calls; the JSON holds both medians."""
    entered = []
    guard_skipping = fast_decode.guard_skipping
    monkeypatch.setattr(
        fast_decode, "guard_skipping", lambda enabled: entered.append(enabled) or guard_skipping(enabled)
    )
    argv = ["--configs", str(CONFIGS / "test_tiny_opt.json"), "--short", "4", "--long", "6", "--repeats", "1"]
    out = measure_guard_checks.main([*argv, "--stop_check_interval", "1", "--output_dir", str(tmp_path)])
    row = out["models"][0]
    # a number each (one repeat of a 2-token difference on a loaded machine may come out at or below zero: what the
    # skipped checks save is the benchmark's to measure, over many repeats, not this smoke run's)
    assert set(row["ms_per_token"]) == {"checked", "skipped"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in row["ms_per_token"].values())
    # the timed runs, one interval per step after the prefill's token: checked short (3) and long (5), then skipped
    assert entered[-16:] == [False] * 8 + [False] * 2 + [True] + [False] * 2 + [True] * 3
    assert json.loads((tmp_path / "guard_checks.json").read_text())["models"][0]["config"].endswith(
        "test_tiny_opt.json"
    )


@pytest.mark.parametrize(
    "argv", [["--long", "30", "--short", "30"], ["--repeats", "0"], ["--short", "17"], ["--stop_check_interval", "0"]]
)
def test_bad_arguments(argv):
    with pytest.raises(SystemExit):
        measure_guard_checks.parse_args(argv)
