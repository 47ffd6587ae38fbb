"""bench/tune_decode_attention.py: the table it prints is the table launch_config reads (a round trip over measured
shapes), its byte count and candidate counts, bad flags, and a CPU smoke run of the whole path (Triton's
interpreter)."""

import json

import pytest
import torch

from bench import kernel_tuning
from bench import tune_decode_attention as tune
from models.kernels import decode_launch
from models.kernels.decode_launch import DEFAULT, KernelConfig, check_table, launch_config, resolve_launch
from tools.cli import UsageError

FAST, OTHER = KernelConfig(128, 8, 3, 2), KernelConfig(32, 2, 4, 1)


def measured(model: str, batch: int, speedup: float, best: KernelConfig) -> dict:
    """A shape's result as tune_shape reports it (only the fields the table reads)."""
    shape = tune.MODELS[model]
    return {
        "model": model,
        "batch": batch,
        **shape._asdict(),
        "kv_rows": batch * shape.kv_heads,
        "speedup": speedup,
        "best": {"config": best._asdict()},
    }


RESULTS = [
    measured("tinyllama", 1, 1.02, OTHER),  # within min_gain: the default stays
    measured("tinyllama", 32, 1.5, OTHER),
    measured("tinyllama", 128, 1.3, FAST),
    measured("tinyllama", 512, 1.2, FAST),  # as the row before it: dropped
    measured("llama2-7b", 1, 1.1, OTHER),
    measured("llama-33b", 1, 1.0, DEFAULT),
    measured("llama2-7b", 32, 1.01, FAST),
    measured("llama-33b", 32, 1.4, FAST),
]


def load_literal(source: str) -> dict:
    namespace = vars(decode_launch).copy()
    exec(source, namespace)
    return namespace["TUNED"]


def test_printed_table_is_what_launch_config_reads():
    table = tune.table_rows(RESULTS, value_bytes=2, min_gain=0.03)
    assert table == {
        (8, 64, 2): ((4, DEFAULT), (128, OTHER), (512, FAST)),
        (1, 128, 2): ((32, OTHER), (52, DEFAULT), (1664, FAST)),  # 7B batch 1, 33B batch 1, 33B batch 32
    }
    check_table(table)
    assert load_literal(tune.table_literal(table, "test")) == table
    for result in RESULTS:  # every measured shape launches its chosen config
        shape = tune.MODELS[result["model"]]
        expected = resolve_launch(tune.chosen_config(result, 0.03), result["batch"], shape.kv_heads, 4096, 132)
        assert (
            launch_config(result["batch"], shape.kv_heads, shape.group, shape.head_dim, 4096, 2, 132, table) == expected
        )


def test_measured_rows_replace_the_current_tables_and_keep_the_rest():
    current = {(8, 64, 2): ((4, OTHER), (128, FAST), (512, OTHER)), (1, 128, 2): ((32, FAST),)}
    # batch 32 (128 rows) measured: the default now wins there, and from 128 rows to the 512 row too; batch 128 (512
    # rows) measured as the row before it: dropped. The 7B key is not measured: kept.
    results = [measured("tinyllama", 32, 1.0, FAST), measured("tinyllama", 128, 1.0, FAST)]
    assert tune.table_rows(results, 2, 0.03, current) == {
        (8, 64, 2): ((4, OTHER), (128, DEFAULT)),
        (1, 128, 2): ((32, FAST),),
    }
    # batch 1 (4 rows) measured FAST: the 128 row, equal to the one before it now, is dropped
    assert tune.table_rows([measured("tinyllama", 1, 1.5, FAST)], 2, 0.03, current)[(8, 64, 2)] == (
        (4, FAST),
        (512, OTHER),
    )
    assert tune.table_rows([], 2, 0.03, current) == current


def test_replace_table_rewrites_only_the_assignment_and_its_comment():
    source = tune.DECODE_LAUNCH.read_text()
    table = {(8, 64, 2): ((4, FAST),)}
    rewritten = kernel_tuning.replace_table(source, tune.table_literal(table, "a new run"))
    namespace: dict = {}
    exec(rewritten, namespace)
    assert namespace["TUNED"] == table
    before, after = source.split("TUNED:")[0], rewritten.split("TUNED:")[0]
    assert after == before.rsplit("# ", 1)[0] + "# a new run\n"  # the comment above the assignment replaced
    tail = source.split("\n}\n", 1)[1]
    assert rewritten.endswith(tail)  # everything after the table kept
    with pytest.raises(ValueError, match="TUNED"):
        kernel_tuning.replace_table("x = 1\n", "TUNED = {}\n")


def test_a_table_of_defaults_is_empty():
    assert tune.table_rows([measured("tinyllama", 1, 1.01, FAST), measured("tinyllama", 32, None, FAST)], 2, 0.03) == {}
    assert load_literal(tune.table_literal({}, "nothing beat the default")) == {}


def test_useful_bytes():
    # tinyllama, batch 512, 2048 filled, bf16: K and V, then q and out (32 query heads)
    assert (
        tune.useful_bytes(tune.MODELS["tinyllama"], 512, 2048, 2) == 2 * 512 * 4 * 2048 * 64 * 2 + 2 * 512 * 32 * 64 * 2
    )


