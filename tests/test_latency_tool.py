"""test_latency.py: a CPU run on tiny configs, --plan against measured cache bytes, batch search, bad flags."""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from models import roofline, sequential_prefill
from models.config_loading import llama_twin
from tools import latency
from tools.cli import UsageError
from tools.measure import CompiledStepTimer, load_config_for_length

from .conftest import CONFIGS, tiny_config, tiny_model

sys.path.insert(0, str(CONFIGS.parent))
import test_latency  # noqa: E402


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> list[str]:
    """A tiny Llama and the tiny opt-llama of the same shape."""
    path = tmp_path_factory.mktemp("latency") / "tiny_llama.json"
    llama_twin(tiny_config()).to_json_file(path)
    return [str(path), str(CONFIGS / "test_tiny_opt.json")]


def test_cpu_run_writes_both_models_and_ratios(configs, tmp_path):
    argv = [
        "--configs",
        *configs,
        "--prompt_len",
        "8",
        "--gen_len",
        "4",
        "--max_batch",
        "2",
        "--device",
        "cpu",
        "--output_dir",
        str(tmp_path),
    ]
    test_latency.main(argv)
    out = json.loads((tmp_path / "latency.json").read_text())
    assert (tmp_path / "throughput.png").stat().st_size > 0
    assert set(out["models"]) == {"tiny_llama", "test_tiny_opt"}
    for r in out["models"].values():
        assert r["max_batch"] == 2 and r["max_batch_throughput"] > 0 and [x["batch"] for x in r["runs"]] == [1, 2]
        assert all(x["kv_bytes_per_token"] == r["kv_bytes_per_token_formula"] for x in r["runs"])
        assert all(x["gpu_clocks"] == {"unavailable": "not a CUDA device"} for x in r["runs"])
        assert r["runs"][1]["roofline_ms"] > r["runs"][0]["roofline_ms"] == r["batch1_roofline_ms"]
        assert r["runs"][1]["matmul_floor_ms"] == pytest.approx(2 * r["runs"][0]["matmul_floor_ms"])  # batch 2 vs 1
    ratio = out["ratios"]["test_tiny_opt/tiny_llama"]
    assert ratio["kv_bytes_per_token_formula"] == pytest.approx(3 / 6)  # 3 KV layers of 6


def test_step_roofline_counts_weights_once_and_filled_kv_per_sequence():
    # 1 GB of weights + 4 sequences x 100 B/token x 2500 tokens = 1.001 GB at 1 TB/s: 1.001 ms
    assert latency.step_roofline_ms(10**9, 100, 4, 2500, 1e12) == pytest.approx(1.001)


def test_step_matmul_floor_is_two_flops_per_parameter_per_sequence():
    # 1e9 parameters x 2 FLOPs x 512 sequences at 1e15 FLOP/s: 1.024 ms
    assert latency.step_matmul_floor_ms(1e9, 512, 1e15) == pytest.approx(1.024)


@pytest.mark.parametrize("tied", [False, True])
def test_multiplied_parameters_leave_out_an_untied_input_embedding(tied):
    config = tiny_config("llama_tiny.json", hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=256)
    config.tie_word_embeddings = tied
    total = latency.weight_bytes(config, torch.float32) // 4
    assert latency.parameter_counts(config) == (total, total - (0 if tied else 256 * 64))


def test_plan_equals_measured_cache_bytes(configs):
    planned = test_latency.main(["--plan", "--configs", *configs, "--dtype", "float32", "--plan_lengths", "16"])
    for name, config in [
        (
            "tiny_llama",
            tiny_config(
                "llama_tiny.json",
                **{
                    "hidden_size": 64,
                    "intermediate_size": 128,
                    "num_hidden_layers": 6,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                    "vocab_size": 256,
                },
            ),
        ),
        ("test_tiny_opt", tiny_config()),
    ]:
        model = tiny_model(config)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(torch.randint(3, 256, (3, 5)), cache=cache, use_cache=True)
        total, slots = latency.kv_bytes_and_slots(cache)
        assert slots == 5 and total == planned[name]["kv_bytes_per_token"] * 3 * 5


