"""bench/measure_prefill.py: its parts fit the GPU calls, and its checks read test_latency's JSON and logs right."""

import pytest

from bench import measure_prefill
from models.roofline import Hardware, Shape, iterative_prefill_cost, parallel_prefill_cost, token_step_cost

RECOMPILE_LOG = (
    "V1130 02:31:05.324000 9064 torch/_dynamo/guards.py:5396] [0/1] [__recompiles] "
    "Recompiling function token_step in /r/models/sequential_prefill.py:50\n"
    "V1130 02:31:05.324000 9064 torch/_dynamo/guards.py:5396] [0/1] [__recompiles]     "
    "triggered by the following guard failure(s):\n"
    "V1130 02:31:05.324000 9064 torch/_dynamo/guards.py:5396] [0/1] [__recompiles]     "
    "- 0/0: tensor 'masks['causal']' stride mismatch at index 0. expected 1000, actual 12800\n"
    "V1130 02:32:55.260000 10349 torch/_dynamo/guards.py:5396] [1/1] [__recompiles] "
    "Recompiling function wrapped_func in /t/utils/deprecation.py:121\n"
)


def test_recompilations_are_read_from_the_torch_log():
    assert len(measure_prefill.recompilations(RECOMPILE_LOG)) == 2
    (line,) = measure_prefill.recompilations(RECOMPILE_LOG, "token_step")
    assert "sequential_prefill.py" in line
    assert measure_prefill.recompilations("no recompilation here\n") == []


def latency_json(runs_by_name: dict[str, list[dict]], prompt_len: int = 2048) -> dict:
    return {
        "setting": {"prompt_len": prompt_len},
        "models": {name: {"runs": runs} for name, runs in runs_by_name.items()},
    }


def test_batch1_report_bounds_the_prefill_by_captured_steps():
    latency = latency_json({"tinyllama_opt": [{"batch": 1, "prefill_s": 5.0, "compiled_step_ms": 2.0}]})
    report = measure_prefill.batch1_report(latency, RECOMPILE_LOG)
    assert report["bound_s"] == pytest.approx(2048 * 1.5 * 2.0 / 1e3) and report["within_bound"]
    assert report["prefill_per_token_in_steps"] == pytest.approx(5.0e3 / (2048 * 2.0))
    assert (report["token_step_recompilations"], report["recompilations"]) == (1, 2)
    slow = latency_json({"tinyllama_opt": [{"batch": 1, "prefill_s": 7.0, "compiled_step_ms": 2.0}]})
    assert measure_prefill.batch1_report(slow, "")["within_bound"] is False
    uncompiled = latency_json({"tinyllama_opt": [{"batch": 1, "prefill_s": 7.0, "compiled_step_ms": None}]})
    assert measure_prefill.batch1_report(uncompiled, "")["within_bound"] is None  # CPU: nothing captured to compare


def test_paths_report_compares_auto_with_the_faster_measured_path():
    estimates = {"iterative": 2.0, "sequential": 4.0}
    latency = latency_json(
        {
            "tinyllama_opt:iterative": [
                {"batch": 1, "prefill_s": 3.0, "prefill_cost_model_s": estimates},
                {"batch": 32, "prefill_s": 9.0, "prefill_cost_model_s": estimates},
                {"batch": 512, "oom": True},
            ],
            "tinyllama_opt:sequential": [
                {"batch": 1, "prefill_s": 5.0, "prefill_cost_model_s": estimates},
                {"batch": 32, "prefill_s": 6.0, "prefill_cost_model_s": estimates},
            ],
        }
    )
    first, second = measure_prefill.paths_report(latency)
    assert (first["batch"], first["faster"], first["auto"], first["auto_is_faster"]) == (
        1,
        "iterative",
        "iterative",
        True,
    )
    assert first["measured_over_estimate"] == {"iterative": 1.5, "sequential": 1.25}
    assert (second["faster"], second["auto_is_faster"]) == ("sequential", False)


def test_step_report_against_the_token_step_roofline():
    shape = Shape(
        layer_weights=(10, 10),
        layer_kv_weights=(2, 2),
        query_heads=2,
        kv_heads=1,
        head_dim=4,
        block=range(2, 2),
        num_iterations=1,
    )
    hardware = Hardware("toy", hbm_bandwidth=1e3, peak_flops=1e3)
    cost = token_step_cost(shape, 4, 10, 2)
    report = measure_prefill.step_report(1.2 * 1e3 * cost.seconds(hardware), shape, 4, 10, hardware, 2)
    assert report["vs_roofline"] == pytest.approx(1.2) and report["within_bound"]
    assert report["roofline_ms"] == pytest.approx(max(report["compute_ms"], report["memory_ms"]))


