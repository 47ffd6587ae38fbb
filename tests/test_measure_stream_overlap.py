"""bench/measure_stream_overlap.py: a CPU smoke run through the same calls, and its bad input."""

import json

import pytest

from bench import measure_stream_overlap
from tools.cli import UsageError


def test_cpu_smoke_run(tmp_path):
    out = measure_stream_overlap.main(["--smoke", "--output_dir", str(tmp_path)])
    assert json.loads((tmp_path / "stream_overlap.json").read_text()) == out
    variants = {"products", "attention", "one_stream", "two_streams", "two_streams_products_first"}
    assert set(out["ms_per_layer"]) == variants and all(ms > 0 for ms in out["ms_per_layer"].values())
    assert set(out["overlap_gain"]) == {"default", "products_first"} and out["overlap_gain_vs_carved_products"] == {}
    assert out["best_possible_gain"] >= 1 and (out["rows"], out["context"]) == (4, 24)


def test_the_pair_computes_a_layer_and_attention(tmp_path):
    # The timed calls are real work: products of the layer's shapes, attention equal to SDPA over the same KVs.
    import torch
    from torch.nn import functional as F

    from tools.cli import load_config

    pair = measure_stream_overlap.OverlapPair(
        load_config("--config", "configs/tinyllama_opt.json"), 3, 5, torch.device("cpu"), torch.float32
    )
    assert pair.products(0).shape == (3, 2048)
    expected = F.scaled_dot_product_attention(pair.query, pair.keys, pair.values, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(pair.attention(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "argv", [["--rows", "0"], ["--context", "0"], ["--layers", "0"], ["--carveouts", "x"], ["--config", "missing.json"]]
)
def test_bad_arguments(argv):
    with pytest.raises(UsageError, match=f"^{argv[0]}: "):
        measure_stream_overlap.parse_args(argv)
