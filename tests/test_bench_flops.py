"""bench/bench_flops.py: FLOP counts on the meta device, ratios to the Llama baseline, JSON."""

import json

import pytest

from bench import bench_flops
from models import OptLlamaConfig
from models.config_loading import llama_twin

from .conftest import CONFIGS


def test_flops_json_with_ratios_and_all_standard_equals_llama(tmp_path):
    fields = json.loads((CONFIGS / "test_tiny_opt.json").read_text())
    llama = llama_twin(OptLlamaConfig(**fields)).to_dict()
    standard = fields | {"layer_types": "0_0_0_0_0_0"}  # opt-llama without condensed layers: Llama's function
    paths = []
    for name, config in [("llama", llama), ("lckv", fields), ("standard", standard)]:
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(config))
    out = bench_flops.main(["--configs", *map(str, paths), "--seq_len", "16", "--output_dir", str(tmp_path)])
    assert json.loads((tmp_path / "flops.json").read_text()) == out
    models = out["models"]
    assert out["baseline"] == "llama"
    assert models["standard"]["prefill_tflop"] == models["llama"]["prefill_tflop"]
    assert models["standard"]["train_step_tflop"] == models["llama"]["train_step_tflop"]
    # 9 iterations of the 4-layer block (the target's last-but-one iterations only project KVs) => several x Llama.
    assert models["lckv"]["prefill_vs_baseline"] == pytest.approx(
        models["lckv"]["prefill_tflop"] / models["llama"]["prefill_tflop"]
    )
    assert 4 < models["lckv"]["prefill_vs_baseline"] < 9 and 1.5 < models["lckv"]["train_step_vs_baseline"] < 9
