"""bench/measure_generate_overhead.py: its CPU smoke run (the GPU run's code path on tiny configs) writes both loops'
per-token costs for both models, and both loops give the same tokens."""

import json
from types import SimpleNamespace

import pytest
import torch

from bench import measure_generate_overhead
from tools import latency

from .conftest import CONFIGS, tiny_config, tiny_model


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
        assert run["greedy_divergence"] is None
    written = json.loads((tmp_path / "generate_overhead_tiny_llama_test_tiny_opt_b2.json").read_text())
    assert written["setting"]["device"] == "cpu" and len(written["runs"]) == 2


def test_first_difference_is_the_earliest_step_then_its_first_row():
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    b = torch.tensor([[1, 2, 3, 9], [1, 2, 8, 4]])
    assert measure_generate_overhead.first_difference(a, b) == (1, 2)
    assert measure_generate_overhead.first_difference(a, a.clone()) is None


def test_logit_tie_in_ulps_of_the_forwards_dtype():
    logits = torch.tensor([0.0, 3.0, 3.0 - 2**-6, -1.0])  # bf16 at 3.0: ulp 2**-7 * 2 = 2**-6
    tie = measure_generate_overhead.logit_tie(logits, chosen=1, other=2, dtype=torch.bfloat16)
    assert tie == {"logit_gap": 2**-6, "ulp": 2**-6, "gap_in_ulps": 1.0}
    assert measure_generate_overhead.logit_tie(logits, 1, 3, torch.float32)["gap_in_ulps"] == 4.0 / 2**-22


def test_greedy_divergence_reads_the_stock_loops_logits_at_the_first_difference():
    """A fast loop whose greedy tokens differ at step 2 of row 1: the divergence names that place, both tokens, and
    the gap between them in the logits with which transformers' loop chose its token (its argmax, so gap >= 0)."""
    model = tiny_model(tiny_config())
    model.generation_config.compile_config = None
    run = SimpleNamespace(cache="static", prompt_len=6, gen_len=4, offload=False)
    cache = latency.filled_cache(model, run, 2, 6)
    stock = measure_generate_overhead.run_generate(model, cache, 2, 6, "transformers", 4, sample=False, logits=True)
    assert stock.logits.shape == (2, 4, model.config.vocab_size)
    assert torch.equal(stock.logits.argmax(-1), stock.tokens)  # the logits that chose the tokens
    fast = stock.tokens.clone()
    fast[1, 2] = (fast[1, 2] + 1) % model.config.vocab_size
    divergence = measure_generate_overhead.greedy_divergence(
        model, cache, 2, 6, {"fast": fast, "transformers": stock.tokens}
    )
    gap = stock.logits[1, 2, stock.tokens[1, 2]] - stock.logits[1, 2, fast[1, 2]]
    assert divergence["row"] == 1 and divergence["step"] == 2
    assert divergence["tokens"] == {"fast": int(fast[1, 2]), "transformers": int(stock.tokens[1, 2])}
    assert divergence["logit_gap"] == pytest.approx(float(gap)) and divergence["logit_gap"] > 0
    assert (
        measure_generate_overhead.greedy_divergence(
            model, cache, 2, 6, {"fast": stock.tokens, "transformers": stock.tokens}
        )
        is None
    )


def test_every_graph_is_compiled_where_rewrites_are_counted():
    """Under ``--gemv_fusion`` no graph comes from inductor's or AOTAutograd's cache, whose graphs the pass does not
    see again (so their rewrites went uncounted)."""
    with (
        torch._inductor.config.patch(fx_graph_cache=True),
        torch._functorch.config.patch(enable_autograd_cache=True),
    ):
        measure_generate_overhead.compile_every_graph()
        assert not torch._inductor.config.fx_graph_cache
        assert not torch._functorch.config.enable_autograd_cache


def test_fast_loop_only_times_the_captured_loop_alone(tmp_path):
    """``--fast_loop_only``: the captured loop's costs and the roofline, no transformers loop and no comparison."""
    out = measure_generate_overhead.main(
        ["--smoke", "--configs", str(CONFIGS / "test_tiny_opt.json"), "--fast_loop_only", "--output_dir", str(tmp_path)]
    )
    (run,) = out["runs"]
    assert run["fast"]["captured_step_ms"] > 0 and run["roofline_ms"] > 0
    assert "transformers" not in run and "same_tokens" not in run
    assert out["setting"]["fast_loop_only"] is True