def test_plan_decode_roofline_reads_every_layer(configs):
    """LCKV stores fewer KV layers but every layer still reads one layer's KVs per step: the same read bytes as
    Llama, so at each one's KV-bound batch the bandwidth-bound decode rates are close, LCKV's bigger batch only
    amortising the weights."""
    argv = [
        "--plan",
        "--configs",
        *configs,
        "--dtype",
        "float32",
        "--plan_lengths",
        "64",
        "--gpu_memory",
        "1GB",
        "--hbm_bandwidth",
        "1TB",
    ]
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
    monkeypatch.setattr(
        test_latency, "try_run", lambda model, args, batch, desc: {"batch": batch} if batch <= 23 else None
    )
    monkeypatch.setattr(test_latency, "asdict", dict)
    args = latency.parse_args(["--max_batch", "1000", "--resolution", "0", "--start_batch", str(start)])
    runs = test_latency.batch_search(None, args, "fake")
    assert max(r["batch"] for r in runs if not r.get("oom")) == 23
    ooms = [r["batch"] for r in runs if r.get("oom")]
    assert min(ooms) == 24 and doubled <= {r["batch"] for r in runs}


def test_batch_search_stops_when_batch_one_does_not_fit(monkeypatch):
    monkeypatch.setattr(test_latency, "try_run", lambda model, args, batch, desc: None)
    args = latency.parse_args(["--start_batch", "64"])
    assert test_latency.batch_search(None, args, "fake") == [{"batch": 1, "oom": True}]


