"""run_generation.py: cached vs no-cache text, prompt sources, checkpoints, one-line errors."""

import io
import json
from pathlib import Path

import pytest

import run_generation

from .conftest import CONFIGS

LCKV_ONLY_FIELDS = ("layer_types", "target_layer", "num_encoders", "num_trained_encoders", "train_kv")


def make_tiny_files(root: Path, max_position_embeddings: int = 128) -> Path:
    """Write a tokenizer trained on the fly, a text, and tiny opt-llama / llama configs under ``root``."""
    from corpus.tokenizer import train_tokenizer

    text = root / "text.txt"
    text.write_text("ROMEO: But soft, what light through yonder window breaks?\nJULIET: Ay me.\n" * 40)
    train_tokenizer(text, root / "tok", vocab_size=300)
    fields = {
        **json.loads((CONFIGS / "test_tiny_opt.json").read_text()),
        "max_position_embeddings": max_position_embeddings,
    }
    (root / "opt.json").write_text(json.dumps(fields))
    llama = {k: v for k, v in fields.items() if k not in LCKV_ONLY_FIELDS}
    (root / "llama.json").write_text(
        json.dumps({**llama, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    return root


def run(files: Path, *args: str, config: str = "opt.json") -> dict:
    argv = ["--config", str(files / config), "--tokenizer", str(files / "tok"), *args]
    return run_generation.run(run_generation.parse_args(argv))


@pytest.mark.parametrize("config, extra", [("opt.json", ["--sequential_forward"]), ("llama.json", [])])
def test_with_and_without_cache_same_greedy_text(tiny_files, capsys, config, extra):
    results = run(
        tiny_files,
        "--prompt",
        "ROMEO: But soft",
        "--max_new_tokens",
        "24",
        "--ignore_eos",
        "--compare_cache",
        *extra,
        config=config,
    )
    assert results["cache"]["new_tokens"] == results["no_cache"]["new_tokens"] == 24
    assert results["cache"]["text"] == results["no_cache"]["text"]
    assert results["cache"]["text"][0].strip()
    captured = capsys.readouterr()
    assert results["cache"]["text"][0] in captured.out  # streamed to the terminal
    assert "same text: yes" in captured.err and "tokens/s" in captured.err


@pytest.mark.parametrize("config", ["opt.json", "llama.json"])
def test_static_cache_same_greedy_text_as_dynamic(tiny_files, config):
    args = ("--prompt", "ROMEO: But soft", "--max_new_tokens", "16", "--ignore_eos", "--quiet")
    static = run(tiny_files, *args, "--static_cache", "--compare_cache", config=config)
    assert static["cache"]["text"] == run(tiny_files, *args, config=config)["cache"]["text"]
    assert static["cache"]["new_tokens"] == static["no_cache"]["new_tokens"] == 16


@pytest.mark.parametrize(
    "static, offload, expected",
    [(False, False, None), (True, False, "static"), (False, True, "offloaded"), (True, True, "offloaded_static")],
)
def test_cache_implementation_from_flags(static, offload, expected):
    flags = ["--prompt", "x"] + ["--static_cache"] * static + ["--offload"] * offload
    assert run_generation.cache_implementation(run_generation.parse_args(flags)) == expected


def test_sampling_beams_and_prompt_sources(tiny_files, tmp_path, monkeypatch):
    sample = [
        "--prompt",
        "JULIET:",
        "--do_sample",
        "--top_k",
        "20",
        "--top_p",
        "0.9",
        "--temperature",
        "0.7",
        "--num_return_sequences",
        "2",
        "--max_new_tokens",
        "6",
        "--quiet",
    ]
    sampled = run(tiny_files, *sample)["cache"]["text"]
    assert len(sampled) == 2
    assert run(tiny_files, *sample)["cache"]["text"] == sampled  # --seed fixes the draws
    beams = run(
        tiny_files,
        "--prompt",
        "JULIET:",
        "--num_beams",
        "3",
        "--num_return_sequences",
        "2",
        "--max_new_tokens",
        "6",
        "--no_cache",
    )
    assert len(beams["no_cache"]["text"]) == 2
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("ROMEO:")
    from_file = run(tiny_files, "--prompt_file", str(prompt_file), "--max_new_tokens", "5", "--quiet")
    monkeypatch.setattr("sys.stdin", io.StringIO("ROMEO:"))
    from_stdin = run(tiny_files, "--max_new_tokens", "5", "--quiet")
    assert (
        from_file["cache"]["text"]
        == from_stdin["cache"]["text"]
        == run(tiny_files, "--prompt", "ROMEO:", "--max_new_tokens", "5", "--quiet")["cache"]["text"]
    )


def test_checkpoint_round_trip(tiny_files, tmp_path):
    from transformers import AutoTokenizer

    from .conftest import tiny_config, tiny_model

    model = tiny_model(tiny_config(vocab_size=300))
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_files / "tok").save_pretrained(tmp_path)
    results = run_generation.run(
        run_generation.parse_args(
            ["--model_name_or_path", str(tmp_path), "--prompt", "ROMEO:", "--max_new_tokens", "5", "--quiet"]
        )
    )
    assert results["cache"]["new_tokens"] == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", ""], "run_generation.py: error: prompt: empty; give some text"),
        (
            ["--prompt", "x", "--model_name_or_path", "no/such/checkpoint"],
            "run_generation.py: error: --model_name_or_path / --config: give exactly one of them",
        ),
        (
            ["--prompt", "x", "--max_new_tokens", "200"],
            "run_generation.py: error: sequence length: prompt 1 + max_new_tokens 200 tokens exceed "
            "max_position_embeddings=128; shorten them or stream with run_streaming.py",
        ),
        (
            ["--prompt", "x", "--num_beams", "0"],
            "run_generation.py: error: --num_beams: 0; allowed values are integers >= 1",
        ),
        (
            ["--prompt_file", "missing.txt"],
            "run_generation.py: error: --prompt_file: missing.txt does not exist; allowed is an existing file",
        ),
        (
            ["--prompt", "x", "--offload", "--device", "cpu"],
            "run_generation.py: error: --offload: moves the KV cache between GPU and CPU, "
            "so it needs a cuda --device, not cpu",
        ),
        (
            ["--prompt", "x", "--offload", "--no_cache"],
            "run_generation.py: error: --offload: offloads the KV cache, "
            "so it cannot go with --no_cache or --compare_cache",
        ),
        (
            ["--prompt", "x", "--static_cache", "--no_cache"],
            "run_generation.py: error: --static_cache: preallocates the KV cache, so it cannot go with --no_cache",
        ),
    ],
)
def test_bad_input_is_a_one_line_error(tiny_files, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        run_generation.main(["--config", str(tiny_files / "opt.json"), "--tokenizer", str(tiny_files / "tok"), *args])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == message


def test_missing_checkpoint_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit):
        run_generation.main(["--model_name_or_path", "no/such/checkpoint", "--prompt", "x"])
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("run_generation.py: error: --model_name_or_path: no/such/checkpoint does not exist")
        and "\n" not in err
    )