def test_kernel_grid_puts_the_default_first_once():
    grid = tune.kernel_grid(tune.BLOCK_NS, tune.NUM_WARPS, tune.NUM_STAGES, tune.WAVES_CHOICES)
    assert grid[0] == DEFAULT and len(grid) == len(set(grid)) == 81
    assert tune.kernel_grid((32,), (2,), (3,), (1,)) == [DEFAULT, KernelConfig(32, 2, 3, 1)]


def test_dry_run_counts_launches_largest_batches_first(capsys):
    plan = tune.main(["--dry_run", "--processors", "132", "--models", "tinyllama,llama2-7b", "--batches", "1,512"])
    assert plan["shapes"] == ["tinyllama batch 512", "llama2-7b batch 512", "tinyllama batch 1", "llama2-7b batch 1"]
    assert plan["stage1_launches"] == 4 * 27  # the 27 configs of the grid per shape
    # one compilation per launch, head dim and G == 1; none shared: D 64 / 128, and 1 split at batch 512 against
    # 64 (tinyllama; 32 with tile 128) and 9 (7B) at batch 1
    assert plan["stage1_compilations"] == 4 * 27
    tinyllama = tune.main(["--dry_run", "--processors", "132", "--models", "tinyllama", "--batches", "512,2048"])
    assert tinyllama["stage1_compilations"] == 27  # both batches run 1 split: one compilation serves both
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == plan


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "llama-70b"], "--models: 'llama-70b'"),
        (["--block_n", "48"], "--block_n: 48"),
        (["--num_warps", "3"], "--num_warps: 3"),
        (["--filled", "5000"], "--filled: 5000"),
        (["--batches", "0"], "--batches"),
        (["--hbm_bandwidth", "fast"], "--hbm_bandwidth: 'fast'"),
    ],
)
def test_bad_flags(argv, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        tune.parse_args([*argv, "--output_dir", str(tmp_path)])


def smoke_bench(tmp_path, deadline: float = float("inf")) -> tune.Bench:
    args = tune.parse_args(["--smoke", "--output_dir", str(tmp_path)])
    return tune.Bench(args, tune.SMOKE["models"]["smoke"], 3, 4, deadline)


def test_candidates_that_differ_fail_or_run_late_are_recorded(interpreted_kernel, tmp_path, monkeypatch):
    bench = smoke_bench(tmp_path)
    bench.reference = torch.ones(3, 1, 4, 16)  # not what the kernel computes
    assert bench.measure(DEFAULT)["status"] == "mismatch"
    from triton.runtime.errors import OutOfResources

    def too_big(launch):
        raise OutOfResources(10**6, 232448, "shared memory")

    monkeypatch.setattr(bench, "run", too_big)
    assert bench.measure(FAST)["status"] == "out_of_resources"
    late = smoke_bench(tmp_path, deadline=0.0)
    assert tune.tune_shape(late, [(64,), (4,), (2,), (2,)], 1)["speedup"] is None  # nothing ran: no speedup, no table
    assert late.measure(DEFAULT)["status"] == "skipped (time budget)"


def test_smoke_run(interpreted_kernel, tmp_path, monkeypatch):
    target = tmp_path / "decode_launch.py"  # --apply writes here, not into the repository
    target.write_text(tune.DECODE_LAUNCH.read_text())
    monkeypatch.setattr(tune, "DECODE_LAUNCH", target)
    report = tune.main(["--smoke", "--output_dir", str(tmp_path), "--hbm_bandwidth", "50GB", "--apply"])
    assert [(r["model"], r["batch"]) for r in report["shapes"]] == [("smoke", 3), ("smoke", 1)]
    for result in report["shapes"]:
        assert result["default"]["config"] == DEFAULT._asdict() and result["default"]["status"] == "ok"
        assert {row["config"]["block_n"] for row in result["candidates"]} == {32, 64}
        best = result["best"]
        assert best["us"] == min(row["us"] for row in result["candidates"] if row["status"] == "ok")
        assert best["hbm_fraction"] == pytest.approx(result["useful_bytes"] / (best["us"] * 1e-6) / 50e9)
    saved = json.loads((tmp_path / "tune_decode_attention.json").read_text())
    assert saved["shapes"] == json.loads(json.dumps(report["shapes"]))
    table = load_literal((tmp_path / "launch_table.txt").read_text())
    # fp32 (4 bytes per value): a key of its own, over the current table's keys
    assert table == tune.table_rows(report["shapes"], 4, 0.03, decode_launch.TUNED)
    assert decode_launch.TUNED.items() <= table.items()
    applied: dict = {}
    exec(target.read_text(), applied)
    assert applied["TUNED"] == table


def test_the_default_is_timed_again_and_keeps_the_faster(interpreted_kernel, tmp_path, monkeypatch):
    """The default runs first on a shape, before the GPU has run anything like it: it is timed once more after the
    candidates, and its row takes the faster time (both kept)."""
    timings = iter([0.5, 0.2])
    monkeypatch.setattr(tune, "time_ms", lambda *args: next(timings))
    row = smoke_bench(tmp_path).retime(DEFAULT)
    assert row["status"] == "ok" and row["us_timings"] == [500.0, 200.0] and row["us"] == 200.0
    assert row["config"] == DEFAULT._asdict()
