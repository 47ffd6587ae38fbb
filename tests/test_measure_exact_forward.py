"""bench/measure_exact_forward.py: a CPU smoke run (each variant reaches its path) and its bad input."""

import json

import pytest

from bench import measure_exact_forward
from models import sequential_prefill

from .conftest import CONFIGS


def test_cpu_smoke_run(tmp_path, monkeypatch):
    """exact runs into the static scratch cache with segments, exact_every_layer_per_token into it without,
    exact_dynamic_eager into a dynamic cache, iterative token by token not at all; the JSON has every variant, the
    Llama's forward and the ratios."""
    paths = []
    runs_segments = sequential_prefill.runs_segments
    monkeypatch.setattr(
        sequential_prefill,
        "runs_segments",
        lambda model, cache, *a: paths.append((type(cache).__name__, runs_segments(model, cache, *a))) or paths[-1][1],
    )
    argv = ["--configs", str(CONFIGS / "llama_tiny_opt.json"), "--llama", str(CONFIGS / "llama_tiny.json")]
    out = measure_exact_forward.main(
        [*argv, "--shapes", "1x12", "--warmup", "1", "--repeats", "1", "--output_dir", str(tmp_path)]
    )
    assert paths == [("StaticCache", True)] * 2 + [("StaticCache", False)] * 2 + [("DynamicCache", False)] * 2
    row = json.loads((tmp_path / "exact_forward.json").read_text())["runs"][0]
    assert out["runs"][0] == row and (row["batch"], row["tokens"]) == (1, 12)
    assert set(row["variants"]) == {*measure_exact_forward.VARIANTS, "llama"}
    assert row["vs_exact"]["exact"] == 1 and row["exact_vs_llama"] > 0
    assert all(v["graphs_compiled_while_timed"] == 0 for v in row["variants"].values())


@pytest.mark.parametrize(
    "argv", [["--shapes", "8"], ["--shapes", "0x512"], ["--repeats", "0"], ["--warmup", "0"], ["--variants", "fast"]]
)
def test_bad_arguments(argv):
    with pytest.raises(SystemExit):
        measure_exact_forward.parse_args(argv)
