"""Tensor-parallel inference on the CPU: two ``torchrun`` processes (gloo) with ``tp_plan="auto"`` compute the
single-process logits and greedy tokens, for an LCKV and a standard layout, with the dynamic and the static cache (and,
for the LCKV layout, a decode step traced as one graph); each process caches its half of the KV heads of the KV layers
only. test_latency.py runs under torchrun, and its compiled decode step is one graph per model with the split-KV kernel
and the all-reduces inside."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from models.tensor_parallel import check_heads_split
from tests.conftest import CONFIGS, REPO, tiny_config, tiny_lckv_llama_config, tiny_model
from tests.tp_worker import cached_key_shapes
from tools.cli import UsageError
from tools.measure import load_config_for_length

PROCESSES = 2
PROMPTS = [[1, 17, 33, 5, 250, 9, 41, 77, 8, 19, 23, 3], [1, 60, 2, 99, 14, 14, 200, 7, 31, 45, 6, 11]]
NEW_TOKENS = 6


def torchrun(args: list[str], workdir: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}", *args]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def single_process(path: Path) -> dict:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = torch.tensor(PROMPTS)
    with torch.no_grad():
        result = {"logits": model(prompts).logits}
        for kind in ("dynamic", "static"):
            output = model.generate(
                prompts,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                cache_implementation=kind,
                return_dict_in_generate=True,
            )
            result[f"tokens_{kind}"] = output.sequences
            result[f"keys_{kind}"] = cached_key_shapes(output.past_key_values)
    return result


def halved_heads(shapes: list) -> list:
    """Key shapes ``(B, Hkv, S, D)`` with the KV heads split over the processes; None stays None."""
    return [None if s is None else (s[0], s[1] // PROCESSES, *s[2:]) for s in shapes]


def test_sharded_model_computes_the_single_process_model(tmp_path):
    lckv = tiny_config(force_nodiag=None, iteration_style=None)  # published format and semantics, 3 KV layers of 6
    standard = tiny_lckv_llama_config("0_1_2_3_4_5")
    checkpoints = {"lckv": tmp_path / "lckv", "standard": tmp_path / "standard"}
    for name, config in (("lckv", lckv), ("standard", standard)):
        tiny_model(config).save_pretrained(checkpoints[name])
    payload = {
        "checkpoints": {k: str(v) for k, v in checkpoints.items()},
        "prompts": PROMPTS,
        "new_tokens": NEW_TOKENS,
        "out_dir": str(tmp_path),
        "compiled": ["lckv"],
    }
    torchrun(["-m", "tests.tp_worker", json.dumps(payload)], tmp_path)

    for name, path in checkpoints.items():
        expected = single_process(path)
        assert sum(s is not None for s in expected["keys_dynamic"]) == (3 if name == "lckv" else 6)
        for rank in range(PROCESSES):
            got = torch.load(tmp_path / f"rank{rank}.pt")[name]
            assert got["q_proj_is_sharded"]
            torch.testing.assert_close(got["logits"], expected["logits"], rtol=0, atol=1e-5, msg=f"{name} rank {rank}")
            for kind in ("dynamic", "static"):
                assert torch.equal(got[f"tokens_{kind}"], expected[f"tokens_{kind}"]), (name, kind, rank)
                assert got[f"keys_{kind}"] == halved_heads(expected[f"keys_{kind}"]), (name, kind, rank)
            if name == "lckv":
                assert got["compiled_call"] and torch.equal(got["tokens_compiled"], expected["tokens_static"]), rank


def test_latency_tool_under_torchrun_writes_from_rank_zero(tmp_path):
    out = tmp_path / "latency"
    proc = torchrun(
        [
            str(REPO / "test_latency.py"),
            "--configs",
            str(CONFIGS / "test_tiny_opt.json"),
            "--batches",
            "1,2",
            "--prompt_len",
            "8",
            "--gen_len",
            "4",
            "--device",
            "cpu",
            "--prefill",
            "iterative",
            "--output_dir",
            str(out),
        ],
        tmp_path,
    )
    assert proc.stdout.count("written: ") == 1, proc.stdout  # rank 0 alone writes (and says so)
    result = json.loads((out / "latency.json").read_text())
    assert result["setting"]["tp_size"] == PROCESSES
    model = result["models"]["test_tiny_opt"]
    single = tiny_config()
    head_dim = single.hidden_size // single.num_attention_heads
    per_process = single.num_kv_layers * 2 * (single.num_key_value_heads // PROCESSES) * head_dim * 4  # fp32
    assert model["max_batch"] == 2 and model["kv_bytes_per_token_formula"] == per_process
    assert all(run["kv_bytes_per_token"] == per_process for run in model["runs"])


def test_compiled_decode_step_is_one_captured_graph_per_model(tmp_path):
    """test_latency.py --compile under torchrun, as a GPU run compiles it (generate's compile_config, here a CPU backend
    that records the graphs): per model, the decode forward and the token selection of the captured loop
    (models.fast_decode: a Llama too) are one graph each for the warm-up and the timed run (no graph break, no
    recompilation), and the forward holds the split-KV kernel in every layer (Triton's interpreter), no SDPA fallback,
    and the two all-reduces of every layer (after o_proj and down_proj) inside the graph."""
    llama = tmp_path / "llama.json"
    llama.write_text(
        tiny_config(
            "llama_tiny.json",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            vocab_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
        ).to_json_string()
    )
    payload = {
        "configs": {"llama": str(llama), "opt-llama": str(CONFIGS / "test_tiny_opt.json")},
        "out_dir": str(tmp_path),
    }
    torchrun(["-m", "tests.tp_decode_worker", json.dumps(payload)], tmp_path)
    for rank in range(PROCESSES):
        for name, got in json.loads((tmp_path / f"decode_rank{rank}.json").read_text()).items():
            layers = got["layers"]
            forward = {"split_kv_decode": layers, "scaled_dot_product_attention": 0, "all_reduce": 2 * layers}
            select = {"split_kv_decode": 0, "scaled_dot_product_attention": 0, "all_reduce": 0}
            assert got["graph_breaks"] == 0 and sorted(got["graphs"], key=str) == sorted([forward, select], key=str), (
                name,
                rank,
                got,
            )
            assert got["compiled_step_ms"] > 0, (name, rank)


def test_heads_that_do_not_split_over_the_processes_are_refused(monkeypatch):
    """Each tensor-parallel process takes whole heads: 2 KV heads split over 2 processes, not over 4 (a reshape deep in
    the forward failed before); the tools say so before building the model."""
    config = tiny_config()  # 4 query heads, 2 KV heads
    check_heads_split(config, 2)
    with pytest.raises(ValueError, match=r"^num_key_value_heads: 2 heads do not split over 4 .* multiples of 4"):
        check_heads_split(config, 4)
    with pytest.raises(ValueError, match=r"^num_attention_heads: 4 heads do not split over 3 "):
        check_heads_split(config, 3)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UsageError, match=r"^--configs: .*test_tiny_opt.json: num_key_value_heads: 2 heads"):
        load_config_for_length(str(CONFIGS / "test_tiny_opt.json"), 64)
