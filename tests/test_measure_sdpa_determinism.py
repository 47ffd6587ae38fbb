"""bench/measure_sdpa_determinism.py: a CPU smoke run through the same calls, and its bad input."""

import json

import pytest

from bench import measure_sdpa_determinism
from tools.cli import UsageError


def test_cpu_smoke_run(tmp_path):
    out = measure_sdpa_determinism.main(["--smoke", "--output_dir", str(tmp_path)])
    assert json.loads((tmp_path / "sdpa_determinism.json").read_text()) == out
    assert [(row["kind"], row["batch"], row["keys"]) for row in out["shapes"]] == [("decode", 2, 16), ("prefill", 2, 8)]
    for row in out["shapes"]:
        assert set(row["backends"]) == {"flash", "efficient", "cudnn", "math"}
        assert "error" in row["backends"]["cudnn"]  # no cuDNN attention on a CPU: recorded, not raised
        for name in ("flash", "math"):  # the CPU's kernels: deterministic, float32 against float32 math
            result = row["backends"][name]
            assert result["deterministic"] and result["differing_calls"] == 0 and result["ms"] > 0
            assert result["max_abs_error"] < 1e-5


def test_a_backend_that_differs_between_calls_is_counted(monkeypatch):
    # The count comes from comparing each repeat with the first: a backend adding noise every call is caught.
    import torch

    calls = iter(range(100))
    monkeypatch.setattr(
        measure_sdpa_determinism,
        "attend",
        lambda query, key, value, causal: query + 1e-3 * next(calls),
    )
    args = measure_sdpa_determinism.parse_args(["--smoke", "--output_dir", "/tmp/unused"])
    inputs = tuple(torch.zeros(1, 2, 1, 4) for _ in range(3))
    result = measure_sdpa_determinism.measure_backend("math", inputs, False, torch.zeros(1, 2, 1, 4), args)
    assert result["deterministic"] is False and result["differing_calls"] == args.repeats - 1


@pytest.mark.parametrize(
    "argv",
    [["--batches", "0"], ["--contexts", "x"], ["--prompt_len", "-1"], ["--repeats", "1"], ["--config", "no.json"]],
)
def test_bad_arguments(argv):
    with pytest.raises(UsageError, match=f"^{argv[0]}: "):
        measure_sdpa_determinism.parse_args(argv)
