"""bench/measure_generate_overhead.py: its CPU smoke run (the GPU run's code path on tiny configs) writes both loops'
per-token costs for both models, and both loops give the same tokens."""

import json

from bench import measure_generate_overhead

from .conftest import CONFIGS, tiny_config


def test_smoke_run_reports_both_loops_for_both_models(tmp_path):
    llama = tmp_path / "tiny_llama.json"
    llama.write_text(
        tiny_config(
            "llama_tiny.json", hidden_size=64, intermediate_size=128, num_hidden_layers=3, vocab_size=256
        ).to_json_string()
    )
    out = measure_generate_overhead.main(
        [
            "--smoke",
            "--configs",
            str(llama),
            str(CONFIGS / "test_tiny_opt.json"),
            "--batches",
            "2",
            "--attn_implementation",
            "sdpa_packed_gqa",
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert [(r["model_type"], r["batch"]) for r in out["runs"]] == [("llama", 2), ("opt-llama", 2)]
    for run in out["runs"]:
        for loop in ("fast", "transformers"):
            assert run[loop]["ms_per_token"] > 0 and run[loop]["captured_step_ms"] > 0  # the compiled-call path ran
        assert run["same_tokens"] == {"greedy": True, "sampled": True} and run["roofline_ms"] > 0
    written = json.loads((tmp_path / "generate_overhead_tiny_llama_test_tiny_opt_b2.json").read_text())
    assert written["setting"]["device"] == "cpu" and len(written["runs"]) == 2