def test_bad_prefill_flag_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit):
        run_generation.main(["--prefill", "fast"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("run_generation.py: error: argument --prefill: invalid choice: 'fast'") and "\n" not in err


@pytest.mark.parametrize("extra", [["--num_beams", "2"], ["--quiet"], []], ids=["beams", "quiet", "streamed"])
def test_the_generated_text_is_printed_once(tiny_files, capsys, extra):
    """Streamed token by token, or printed whole where nothing streams (beam search, --quiet): once either way."""
    text = run(tiny_files, "--prompt", "ROMEO:", "--max_new_tokens", "8", "--ignore_eos", *extra)["cache"]["text"][0]
    assert text.strip() and capsys.readouterr().out.count(text.strip()) == 1


def test_the_wrapper_script_compares_only_where_both_sides_can_run(tiny_files, tmp_path):
    """run_generation.sh compares the cache with no cache by default, and leaves the comparison out when an extra flag
    needs the cache (an exact prefill: --compare_cache would have been refused)."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .conftest import REPO, tiny_config

    checkpoint = tmp_path / "checkpoint"
    AutoModelForCausalLM.from_config(tiny_config(vocab_size=320)).save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(tiny_files / "tok").save_pretrained(checkpoint)
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # `python` in the script: this interpreter
    env = {**os.environ, "MODEL": str(checkpoint), "MAX_NEW_TOKENS": "4", "HF_HUB_OFFLINE": "1", "PATH": path}

    def wrapper(*extra: str) -> str:
        done = subprocess.run(["bash", "run_generation.sh", "--quiet", *extra], cwd=REPO, env=env, capture_output=True)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        return done.stderr.decode()

    assert "[compare]" in wrapper()
    exact = wrapper("--prefill", "sequential", "--static_cache")
    assert "[cache]" in exact and "[no_cache]" not in exact
