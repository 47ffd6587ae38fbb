"""test_latency.py: a CPU run on tiny configs, --plan against measured cache bytes, batch search, bad flags."""

import json
import sys

import pytest
import torch
from transformers import DynamicCache

from models.cli import UsageError
from models.measure import CompiledStepTimer

from .conftest import CONFIGS, tiny_config, tiny_model

sys.path.insert(0, str(CONFIGS.parent))
import test_latency  # noqa: E402

LCKV_FIELDS = ("layer_types", "target_layer", "num_encoders", "num_trained_encoders", "train_kv")


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> list[str]:
    """A tiny Llama and the tiny opt-llama of the same shape."""
    fields = json.loads((CONFIGS / "test_tiny_opt.json").read_text())
    llama = {k: v for k, v in fields.items() if k not in LCKV_FIELDS} | {"model_type": "llama"}
    path = tmp_path_factory.mktemp("latency") / "tiny_llama.json"
    path.write_text(json.dumps(llama))
    return [str(path), str(CONFIGS / "test_tiny_opt.json")]


def test_cpu_run_writes_both_models_and_ratios(configs, tmp_path):
    argv = ["--configs", *configs, "--prompt_len", "8", "--gen_len", "4", "--max_batch", "2", "--device", "cpu",
            "--output_dir", str(tmp_path)]
    test_latency.main(argv)
    out = json.loads((tmp_path / "latency.json").read_text())
    assert (tmp_path / "throughput.png").stat().st_size > 0
    assert set(out["models"]) == {"tiny_llama", "test_tiny_opt"}
    for r in out["models"].values():
        assert r["max_batch"] == 2 and r["max_batch_throughput"] > 0 and [x["batch"] for x in r["runs"]] == [1, 2]
        assert all(x["kv_bytes_per_token"] == r["kv_bytes_per_token_formula"] for x in r["runs"])
        assert r["runs"][1]["roofline_ms"] > r["runs"][0]["roofline_ms"] == r["batch1_roofline_ms"]
    ratio = out["ratios"]["test_tiny_opt/tiny_llama"]
    assert ratio["kv_bytes_per_token_formula"] == pytest.approx(3 / 6)  # 3 KV layers of 6


def test_step_roofline_counts_weights_once_and_filled_kv_per_sequence():
    # 1 GB of weights + 4 sequences x 100 B/token x 2500 tokens = 1.001 GB at 1 TB/s: 1.001 ms
    assert test_latency.step_roofline_ms(10**9, 100, 4, 2500, 1e12) == pytest.approx(1.001)


def test_plan_equals_measured_cache_bytes(configs):
    planned = test_latency.main(["--plan", "--configs", *configs, "--dtype", "float32", "--plan_lengths", "16"])
    for name, config in [("tiny_llama", tiny_config("llama_tiny.json", **{"hidden_size": 64, "intermediate_size": 128,
                                                                          "num_hidden_layers": 6, "num_attention_heads": 4,
                                                                          "num_key_value_heads": 2, "vocab_size": 256})),
                         ("test_tiny_opt", tiny_config())]:
        model = tiny_model(config)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(torch.randint(3, 256, (3, 5)), cache=cache, use_cache=True)
        total, slots = test_latency.cache_bytes(cache)
        assert slots == 5 and total == planned[name]["kv_bytes_per_token"] * 3 * 5


def test_plan_decode_roofline_reads_every_layer(configs):
    """LCKV stores fewer KV layers but every layer still reads one layer's KVs per step: the same read bytes as
    Llama, so at each one's KV-bound batch the bandwidth-bound decode rates are close, LCKV's bigger batch only
    amortising the weights."""
    argv = ["--plan", "--configs", *configs, "--dtype", "float32", "--plan_lengths", "64", "--gpu_memory", "1GB",
            "--hbm_bandwidth", "1TB"]
    planned = test_latency.main(argv)
    llama, lckv = planned["tiny_llama"], planned["test_tiny_opt"]
    assert llama["kv_read_bytes_per_token"] == lckv["kv_read_bytes_per_token"] == llama["kv_bytes_per_token"]
    assert lckv["kv_bytes_per_token"] * 2 == llama["kv_bytes_per_token"]  # 3 of 6 layers store KVs
    for p in (llama, lckv):
        batch = p["max_batch"][64]
        expected = batch * 1e12 / (p["weight_bytes"] + batch * 64 * p["kv_read_bytes_per_token"])
        assert p["decode_roofline_tokens_per_s"][64] == pytest.approx(expected)
    ratio = lckv["decode_roofline_tokens_per_s"][64] / llama["decode_roofline_tokens_per_s"][64]
    assert lckv["max_batch"][64] > 1.9 * llama["max_batch"][64] and 1 < ratio < 1.1


@pytest.mark.parametrize("start, doubled", [(1, {1, 2, 4, 8, 16}), (6, {1, 6, 12})])
def test_batch_search_bisects_to_first_oom(monkeypatch, start, doubled):
    """Doubling (from --start_batch; batch 1 always) then bisection finds the largest batch below a fake limit of 23."""
    monkeypatch.setattr(test_latency, "try_run", lambda model, args, batch, desc: {"batch": batch} if batch <= 23 else None)
    monkeypatch.setattr(test_latency, "asdict", dict)
    args = test_latency.parse_args(["--max_batch", "1000", "--resolution", "0", "--start_batch", str(start)])
    runs = test_latency.batch_search(None, args, "fake")
    assert max(r["batch"] for r in runs if not r.get("oom")) == 23
    ooms = [r["batch"] for r in runs if r.get("oom")]
    assert min(ooms) == 24 and doubled <= {r["batch"] for r in runs}


