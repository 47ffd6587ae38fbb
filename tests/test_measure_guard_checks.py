"""bench/measure_guard_checks.py: a CPU smoke run (both settings measured, through the captured loop) and its bad
input."""

import json

import pytest

from bench import measure_guard_checks
from models import fast_decode

from .conftest import CONFIGS


def test_cpu_smoke_run(tmp_path, monkeypatch):
    """Each setting reaches the captured loop's generation config, and the JSON holds both medians."""
    seen = []
    decode = fast_decode.decode

    def recording_decode(model, *args, **kwargs):
        seen.append(getattr(model.generation_config, "skip_guard_checks", None))
        return decode(model, *args, **kwargs)

    monkeypatch.setattr(fast_decode, "decode", recording_decode)
    argv = ["--configs", str(CONFIGS / "test_tiny_opt.json"), "--short", "2", "--long", "5", "--repeats", "1"]
    out = measure_guard_checks.main([*argv, "--output_dir", str(tmp_path)])
    row = out["models"][0]
    assert set(row["ms_per_token"]) == {"checked", "skipped"} and all(v > 0 for v in row["ms_per_token"].values())
    assert seen[-4:] == [False, False, True, True]  # the timed runs: short and long, checked then skipped
    assert json.loads((tmp_path / "guard_checks.json").read_text())["models"][0]["config"].endswith(
        "test_tiny_opt.json"
    )


@pytest.mark.parametrize("argv", [["--long", "10", "--short", "10"], ["--repeats", "0"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit):
        measure_guard_checks.parse_args(argv)