@pytest.mark.parametrize("first_fit, ran", [(True, [64, 48]), (False, [64, 48, 32])])
def test_batches_list_stops_at_the_first_fit_only_when_asked(monkeypatch, first_fit, ran):
    """``--batches 64,48,32 --first_fit`` is a list of fallbacks: 64 does not fit, 48 does, 32 never runs."""
    calls = []
    monkeypatch.setattr(
        test_latency,
        "try_run",
        lambda model, args, batch, desc: calls.append(batch) or ({"batch": batch} if batch < 64 else None),
    )
    monkeypatch.setattr(test_latency, "asdict", dict)
    args = latency.parse_args(["--batches", "64,48,32", *(["--first_fit"] if first_fit else [])])
    runs = test_latency.batch_search(None, args, "fake")
    assert calls == ran and [r["batch"] for r in runs] == sorted(ran) and runs[-1].get("oom")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--first_fit", "--device", "cpu"],
            "--first_fit: stops a --batches list at its first fitting batch; allowed only with --batches",
        ),
        (
            ["--offload", "--device", "cpu"],
            "--offload: moves the KV cache between GPU and CPU, so it needs a cuda --device, not cpu",
        ),
        (["--offload", "--compile", "--device", "cuda"], "--offload: not with --compile"),
        (
            ["--start_batch", "2048", "--max_batch", "1024"],
            "--start_batch: 2048; allowed values are 1 to --max_batch (1024)",
        ),
        (
            ["--plan", "--hbm_bandwidth", "-1TB"],
            "--hbm_bandwidth: '-1TB'; allowed is a positive size",
        ),  # a separate word
        (["--plan", "--hbm_bandwidth=-1TB"], "--hbm_bandwidth: '-1TB'; allowed is a positive size"),
        (["--plan", "--peak_flops", "989TB"], "--peak_flops: '989TB'; allowed is a positive FLOP/s rate such as 989T"),
        (
            ["--memory_cap", "80GB", "--device", "cpu"],
            "--memory_cap: caps CUDA allocations; allowed with a cuda --device, not cpu",
        ),
        (
            ["--memory_cap", "80GB", "--plan"],
            "--memory_cap: caps the CUDA allocations of a measurement; not with --plan",
        ),
        (["--memory_cap", "-80GB", "--device", "cpu"], "--memory_cap: '-80GB'; allowed is a positive size"),
    ],
)
def test_bad_flag_combinations_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        test_latency.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def fake_card(monkeypatch, name: str = "NVIDIA H200", total: float = 141e9) -> list[tuple]:
    """CUDA device queries answering for one card; returns the memory fractions set."""
    from types import SimpleNamespace

    fractions = []
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(name=name, total_memory=int(total))
    )
    monkeypatch.setattr(
        torch.cuda, "set_per_process_memory_fraction", lambda fraction, device: fractions.append((fraction, device))
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return fractions


def test_memory_cap_is_a_fraction_of_the_card_and_recorded(monkeypatch):
    fractions = fake_card(monkeypatch)
    args = latency.parse_args(["--device", "cpu"])
    assert latency.apply_memory_cap(args) == {"memory_cap": None} and not fractions
    args.device, args.memory_cap = "cuda", "80GB"
    args.memory_cap_bytes = latency.check_memory_cap(args)
    record = latency.apply_memory_cap(args)
    assert record == {"memory_cap": "80GB", "memory_cap_bytes": 80 * 10**9, "memory_cap_fraction": 80e9 / 141e9}
    assert fractions == [(80e9 / 141e9, 0)]  # the current device's index: the cap takes an index, "cuda" has none
    args.memory_cap = "160GB"
    with pytest.raises(
        UsageError, match=r"^--memory_cap: 160GB is more than the 141.0 GB of the NVIDIA H200; allowed is at most"
    ):
        latency.check_memory_cap(args)


def test_rooflines_and_auto_price_the_gpu_or_the_given_figures(monkeypatch):
    """One GPU table (models.roofline) for the rooflines and for auto; --hbm_bandwidth / --peak_flops take precedence;
    on a CPU the rooflines use H100 SXM figures and auto prices nothing unless a figure is given."""
    cpu = latency.parse_args(["--device", "cpu"])
    assert latency.roofline_hardware(cpu).hbm_bandwidth == 3.35e12 and latency.pricing_hardware(cpu) is None
    given = latency.parse_args(["--device", "cpu", "--hbm_bandwidth", "4.8TB"])
    assert latency.pricing_hardware(given) == latency.roofline_hardware(given)
    assert (given_hw := latency.roofline_hardware(given)).hbm_bandwidth == 4.8e12 and given_hw.peak_flops == 989e12
    monkeypatch.setattr(latency, "device_hardware", lambda device: roofline.gpu_hardware("NVIDIA H200"))
    gpu = latency.parse_args(["--device", "cpu"])
    gpu.device = "cuda"
    assert latency.pricing_hardware(gpu) == latency.roofline_hardware(gpu) == roofline.gpu_hardware("NVIDIA H200")


def test_auto_prefill_is_priced_in_the_json(configs, tmp_path, monkeypatch):
    """--prefill auto on a CPU with a given bandwidth: each run records the cost model's seconds of both paths and
    runs the cheaper one where the token step is captured (here sequential: the matrix rate is tiny and the bandwidth
    huge), the iterative one where it is not (the CPU's eager step is not priced)."""
    argv = [
        "--configs",
        configs[1],
        "--prompt_len",
        "12",
        "--gen_len",
        "2",
        "--batches",
        "2",
        "--cache",
        "static",
        "--device",
        "cpu",
        "--hbm_bandwidth",
        "1000TB",
        "--peak_flops",
        "1G",
        "--prefill",
        "auto",
    ]
    (eager,) = test_latency.main([*argv, "--output_dir", str(tmp_path / "eager")])["models"]["test_tiny_opt"]["runs"]
    monkeypatch.setattr(sequential_prefill, "CPU_COMPILE_BACKEND", "eager")  # the token step compiled: captured
    (captured,) = test_latency.main([*argv, "--output_dir", str(tmp_path / "compiled")])["models"]["test_tiny_opt"][
        "runs"
    ]
    estimates = captured["prefill_cost_model_s"]
    assert set(estimates) == {"iterative", "sequential"} and min(estimates, key=estimates.get) == "sequential"
    assert (eager["prefill_path"], captured["prefill_path"]) == ("iterative", "sequential")
    sequential_prefill.compiled_token_step.cache_clear()
    torch._dynamo.reset()


def test_plot_title_states_the_full_setting():
    args = latency.parse_args(["--prompt_len", "2048", "--gen_len", "2048", "--steps", "16", "--device", "cpu"])
    assert (
        test_latency.plot_title(args, "NVIDIA H200")
        == "prompt 2048 + 2048 new tokens, NVIDIA H200\n(decode from 16 steps at each end)"
    )
    args = latency.parse_args(["--prompt_len", "8", "--gen_len", "4", "--device", "cpu"])
    assert test_latency.plot_title(args, "cpu") == "prompt 8 + 4 new tokens, cpu\n(all steps timed)"


def test_compiled_step_timer_times_the_compiled_call_and_restores_it():
    """The timer stands in for generate's compiled decode call while active, then puts the original back."""
    import time
    from types import SimpleNamespace

    def compiled_call(**kwargs):
        time.sleep(0.02 * (1 + kwargs["step"] % 2))  # 20 ms, then 40 ms
        return kwargs["step"]

    model = SimpleNamespace(_compiled_call=compiled_call, device=torch.device("cpu"))
    with CompiledStepTimer(model) as timer:
        assert [model._compiled_call(step=i) for i in range(4)] == [0, 1, 2, 3]
    assert model._compiled_call is compiled_call and len(timer.spans) == 4
    assert 20 <= timer.mean_ms() < 200  # three timed calls (the first one is warm-up)
    spread = timer.spread_ms()
    assert spread["calls"] == 3 and 40 <= spread["max"] < 200 and 20 <= spread["min"] < 40 <= spread["median"]

    uncompiled = SimpleNamespace(device=torch.device("cpu"))  # generate compiled nothing (CPU)
    with CompiledStepTimer(uncompiled) as timer:
        pass
    assert not hasattr(uncompiled, "_compiled_call") and timer.mean_ms() is None and timer.spread_ms() is None


# The tiny configs' shape: 6 layers, hidden 64, MLP 128, 4 query heads and 2 KV heads of 16 dims; float32 on a CPU.
TINY_LAYER_WEIGHTS = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128  # q, o, k, v, MLP of a Llama layer
TINY_KV_READ_PER_TOKEN = 6 * 2 * 2 * 16 * 4  # every layer reads one layer's keys and values


def test_prefill_modes_extrapolated_end_to_end(configs, tmp_path):
    """--prefill with two modes gives one LCKV entry per mode (static cache, so the sequential one fills it through
    prefill_cache; the Llama's entry records its one parallel pass); with --steps below --gen_len each run also times
    steps at the end of the context and reports the extrapolated end-to-end rate over the full gen_len, and that rate
    over the e2e roofline (given bandwidth and matrix rate), computed here by hand."""
    argv = [
        "--configs",
        *configs,
        "--prompt_len",
        "12",
        "--gen_len",
        "8",
        "--steps",
        "2",
        "--batches",
        "2",
        "--cache",
        "static",
        "--prefill",
        "iterative,sequential",
        "--device",
        "cpu",
        "--output_dir",
        str(tmp_path),
        "--hbm_bandwidth",
        "2GB",
        "--peak_flops",
        "3G",
    ]
    out = test_latency.main(argv)
    assert set(out["models"]) == {"tiny_llama", "test_tiny_opt:iterative", "test_tiny_opt:sequential"}
    assert "end of the context" in out["setting"]["extrapolation"]
    roofline = out["setting"]["roofline"]
    assert (roofline["hbm_bandwidth_bytes_per_s"], roofline["peak_bf16_flops_per_s"]) == (2e9, 3e9)
    # A Llama's prefill of 12 tokens at 3 GFLOP/s: matrix work of 2 sequences, causal attention over 12^2 / 2 pairs.
    t_prefill = (2 * 2 * 12 * 6 * TINY_LAYER_WEIGHTS + 6 * 4 * 4 * 16 * 2 * 12 * 12 / 2) / 3e9
    for name, r in out["models"].items():
        (run,) = r["runs"]
        assert run["prefill_path"] == r["prefill"] == (name.split(":")[1] if ":" in name else "parallel")
        assert run["step_ms_end"] > 0 and run["mean_step_ms"] == pytest.approx(
            (run["step_ms"] + run["step_ms_end"]) / 2
        )
        assert run["e2e_s"] == pytest.approx(run["prefill_s"] + 7 * run["mean_step_ms"] / 1e3)
        assert r["max_batch_e2e_throughput"] == pytest.approx(2 * 8 / run["e2e_s"])
        assert run["mean_decode_throughput"] == pytest.approx(2 * 1e3 / run["mean_step_ms"])
        # 7 decode steps at 2 GB/s, step j reading the weights and 2 sequences x (12 + j) tokens of KV.
        t_decode = sum(r["weight_bytes"] + 2 * TINY_KV_READ_PER_TOKEN * (12 + j) for j in range(1, 8)) / 2e9
        assert run["e2e_roofline_throughput"] == pytest.approx(2 * 8 / (t_prefill + t_decode))
        assert run["e2e_vs_roofline"] == pytest.approx(run["e2e_throughput"] / run["e2e_roofline_throughput"])
        assert run["prefill_vs_roofline"] == pytest.approx(run["prefill_s"] / run["prefill_roofline_s"])
    assert out["ratios"]["test_tiny_opt:sequential/tiny_llama"]["max_batch_e2e_throughput"] > 0


def test_each_config_prefills_by_its_own_mode_without_the_flag(configs, tmp_path):
    """Without --prefill an LCKV config is measured with its own ``prefill`` (as run_generation.py runs it), not
    replaced by "auto": a config saved with the exact prefill records it, and the setting says "default"."""
    fields = json.loads(Path(configs[1]).read_text())
    for mode in ("iterative", "sequential", "auto"):
        assert test_latency.prefill_modes_for(tiny_config(prefill=mode), [], given=False) == [mode]
    exact = tmp_path / "tiny_seq.json"
    exact.write_text(json.dumps(fields | {"prefill": "sequential"}))
    argv = ["--configs", str(exact), "--prompt_len", "4", "--gen_len", "2", "--batches", "1", "--device", "cpu"]
    out = test_latency.main([*argv, "--output_dir", str(tmp_path / "out")])
    assert out["setting"]["prefill"] == "default"
    (run,) = out["models"]["tiny_seq"]["runs"]
    assert (out["models"]["tiny_seq"]["prefill"], run["prefill_path"]) == ("sequential", "sequential")


def test_filled_cache_reports_its_length(configs):
    """The end-of-context timing cache holds `length` tokens in every KV layer, for both cache kinds."""
    for kind in ("static", "dynamic"):
        args = latency.parse_args(["--cache", kind, "--prompt_len", "8", "--gen_len", "8", "--device", "cpu"])
        model = latency.build_model(load_config_for_length(configs[1], 16), args, torch.float32)
        cache = latency.filled_cache(model, args, 2, 11)
        assert int(cache.get_seq_length()) == 11
        total, slots = latency.kv_bytes_and_slots(cache)
        assert slots == (16 if kind == "static" else 11) and total == 3 * 2 * 2 * 2 * 16 * slots * 4  # 3 KV layers
        if kind == "static":  # rewound in place, for its own batch only
            assert latency.filled_cache(model, args, 2, 5, reuse=cache) is cache and int(cache.get_seq_length()) == 5
            with pytest.raises(ValueError, match=r"^reuse: a cache of batch \[2\]; allowed: one made for batch 3$"):
                latency.filled_cache(model, args, 3, 5, reuse=cache)


def test_bad_prefill_flag_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit):
        test_latency.main(["--prefill", "iterative,fast"])
    assert (
        capsys.readouterr().err.strip()
        == "test_latency.py: error: --prefill: unknown 'fast'; allowed are auto, iterative, sequential"
    )


