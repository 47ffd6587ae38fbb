"""Bad input to every command-line tool: exit status 2, one line on stderr naming the flag or field, no traceback,
no file written. One row per class of mistake (flags never validated, values that used to fail late, bad data,
misleading words, env flags), on tiny configs and temporary paths.

Most rows call the tool's ``main(argv)`` in this process (the same ``run_cli`` path as the command line, and no
interpreter start-up); the rows marked ``SUBPROCESS`` run the real command to prove the exit-status and
no-traceback contract end to end.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models import LckvLlamaConfig, OptLlamaConfig, OptLlamaForCausalLM

from .conftest import REPO
from .test_generation import make_tiny_files

SUBPROCESS = True


@dataclass
class Row:
    tool: str  # module: run_clm, run_generation, ..., bench.bench_flops
    argv: list[str]  # "{in}" is the inputs directory, "{out}" a fresh output location
    names: list[str]  # what the error line must contain: the flag or field, and the bad value where it has one
    env: dict[str, str] = field(default_factory=dict)
    subprocess: bool = False


GEN = ["--config", "{in}/opt.json", "--tokenizer", "{in}/tok"]
STREAM = GEN
CLM = [
    "--config_name",
    "{in}/opt.json",
    "--tokenizer_name",
    "{in}/tok",
    "--output_dir",
    "{out}",
    "--do_train",
    "--report_to",
    "none",
    "--train_file",
    "{in}/text.txt",
]
HARNESS = ["--model", "{in}/opt.json", "--tokenizer", "{in}/tok", "--device", "cpu"]
PLAN = ["--plan", "--configs", "{in}/opt.json"]
LATENCY = ["--configs", "{in}/opt.json", "--device", "cpu", "--output_dir", "{out}"]

ROWS = {
    # --- flags the tools never validated
    "latency gpu_memory not a size": Row(
        "test_latency", [*PLAN, "--gpu_memory", "abc"], ["--gpu_memory", "abc"], subprocess=SUBPROCESS
    ),
    "latency gpu_memory negative": Row("test_latency", [*PLAN, "--gpu_memory=-80GB"], ["--gpu_memory", "-80GB"]),
    "latency bandwidth negative": Row("test_latency", [*PLAN, "--hbm_bandwidth=-1TB"], ["--hbm_bandwidth", "-1TB"]),
    "latency compiled-only option without --compile": Row(
        "test_latency", [*LATENCY, "--persistent_reductions"], ["--persistent_reductions", "--compile"]
    ),
    "generation compiled-only option without a static cache": Row(
        "run_generation",
        [*GEN, "--prompt", "x", "--small_batch_gemv", "--gemv_fusion"],
        ["--gemv_fusion", "--static_cache"],
    ),
    "latency bandwidth negative, separate word": Row(
        "test_latency", [*PLAN, "--hbm_bandwidth", "-1TB"], ["--hbm_bandwidth", "-1TB"]
    ),
    "latency bandwidth unknown unit": Row(
        "test_latency", [*PLAN, "--hbm_bandwidth", "3PB"], ["--hbm_bandwidth", "3PB"]
    ),
    "latency bandwidth negative word": Row(
        "test_latency", [*PLAN, "--hbm_bandwidth", "-1TB"], ["--hbm_bandwidth", "-1TB"]
    ),
    "latency prefill on llama": Row(
        "test_latency",
        ["--configs", "{in}/llama.json", "--device", "cpu", "--output_dir", "{out}", "--prefill", "sequential"],
        ["--prefill", "llama"],
    ),
    "latency plan_lengths zero": Row("test_latency", [*PLAN, "--plan_lengths", "0"], ["--plan_lengths", "0"]),
    "latency memory below the weights": Row("test_latency", [*PLAN, "--gpu_memory", "1KB"], ["--gpu_memory", "1KB"]),
    "latency batches zero": Row("test_latency", [*LATENCY, "--batches", "0"], ["--batches", "0"]),
    "latency steps zero": Row("test_latency", [*LATENCY, "--steps", "0"], ["--steps", "0"]),
    "latency clock interval negative": Row(
        "test_latency", [*LATENCY, "--clock_interval_ms=-5"], ["--clock_interval_ms", "-5"]
    ),
    "latency prompt_len zero": Row("test_latency", [*LATENCY, "--prompt_len", "0"], ["--prompt_len", "0"]),
    "latency device nonsense": Row("test_latency", [*LATENCY, "--device", "gpu0"], ["--device", "gpu0"]),
    "latency attention typo": Row(
        "test_latency", [*LATENCY, "--attn_implementation", "sdap"], ["--attn_implementation", "sdap"]
    ),
    "harness batch_size not a number": Row("test_harness", [*HARNESS, "--batch_size", "abc"], ["--batch_size", "abc"]),
    "harness limit zero": Row("test_harness", [*HARNESS, "--limit", "0"], ["--limit", "0"]),
    "harness unknown task": Row(
        "test_harness", [*HARNESS, "--tasks", "lckv_no_such_task"], ["--tasks", "lckv_no_such_task"]
    ),
    "generation dtype choice": Row("run_generation", [*GEN, "--prompt", "x", "--dtype", "fp8"], ["--dtype", "fp8"]),
    "generation temperature zero": Row(
        "run_generation", [*GEN, "--prompt", "x", "--do_sample", "--temperature", "0"], ["--temperature"]
    ),
    "generation temperature nan": Row(
        "run_generation", [*GEN, "--prompt", "x", "--do_sample", "--temperature", "nan"], ["--temperature", "nan"]
    ),
    "generation paged attention": Row(
        "run_generation",
        [*GEN, "--prompt", "x", "--attn_implementation", "paged|eager"],
        ["--attn_implementation", "paged|eager"],
    ),
    "generation meta device": Row("run_generation", [*GEN, "--prompt", "x", "--device", "meta"], ["--device", "meta"]),
    "generation config file as a checkpoint": Row(
        "run_generation",
        ["--model_name_or_path", "{in}/opt.json", "--tokenizer", "{in}/tok", "--prompt", "x"],
        ["--model_name_or_path", "opt.json", "is a file"],
    ),
    "streaming sinks past the position limit": Row(
        "run_streaming", [*STREAM, "--prompt", "x", "--num_sink_tokens", "100000"], ["--num_sink_tokens", "100000"]
    ),
    "streaming flag of the other mode": Row(
        "run_streaming",
        [*STREAM, "--prompt", "x", "--output_json", "{out}/ppl.json"],
        ["--output_json", "--mode perplexity"],
    ),
    "bench_flops seq_len zero": Row(
        "bench.bench_flops",
        ["--configs", "{in}/opt.json", "--seq_len", "0", "--output_dir", "{out}"],
        ["--seq_len", "0"],
    ),
    "bench_offload batch zero": Row(
        "bench.bench_offload",
        ["--configs", "{in}/opt.json", "--batch_sizes", "0", "--device", "cpu", "--output_dir", "{out}"],
        ["--batch_sizes", "0"],
    ),
    # --- values that passed and failed (or silently misbehaved) later
    "clm kv heads do not divide": Row(
        "run_clm", [*CLM, "--config_overrides", "num_key_value_heads=3"], ["num_key_value_heads", "3"]
    ),
    "clm zero attention heads": Row(
        "run_clm", [*CLM, "--config_overrides", "num_attention_heads=0"], ["num_attention_heads", "0"]
    ),
    "clm block_size zero": Row("run_clm", [*CLM, "--block_size", "0"], ["--block_size", "0"], subprocess=SUBPROCESS),
    "clm max_steps zero": Row("run_clm", [*CLM, "--max_steps", "0"], ["--max_steps", "0"]),
    "clm batch size zero": Row(
        "run_clm", [*CLM, "--per_device_train_batch_size", "0"], ["--per_device_train_batch_size", "0"]
    ),
    "clm output_dir under a file": Row(
        "run_clm", [*CLM[:4], "--output_dir", "{in}/blocker/out", *CLM[6:]], ["--output_dir", "blocker"]
    ),
    "generation kv heads in --config": Row(
        "run_generation",
        ["--config", "{in}/bad_kv.json", "--tokenizer", "{in}/tok", "--prompt", "x"],
        ["--config", "num_key_value_heads", "3"],
    ),
    "streaming output_json under a file": Row(
        "run_streaming",
        [*STREAM, "--mode", "perplexity", "--text_file", "{in}/text.txt", "--output_json", "{in}/blocker/ppl.json"],
        ["--output_json", "blocker"],
        subprocess=SUBPROCESS,
    ),
    "streaming num_tokens zero": Row(
        "run_streaming",
        [*STREAM, "--mode", "perplexity", "--text_file", "{in}/text.txt", "--num_tokens", "0"],
        ["--num_tokens", "0"],
    ),
    "harness output_path under a file": Row(
        "test_harness", [*HARNESS, "--output_path", "{in}/blocker/eval.json"], ["--output_path", "blocker"]
    ),
    "latency output_dir under a file": Row(
        "test_latency", [*LATENCY[:4], "--output_dir", "{in}/blocker/x"], ["--output_dir", "blocker"]
    ),
    "harness sequential on llama": Row(
        "test_harness",
        ["--model", "{in}/llama.json", "--tokenizer", "{in}/tok", "--device", "cpu", "--sequential"],
        ["--sequential", "llama"],
    ),
    # --- bad data
    "clm empty train file": Row("run_clm", [*CLM[:-1], "{in}/empty.txt"], ["--train_file", "empty.txt", "empty"]),
    "clm binary train file": Row("run_clm", [*CLM[:-1], "{in}/binary.txt"], ["--train_file", "binary.txt"]),
    "clm one-line train file, no validation": Row(
        "run_clm", [*CLM[:-1], "{in}/one_line.txt"], ["--validation_split_percentage", "5"]
    ),
    "clm one-line train file": Row(
        "run_clm",
        [*CLM[:-1], "{in}/one_line.txt", "--validation_file", "{in}/one_line.txt"],
        ["--train_file", "one_line.txt", "--block_size 128"],
    ),
    "clm truncated checkpoint": Row(
        "run_clm", [*CLM[:4], "--output_dir", "{in}/resume", *CLM[6:]], ["model.safetensors"]
    ),
    "generation binary prompt file": Row(
        "run_generation", [*GEN, "--prompt_file", "{in}/binary.txt"], ["--prompt_file", "binary.txt"]
    ),
    "streaming empty text file": Row(
        "run_streaming",
        [*STREAM, "--mode", "perplexity", "--text_file", "{in}/empty.txt"],
        ["--text_file", "empty.txt"],
    ),
    # --- misleading words
    "harness missing model dir": Row(
        "test_harness",
        ["--model", "{in}/no_such_checkpoint", "--device", "cpu"],
        ["--model", "no_such_checkpoint", "does not exist"],
        subprocess=SUBPROCESS,
    ),
    "generation prompt file is a directory": Row(
        "run_generation", [*GEN, "--prompt_file", "{in}/tok"], ["--prompt_file", "is a directory"]
    ),
    "clm missing checkpoint path": Row(
        "run_clm",
        ["--model_name_or_path", "{in}/gone/ckpt", *CLM[2:]],
        ["--model_name_or_path", "gone/ckpt", "does not exist"],
    ),
    "generation missing config": Row(
        "run_generation",
        ["--config", "{in}/nope.json", "--tokenizer", "{in}/tok", "--prompt", "x"],
        ["--config", "nope.json", "does not exist"],
    ),
    # --- directories that are not what the flag needs, near-miss names
    "clm resume from a non-checkpoint": Row(
        "run_clm",
        [*CLM, "--resume_from_checkpoint", "{in}/tok"],
        ["--resume_from_checkpoint", "tok", "trainer_state.json"],
        subprocess=SUBPROCESS,
    ),
    "clm empty tokenizer directory": Row(
        "run_clm",
        [*CLM[:2], "--tokenizer_name", "{in}/empty_dir", *CLM[4:]],
        ["--tokenizer_name", "empty_dir", "no tokenizer"],
    ),
    "generation checkpoint without weights": Row(
        "run_generation",
        ["--model_name_or_path", "{in}/config_only", "--prompt", "x"],
        ["--model_name_or_path", "config_only", "no model weights"],
    ),
    "convert missing source": Row(
        "tools.convert",
        ["{in}/no_such_checkpoint", "{out}", "--to", "lckv-llama"],
        ["SRC", "no_such_checkpoint", "does not exist"],
    ),
    "export destination inside its source": Row(
        "tools.export",
        ["{in}/config_only", "{in}/config_only/exported"],
        ["DST", "exported", "is inside SRC"],
    ),
    "convert destination inside its source": Row(
        "tools.convert",
        ["{in}/config_only", "{in}/config_only/converted", "--to", "lckv-llama"],
        ["DST", "converted", "is inside SRC"],
    ),
    "export destination under a file": Row(
        "tools.export",
        ["{in}/config_only", "{in}/blocker/exported"],
        ["DST", "blocker", "is a file"],
    ),
    "convert an unfinished final save": Row(
        "tools.convert",
        ["{in}/unfinished", "{out}", "--to", "lckv-llama"],
        ["SRC", "unfinished", "did not finish"],
    ),
    "export a config missing a rope field": Row(
        "tools.export",
        ["{in}/rope_without_factor", "{out}"],
        ["SRC", "rope_without_factor", "factor"],
    ),
    "export a config that is a JSON list": Row(
        "tools.export",
        ["{in}/list_config", "{out}"],
        ["SRC", "list_config", "JSON list"],
    ),
    "lckv layout entry out of range": Row(
        "run_generation",
        ["--config", "{in}/lckv_0_9_9.json", "--tokenizer", "{in}/tok", "--prompt", "x"],
        ["--config", "layer_types '0_9_9'", "layer 1 reads layer 9", "0..2"],
    ),
    "harness checkpoint without weights": Row(
        "test_harness",
        ["--model", "{in}/config_only", "--tokenizer", "{in}/tok", "--device", "cpu", "--tasks", "lckv_heldout_ppl"],
        ["--model", "config_only", "no model weights"],
    ),
    "harness limit not finite": Row("test_harness", [*HARNESS, "--limit", "inf"], ["--limit", "inf", "whole number"]),
    "harness limit neither a fraction nor whole": Row(
        "test_harness", [*HARNESS, "--limit", "1.5"], ["--limit", "1.5", "fraction below 1"]
    ),
    "harness seed out of range": Row("test_harness", [*HARNESS, "--seed", "-1"], ["--seed", "-1"]),
    "clm seed out of range": Row("run_clm", [*CLM, "--seed", "4294967296"], ["--seed", "4294967296"]),
    # --- training flags transformers takes silently (or fails on late): out of range, one line before any work
    "clm save_steps zero": Row("run_clm", [*CLM, "--save_steps", "0"], ["--save_steps", "0", "--save_strategy steps"]),
    "clm save_steps negative": Row("run_clm", [*CLM, "--save_steps=-1"], ["--save_steps", "-1"]),
    "clm eval_steps negative": Row(
        "run_clm", [*CLM, "--eval_strategy", "steps", "--eval_steps=-1"], ["--eval_steps", "-1"]
    ),
    "clm logging_steps negative": Row("run_clm", [*CLM, "--logging_steps=-1"], ["--logging_steps", "-1"]),
    "clm dataloader workers negative": Row(
        "run_clm", [*CLM, "--dataloader_num_workers=-1"], ["--dataloader_num_workers", "-1", ">= 0"]
    ),
    "clm save_total_limit negative": Row(
        "run_clm", [*CLM, "--save_total_limit=-1"], ["--save_total_limit", "-1", ">= 1"]
    ),
    "clm eval_accumulation_steps zero": Row(
        "run_clm", [*CLM, "--eval_accumulation_steps", "0"], ["--eval_accumulation_steps", "0", ">= 1"]
    ),
    "clm weight_decay negative": Row("run_clm", [*CLM, "--weight_decay=-1"], ["--weight_decay", "-1", ">= 0"]),
    "clm max_grad_norm negative": Row("run_clm", [*CLM, "--max_grad_norm=-1"], ["--max_grad_norm", "-1", ">= 0"]),
    "clm unknown metric for the best model": Row(
        "run_clm",
        [
            *CLM,
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "4",
            "--save_steps",
            "4",
            "--load_best_model_at_end",
            "true",
            "--metric_for_best_model",
            "nosuch",
        ],
        ["--metric_for_best_model", "'nosuch'", "eval_loss"],
    ),  # fmt: skip
    # --- run_clm.py's output directory killed while it moved the final model into place: every loader refuses it
    "generation an unfinished final save": Row(
        "run_generation",
        ["--model_name_or_path", "{in}/unfinished", "--prompt", "x"],
        ["--model_name_or_path", "unfinished", "did not finish"],
    ),
    "harness an unfinished final save": Row(
        "test_harness",
        ["--model", "{in}/unfinished", "--tokenizer", "{in}/tok", "--device", "cpu", "--tasks", "lckv_heldout_ppl"],
        ["--model", "unfinished", "did not finish"],
    ),
    "clm training from an unfinished final save": Row(
        "run_clm",
        ["--model_name_or_path", "{in}/unfinished", *CLM[2:]],
        ["--model_name_or_path", "unfinished", "did not finish"],
    ),
    "harness eval env flag value": Row(
        "test_harness",
        [*HARNESS, "--tasks", "lckv_next_line"],
        ["LCKV_EVAL_SEQUENTIAL", "yes"],
        env={"LCKV_EVAL_SEQUENTIAL": "yes"},
    ),
    "harness task typo": Row(
        "test_harness",
        [*HARNESS, "--tasks", "hellaswg"],
        ["--tasks", "'hellaswg'", "closest: hellaswag"],
        subprocess=SUBPROCESS,
    ),
    # --- env flags
    "env flag on run_generation": Row(
        "run_generation",
        [*GEN, "--prompt", "x"],
        ["LCKV_FLASH_ATTN", "yes"],
        env={"LCKV_FLASH_ATTN": "yes"},
        subprocess=SUBPROCESS,
    ),
    "env flag on run_clm": Row("run_clm", CLM, ["LCKV_FUSED_RMSNORM", "true"], env={"LCKV_FUSED_RMSNORM": "true"}),
    "eval-sequential env flag": Row(
        "run_clm", [*CLM, "--do_eval"], ["LCKV_EVAL_SEQUENTIAL", "yes"], env={"LCKV_EVAL_SEQUENTIAL": "yes"}
    ),
}


def truncated_checkpoint(directory: Path) -> None:
    """``directory/checkpoint-1`` as the Trainer leaves it, with its model.safetensors cut in half."""
    checkpoint = directory / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    save_file({"weight": torch.zeros(64, 64)}, checkpoint / "model.safetensors")
    data = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 1}))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Tiny configs, a tokenizer, a text, and the bad inputs the rows point at."""
    root = make_tiny_files(tmp_path_factory.mktemp("bad_inputs"))
    for name in ("opt.json", "llama.json"):  # room for the 300-token tokenizer
        (root / name).write_text(json.dumps(json.loads((root / name).read_text()) | {"vocab_size": 320}))
    fields = json.loads((root / "opt.json").read_text())
    (root / "bad_kv.json").write_text(json.dumps({**fields, "num_key_value_heads": 3}))
    (root / "blocker").write_text("a regular file where a directory would have to be\n")
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (root / "one_line.txt").write_text("ROMEO: But soft.\n")
    truncated_checkpoint(root / "resume")
    (root / "empty_dir").mkdir()
    (root / "config_only").mkdir()
    (root / "config_only" / "config.json").write_text((root / "opt.json").read_text())
    for name, config in {
        "unfinished": fields,  # run_clm's output directory killed while it moved the final model into place
        "rope_without_factor": {**fields, "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0}},
        "list_config": [fields],
    }.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    (root / "unfinished" / "_checkpoint-in-progress" / "final-model").mkdir(parents=True)
    lckv = {k: v for k, v in fields.items() if k not in ("layer_types", "target_layer", "architectures")}
    (root / "lckv_0_9_9.json").write_text(
        json.dumps({**lckv, "model_type": "lckv-llama", "num_hidden_layers": 3, "layer_types": "0_9_9"})
    )
    return root


def files_under(*roots: Path) -> set[Path]:
    return {path for root in roots if root.exists() for path in root.rglob("*")}


def fill(argv: list[str], inputs: Path, out: Path) -> list[str]:
    return [arg.replace("{in}", str(inputs)).replace("{out}", str(out)) for arg in argv]


@pytest.fixture(scope="module")
def subprocess_runs(inputs, tmp_path_factory) -> dict[str, tuple[int, str, bool]]:
    """The SUBPROCESS rows, started together (interpreter start-up dominates): ``{name: (status, stderr, wrote)}``.

    ``wrote``: whether any file appeared in the row's output location or among the inputs.
    """
    before = files_under(inputs)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = {}
    for name, row in ROWS.items():
        if row.subprocess:
            out = tmp_path_factory.mktemp("out")
            command = [sys.executable, "-m", row.tool] if "." in row.tool else [sys.executable, f"{row.tool}.py"]
            proc = subprocess.Popen(
                command + fill(row.argv, inputs, out / "out"),
                cwd=REPO,
                env={**env, **row.env},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            started[name] = (proc, out)
    results = {
        name: (proc.wait(timeout=300), proc.stderr.read(), bool(files_under(out)))
        for name, (proc, out) in started.items()
    }
    inputs_changed = files_under(inputs) != before
    return {name: (status, stderr, wrote or inputs_changed) for name, (status, stderr, wrote) in results.items()}


def prog(tool: str) -> str:
    """The name a tool's errors start with: ``python -m tools.x`` for the modules of ``tools/``, ``x.py`` for a
    top-level script, ``x`` for a bench module."""
    if tool.startswith("tools."):
        return f"python -m {tool}"
    return f"{tool.split('.')[-1]}{'' if '.' in tool else '.py'}"


def run_in_process(row: Row, argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """Run ``row``'s tool's ``main(argv)`` here; return its exit status and stderr."""
    for name, value in row.env.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        import_module(row.tool).main(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input_exits_2_with_one_line(name, inputs, subprocess_runs, tmp_path, capsys, monkeypatch):
    row = ROWS[name]
    if row.subprocess:
        code, stderr, wrote = subprocess_runs[name]
    else:
        before = files_under(tmp_path, inputs)
        code, stderr = run_in_process(row, fill(row.argv, inputs, tmp_path / "out"), capsys, monkeypatch)
        wrote = files_under(tmp_path, inputs) != before
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog(row.tool)}: error: "), lines[0]
    for word in row.names:
        assert word in lines[0], (word, lines[0])
    assert not wrote, "the tool wrote files"


def test_the_table_covers_every_tool_and_class():
    """At least 30 rows, every tool, several real subprocesses."""
    assert len(ROWS) >= 30
    assert {row.tool for row in ROWS.values()} >= {
        "run_clm",
        "run_generation",
        "run_streaming",
        "test_harness",
        "test_latency",
    }
    assert sum(row.subprocess for row in ROWS.values()) >= 5


@pytest.mark.parametrize("source", ["missing.json", "./no_such_dir", "/no/such/checkpoint"])
@pytest.mark.parametrize("loader", [OptLlamaConfig, LckvLlamaConfig, OptLlamaForCausalLM], ids=lambda c: c.__name__)
def test_missing_local_path_in_from_pretrained_is_one_clear_error(loader, source):
    """The Python API: the project's classes say a local path does not exist (transformers: "Repo id must be ...")."""
    with pytest.raises(FileNotFoundError, match=f"^{source}: does not exist; allowed is a config .json") as error:
        loader.from_pretrained(source)
    assert "\n" not in str(error.value)


def test_more_few_shot_examples_than_documents_ends_with_one_error_line(inputs):
    """Found while lm-eval draws the examples (after its progress bars have started): exit status 2, no traceback,
    the last line names the flag. The real command: lm-eval logs through the root logger, which other tests in this
    process point at streams they have closed."""
    argv = fill([*HARNESS, "--tasks", "lckv_next_line", "--num_fewshot", "100000", "--limit", "1"], inputs, inputs)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "test_harness.py", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("test_harness.py: error: --num_fewshot: 100000 is more than")