def test_every_part_fits_a_call_and_has_a_smoke_twin():
    gpu, smoke = measure_prefill.parts(smoke=False), measure_prefill.parts(smoke=True)
    assert gpu.keys() == smoke.keys()
    for part, runs in gpu.items():
        latency_runs = [run for run in runs if isinstance(run, measure_prefill.LatencyRun)]
        assert sum(run.limit_s for run in latency_runs) <= 9 * 60
        for run in latency_runs:
            assert "--memory_cap" in run.argv and "cpu" not in run.argv
        for run in smoke[part]:
            if isinstance(run, measure_prefill.LatencyRun):
                assert run.argv[run.argv.index("--device") + 1] == "cpu" and "--memory_cap" not in run.argv
            else:
                assert run.device == "cpu"


def test_gpu_parts_without_a_gpu_are_a_one_line_error():
    with pytest.raises(SystemExit) as exit_info:
        measure_prefill.main(["batch1", "--output_dir", "/tmp/never_written"])
    assert exit_info.value.code == 2


def test_prefill_report_per_layer_run_against_the_iterative_roofline():
    shape = Shape(
        layer_weights=(10, 10, 10, 10),
        layer_kv_weights=(2, 0, 2, 2),
        query_heads=2,
        kv_heads=1,
        head_dim=4,
        block=range(1, 3),
        num_iterations=9,
    )
    hardware = Hardware("toy", hbm_bandwidth=1e3, peak_flops=1e3)
    report = measure_prefill.prefill_report([3.0, 2.0], shape, 2, 16, hardware, 2, iterative=True)
    assert report["layer_runs"] == 4 + 8 * 1 and report["prefill_s"] == 2.0
    assert report["ms_per_layer_run"] == pytest.approx(2e3 / 12)
    assert report["roofline_s"] == pytest.approx(iterative_prefill_cost(shape, 2, 16, 2).seconds(hardware))
    llama = measure_prefill.prefill_report([1.0], shape, 2, 16, hardware, 2, iterative=False)
    assert llama["roofline_s"] == pytest.approx(parallel_prefill_cost(shape, 2, 16, 2).seconds(hardware))


def test_profile_iterative_runs_on_the_cpu(tmp_path):
    spec = measure_prefill.IterativeRun(measure_prefill.TINY, ((1, 12), (2, 10)), 1, (1, 12), "cpu")
    report = measure_prefill.time_iterative(spec)
    for key in ("flags_as_set", "shifted_causal_strict", "llama_same_shape"):
        assert [(row["batch"], row["prompt"]) for row in report[key]] == [(1, 12), (2, 10)]
    # test_tiny_opt: 6 layers, the block 1..4 run min(9, T) times, its target with queries only in the last one
    assert [row["layer_runs"] for row in report["flags_as_set"]] == [6 + 8 * 3] * 2
    assert [row["layer_runs"] for row in report["llama_same_shape"]] == [6, 6]
    attention = report["strict_attention"]
    assert attention["mask"]["dtype"] == "torch.bool" and attention["as_model_calls_ms"] > 0
    assert "aten::scaled_dot_product_attention" in attention["as_model_calls_runs"]
    assert report["profile"]["top_cpu_ops"] and report["profile"]["wall_ms_per_step"] > 0


def test_token_steps_run_on_the_cpu(tmp_path, monkeypatch):
    """The steps part at tiny sizes: every fill level timed without a new graph, with the fused projections (the
    end-to-end runs' setting), and a profile at the lowest and the middle fill level of the largest batch."""
    built = []
    build = measure_prefill.latency.build_model
    monkeypatch.setattr(measure_prefill.latency, "build_model", lambda *a: built.append(build(*a)) or built[-1])
    spec = measure_prefill.StepsRun(measure_prefill.TINY, (2,), (2, 30, 70), 4, 2, 160, "cpu")
    rows = measure_prefill.time_steps(spec, tmp_path)
    assert all(layer.mlp.gate_up_proj is not None for layer in built[0].model.layers)
    steps = [row for row in rows if "profile" not in row]
    assert [row["new_graphs"] for row in steps] == [0, 0, 0] and all(row["step_ms"] > 0 for row in steps)
    assert [row["profile"]["filled"] for row in rows if "profile" in row] == [2, 30]
    names = {op["name"] for row in rows if "profile" in row for op in row["profile"]["top_cpu_ops"]}
    assert names and "aten::linear" in names