def tiny_opt_static_argv(config: str, prefill: str, out_dir, *extra: str) -> list[str]:
    """test_latency.py's arguments for ``config`` at batch 2, prompt 12 + 4 new tokens, a static cache, ``--prefill
    prefill``, on the CPU, then ``extra``."""
    return [
        *("--configs", config, "--prompt_len", "12", "--gen_len", "4", "--batches", "2", "--cache", "static"),
        *("--prefill", prefill, "--device", "cpu", "--output_dir", str(out_dir), *extra),
    ]


def test_sampled_sequential_prefill_leaves_a_full_cache(configs, tmp_path, monkeypatch):
    """--prefill_sample times 2 tokens at each end of the prompt, then decoding continues from a cache holding the
    prompt: the extrapolated prefill is reported and the steps after it run as usual. One static cache serves the
    batch's every generation, rewound each time (a second one doubles the memory, and LCKV batch 4096 did not fit;
    a new one makes the captured steps record their CUDA graphs again inside the timed window)."""
    made, used = [], []
    make_cache = test_latency.filled_cache

    def counted_cache(model, args, batch, length, reuse=None):
        cache = make_cache(model, args, batch, length, reuse)
        if reuse is None:
            made.append(cache)
        return cache

    monkeypatch.setattr(test_latency, "filled_cache", counted_cache)
    filled = []
    original = test_latency.prefill_cache

    def recorded_prefill(model, ids, cache):
        filled.append((int(cache.get_seq_length()), ids.shape[1]))
        used.append(cache)
        return original(model, ids, cache)

    monkeypatch.setattr(test_latency, "prefill_cache", recorded_prefill)
    out = test_latency.main(tiny_opt_static_argv(configs[1], "sequential", tmp_path, "--prefill_sample", "2"))
    # The untimed warm-up's 4-token prompt (3 prefilled), then the timed start and end of the 11 prompt tokens before
    # the last.
    assert filled == [(0, 3), (0, 2), (9, 2)]
    assert len(made) == 1 and all(cache is made[0] for cache in used)
    (run,) = out["models"]["test_tiny_opt"]["runs"]
    assert (
        run["prefill_s"] > 0
        and run["e2e_throughput"] > 0
        and "scaled to prompt_len - 1" in out["setting"]["extrapolation"]
    )
    # Each segment's ms per token step, over the roofline of the step in its middle (1.5 and 10.5 tokens filled).
    shape, hardware = roofline.model_shape(load_config_for_length(configs[1], 16)), roofline.UNKNOWN_GPU
    expected = [1e3 * roofline.token_step_cost(shape, 2, n, 4).seconds(hardware) for n in (1.5, 10.5)]
    assert run["prefill_sample_roofline_ms"] == pytest.approx(expected) and all(
        ms > 0 for ms in run["prefill_sample_step_ms"]
    )
    assert run["prefill_sample_vs_roofline"] == pytest.approx(
        [t / r for t, r in zip(run["prefill_sample_step_ms"], expected, strict=True)]
    )
    with pytest.raises(UsageError, match="^--prefill_sample: 6; allowed"):
        latency.parse_args(["--prefill_sample", "6", "--prompt_len", "12"])