def test_batch_search_stops_when_batch_one_does_not_fit(monkeypatch):
    monkeypatch.setattr(test_latency, "try_run", lambda model, args, batch, desc: None)
    args = test_latency.parse_args(["--start_batch", "64"])
    assert test_latency.batch_search(None, args, "fake") == [{"batch": 1, "oom": True}]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--offload", "--device", "cpu"], "--offload: moves the KV cache between GPU and CPU, so it needs a cuda --device, not cpu"),
        (["--offload", "--compile", "--device", "cuda"], "--offload: not with --compile"),
        (["--start_batch", "2048", "--max_batch", "1024"], "--start_batch: 2048; allowed values are 1 to --max_batch (1024)"),
    ],
)
def test_bad_flag_combinations_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        test_latency.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_compiled_step_timer_times_the_compiled_call_and_restores_it():
    """The timer stands in for generate's compiled decode call while active, then puts the original back."""
    import time
    from types import SimpleNamespace

    def compiled_call(**kwargs):
        time.sleep(0.02)
        return kwargs["step"]

    model = SimpleNamespace(_compiled_call=compiled_call, device=torch.device("cpu"))
    with CompiledStepTimer(model) as timer:
        assert [model._compiled_call(step=i) for i in range(3)] == [0, 1, 2]
    assert model._compiled_call is compiled_call and len(timer.spans) == 3
    assert 20 <= timer.mean_ms() < 200  # two timed calls (the first one is warm-up)

    uncompiled = SimpleNamespace(device=torch.device("cpu"))  # generate compiled nothing (CPU)
    with CompiledStepTimer(uncompiled) as timer:
        pass
    assert not hasattr(uncompiled, "_compiled_call") and timer.mean_ms() is None


def test_prefill_modes_extrapolated_end_to_end(configs, tmp_path):
    """--prefill with two modes gives one LCKV entry per mode (static cache, so the sequential one fills it through
    prefill_cache); with --steps below --gen_len each run also times steps at the end of the context and reports
    the extrapolated end-to-end rate over the full gen_len."""
    argv = ["--configs", *configs, "--prompt_len", "12", "--gen_len", "8", "--steps", "2", "--batches", "2",
            "--cache", "static", "--prefill", "iterative,sequential", "--device", "cpu", "--output_dir", str(tmp_path)]
    out = test_latency.main(argv)
    assert set(out["models"]) == {"tiny_llama", "test_tiny_opt:iterative", "test_tiny_opt:sequential"}
    assert "end of the context" in out["setting"]["extrapolation"]
    for name, r in out["models"].items():
        (run,) = r["runs"]
        assert run["prefill_path"] == (name.split(":")[1] if ":" in name else None)
        assert run["step_ms_end"] > 0 and run["mean_step_ms"] == pytest.approx((run["step_ms"] + run["step_ms_end"]) / 2)
        assert run["e2e_s"] == pytest.approx(run["prefill_s"] + 7 * run["mean_step_ms"] / 1e3)
        assert r["max_batch_e2e_throughput"] == pytest.approx(2 * 8 / run["e2e_s"])
    assert out["ratios"]["test_tiny_opt:sequential/tiny_llama"]["max_batch_e2e_throughput"] > 0


def test_filled_cache_reports_its_length(configs):
    """The end-of-context timing cache holds `length` tokens in every KV layer, for both cache kinds."""
    for kind in ("static", "dynamic"):
        args = test_latency.parse_args(["--cache", kind, "--prompt_len", "8", "--gen_len", "8", "--device", "cpu"])
        model = test_latency.build_model(test_latency.load_config(configs[1], 16), args, torch.float32)
        cache = test_latency.filled_cache(model, args, 2, 11)
        assert int(cache.get_seq_length()) == 11
        total, slots = test_latency.cache_bytes(cache)
        assert slots == (16 if kind == "static" else 11) and total == 3 * 2 * 2 * 2 * 16 * slots * 4  # 3 KV layers


def test_bad_prefill_flag_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit):
        test_latency.main(["--prefill", "iterative,fast"])
    assert capsys.readouterr().err.strip() == "test_latency.py: error: --prefill: unknown 'fast'; allowed are auto, iterative, sequential"


def test_sampled_sequential_prefill_leaves_a_full_cache(configs, tmp_path, monkeypatch):
    """--prefill_sample times 2 tokens at each end of the prompt, then decoding continues from a cache holding the
    prompt: the extrapolated prefill is reported and the steps after it run as usual."""
    filled = []
    original = test_latency.prefill_cache
    monkeypatch.setattr(test_latency, "prefill_cache", lambda model, ids, cache: filled.append((int(cache.get_seq_length()), ids.shape[1])) or original(model, ids, cache))
    argv = ["--configs", configs[1], "--prompt_len", "12", "--gen_len", "4", "--batches", "2", "--cache", "static",
            "--prefill", "sequential", "--prefill_sample", "2", "--device", "cpu", "--output_dir", str(tmp_path)]
    out = test_latency.main(argv)
    assert filled == [(0, 2), (9, 2)]  # start, then the end of the 11 prompt tokens before the last
    (run,) = out["models"]["test_tiny_opt"]["runs"]
    assert run["prefill_s"] > 0 and run["e2e_throughput"] > 0 and "scaled to prompt_len - 1" in out["setting"]["extrapolation"]
    with pytest.raises(UsageError, match="^--prefill_sample: 6; allowed"):
        test_latency.parse_args(["--prefill_sample", "6", "--prompt_len", "12"])


def test_extrapolate_means_start_and_end_steps():
    assert test_latency.extrapolate(1.0, 10.0, 30.0, 101) == (20.0, 3.0)
    assert test_latency.extrapolate(1.0, 10.0, None, 101) == (10.0, 2.0)  # all steps ran: the measured mean
