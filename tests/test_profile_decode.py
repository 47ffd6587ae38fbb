"""bench/profile_decode.py: the interval arithmetic of GPU busy / idle time, and a CPU smoke run on a tiny config."""

import json

import pytest

from bench import profile_decode

from .conftest import CONFIGS


@pytest.mark.parametrize(
    "intervals, expected",
    [
        ([], (0.0, 0.0)),
        ([(0, 2), (5, 6)], (3.0, 6.0)),  # a gap of 3 idle
        ([(0, 4), (1, 2), (3, 7)], (7.0, 7.0)),  # nested and overlapping: one busy stretch
        ([(5, 6), (0, 1)], (2.0, 6.0)),  # order does not matter
    ],
)
def test_merged_busy(intervals, expected):
    assert profile_decode.merged_busy(intervals) == expected


def smoke_argv(out_dir, *extra: str) -> list[str]:
    return [
        *("--device", "cpu", "--configs", str(CONFIGS / "test_tiny_opt.json"), "--prompt_len", "6", "--gen_len", "4"),
        *("--steps", "3", "--attention_batches", "1", "--top", "200", "--output_dir", str(out_dir), *extra),
    ]


def linear_calls_per_step(out: dict) -> float:
    rows = out["models"]["test_tiny_opt"]["top_cpu_ops"]
    return next(row["calls_per_step"] for row in rows if row["name"] == "aten::linear")


def test_cpu_smoke_run(tmp_path):
    """The compiled-call path (dynamo's eager backend on a CPU) is marked and summarised per step."""
    out = profile_decode.main(smoke_argv(tmp_path))
    result = out["models"]["test_tiny_opt"]
    assert result["compiled_step_ms"] > 0 and result["wall_ms_per_step"] > 0
    assert result["gpu_busy_ms_per_step"] is None  # no CUDA events on a CPU
    # the decode attention: the kernel's op (Triton's interpreter, tests/conftest.py) or the SDPA fallback
    names = {row["name"] for row in result["top_cpu_ops"]}
    assert {"lckv::split_kv_decode", "aten::scaled_dot_product_attention"} & names
    assert json.loads((tmp_path / "profile.json").read_text())["attention"][0]["batch"] == 1
    assert (tmp_path / "trace_test_tiny_opt.json").stat().st_size > 0


def test_fused_projections_reach_the_profiled_model(tmp_path):
    """--fused_projections profiles the fused model (fewer matrix products per step) and is recorded."""
    plain = profile_decode.main(smoke_argv(tmp_path / "plain"))
    fused = profile_decode.main(smoke_argv(tmp_path / "fused", "--fused_projections"))
    assert fused["setting"]["fused_projections"] and not plain["setting"]["fused_projections"]
    assert linear_calls_per_step(fused) < linear_calls_per_step(plain)


def test_small_batch_gemv_reaches_the_profiled_model(tmp_path):
    """--small_batch_gemv (Triton's interpreter on the CPU) with --fused_projections: the decode steps run the GEMV."""
    out = profile_decode.main(smoke_argv(tmp_path, "--fused_projections", "--small_batch_gemv", "--steps", "2"))
    assert out["setting"]["small_batch_gemv"]
    names = {row["name"] for row in out["models"]["test_tiny_opt"]["top_cpu_ops"]}
    assert "lckv::small_batch_gemv" in names


def test_warm_up_and_profiled_call_share_one_cache(tmp_path, monkeypatch):
    """The profiled generate reads the cache its warm-up captured the step on (rewound), so the profile holds no
    re-recording of the CUDA graphs."""
    caches = []
    original = profile_decode.prefill_in_chunks
    monkeypatch.setattr(
        profile_decode,
        "prefill_in_chunks",
        lambda model, ids, cache, chunk: (
            caches.append((cache, int(cache.get_seq_length()))) or original(model, ids, cache, chunk)
        ),
    )
    profile_decode.main(smoke_argv(tmp_path))
    assert len(caches) == 2 and caches[0][0] is caches[1][0]
    assert [length for _, length in caches] == [0, 0]  # each prefill starts from an empty (rewound) cache


def test_prefill_steps_profile_the_sequential_prefill(tmp_path, monkeypatch):
    """--prefill_steps N: N token steps of the sequential prefill, run once to compile and once profiled, each from
    the rewound cache, summarised per step (the token step's ops among the CPU ops)."""
    lengths = []
    original = profile_decode.prefill_cache
    monkeypatch.setattr(
        profile_decode,
        "prefill_cache",
        lambda model, ids, cache: (
            lengths.append((ids.shape[1], int(cache.get_seq_length()))) or original(model, ids, cache)
        ),
    )
    out = profile_decode.main(smoke_argv(tmp_path, "--prefill_steps", "4"))
    prefill = out["models"]["test_tiny_opt"]["prefill"]
    assert lengths == [(4, 0), (4, 0)] and out["setting"]["prefill_steps"] == 4
    assert prefill["steps"] == 4 and prefill["ms_per_step"] > 0 and prefill["wall_ms_per_step"] > 0
    names = {row["name"] for row in prefill["top_cpu_ops"]}
    assert "aten::linear" in names and profile_decode.PREFILL_MARK not in names


@pytest.mark.parametrize("steps", ["2", "11"])
def test_prefill_steps_out_of_range(tmp_path, steps):
    with pytest.raises(SystemExit):
        profile_decode.parse_args(smoke_argv(tmp_path, "--prefill_steps", steps))