@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
def test_one_static_cache_serves_every_generation_of_a_batch(configs, tmp_path, monkeypatch, cache_kind):
    """The warm-up, the timed run and the run at the end of the context (--steps < --gen_len) of one batch all use
    the same static cache, rewound: the CUDA graphs captured in the warm-up replay in the timed runs instead of being
    recorded again there. A dynamic cache is new each time (nothing is captured)."""
    made, returned = [], []
    make_cache = test_latency.filled_cache

    def counted_cache(model, args, batch, length, reuse=None):
        cache = make_cache(model, args, batch, length, reuse)
        made.extend([cache] if reuse is None else [])
        returned.append(cache)
        assert int(cache.get_seq_length()) == length
        return cache

    monkeypatch.setattr(test_latency, "filled_cache", counted_cache)
    argv = tiny_opt_static_argv(configs[0], "auto", tmp_path, "--steps", "2")
    argv.insert(argv.index(configs[0]) + 1, configs[1])  # both models, the Llama first
    argv[argv.index("static")] = cache_kind
    test_latency.main(argv)
    generations = 3  # warm-up, timed, end of the context: per model
    if cache_kind == "static":
        assert len(made) == 2 and len(returned) == 2 + 2 * generations
        assert {id(c) for c in returned[: 1 + generations]} == {id(made[0])}
        assert {id(c) for c in returned[1 + generations :]} == {id(made[1])}
    else:
        assert len(made) == len(returned) == 2 * generations


def test_extrapolate_means_start_and_end_steps():
    assert test_latency.extrapolate(1.0, 10.0, 30.0, 101) == (20.0, 3.0)
    assert test_latency.extrapolate(1.0, 10.0, None, 101) == (10.0, 2.0)  # all steps ran: the measured mean


@pytest.mark.parametrize("prefill, warm_prompt", [("iterative", 12), ("sequential", 4)])
def test_untimed_warm_up_runs_the_prefill_path_at_the_measured_shape(
    configs, tmp_path, monkeypatch, prefill, warm_prompt
):
    """Before the timed run of a batch, one untimed generation runs the prefill path at the measured prompt length
    (the first kernels of a shape stay out of prefill_s); the sequential prefill's step has one shape at any length,
    so 4 tokens warm it up. Without --compile too."""
    prompts = []
    original = test_latency.generate_once
    monkeypatch.setattr(
        test_latency,
        "generate_once",
        lambda model, args, batch, steps, bar, prompt_len, **k: (
            prompts.append(prompt_len) or original(model, args, batch, steps, bar, prompt_len, **k)
        ),
    )
    test_latency.main(tiny_opt_static_argv(configs[1], prefill, tmp_path))
    assert prompts == [warm_prompt, 12]


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compile_mode_reaches_the_decode_step_and_the_json(configs, mode):
    """--compile_mode becomes the model's generation_config.compile_config, which generate's compiled forward and the
    captured loop's token selection are both compiled with (models.fast_decode.select_compile_options)."""
    from models.fast_decode import select_compile_options

    args = latency.parse_args(["--compile_mode", mode, "--device", "cpu"])
    model = latency.build_model(load_config_for_length(configs[1], 16), args, torch.float32)
    assert model.generation_config.compile_config.mode == mode
    _, options = select_compile_options(model.generation_config.compile_config)
    assert options["triton.cudagraphs"] and bool(options.get("max_autotune")) == (mode == "max-autotune")
    with pytest.raises(UsageError, match="--compile_mode: invalid choice: 'default'"):
        latency.parse_args(["--compile_mode", "default"])


def test_measured_caches_are_allocated_before_the_prefill(configs):
    """A static cache is whole before the first forward (every KV layer at its full slots, nothing filled), so a large
    prefill's activations never share the allocator's segments with a cache growing layer by layer."""
    from transformers.cache_utils import StaticLayer

    args = latency.parse_args(["--cache", "static", "--prompt_len", "8", "--gen_len", "8", "--device", "cpu"])
    for path in configs:
        model = latency.build_model(load_config_for_length(path, 16), args, torch.float32)
        cache = latency.filled_cache(model, args, 3, 0)
        static = [layer for layer in cache.layers if isinstance(layer, StaticLayer)]
        assert static and all(
            layer.is_initialized and layer.keys.shape[0] == 3 and layer.keys.shape[2] == 16 for layer in static
        )
        assert int(cache.get_seq_length()) == 0


def test_sliding_window_model_times_the_end_of_the_context(tmp_path):
    """A model with sliding-window layers (their static layers keep the length in a Python int too) runs the steps at
    the end of the context from the one rewound cache (it used to fail there, writing past the window)."""
    config = tiny_config(kv_sources=[0, 4, 4, 4, 4, 5], sliding_window_layers=[0, 5], sliding_window=3, num_encoders=12)
    path = tmp_path / "windowed.json"
    config.to_json_file(path)
    out = test_latency.main(
        [*tiny_opt_static_argv(str(path), "sequential", tmp_path / "out"), "--steps", "2", "--gen_len", "8"]
    )
    (run,) = out["models"]["windowed"]["runs"]
    assert run["step_ms"] > 0 and run["step_ms_end"] > 0 and run["e2e_throughput"] > 0
