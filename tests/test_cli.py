"""tools/cli.py: the shared checks of the command-line tools, each on its own (one-line UsageErrors)."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.config_checks import check_shape_fields
from tools import cli
from tools.cli import UsageError


@pytest.mark.parametrize(
    ("text", "expected"),
    [("80GB", 8e10), ("24GiB", 24 * 2**30), ("3.35TB", 3.35e12), ("1e9", 1e9), ("512 mib", 512 * 2**20)],
)
def test_parse_size(text, expected):
    assert cli.parse_size("--gpu_memory", text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["abc", "-80GB", "0GB", "3PB", "", "GB", "1.2.3GB"])
def test_parse_size_refuses(text):
    with pytest.raises(UsageError, match=r"^--gpu_memory: .*allowed is a positive size"):
        cli.parse_size("--gpu_memory", text)


def test_parse_int_list():
    assert cli.parse_int_list("--batches", "1,2,16") == [1, 2, 16]
    for text in ("0", "1,,2", "a", "-1,2"):
        with pytest.raises(UsageError, match=r"^--batches: .*integers >= 1"):
            cli.parse_int_list("--batches", text)


def test_check_range():
    cli.check_range("--x", None, minimum=1)
    cli.check_range("--x", 1, minimum=1, maximum=1)
    with pytest.raises(UsageError, match=r"^--x: 0; allowed values are > 0$"):
        cli.check_range("--x", 0, minimum=0, exclusive_min=True)
    with pytest.raises(UsageError, match=r"^--x: 5; allowed values are >= 1 and <= 4$"):
        cli.check_range("--x", 5, minimum=1, maximum=4)


def test_output_paths(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.check_output_dir("--output_dir", tmp_path / "new" / "dir") == tmp_path / "new" / "dir"
    with pytest.raises(UsageError, match="--output_dir: .*file is a file"):
        cli.check_output_dir("--output_dir", blocker / "sub")
    with pytest.raises(UsageError, match="--output_dir: .*file is a file"):
        cli.check_output_dir("--output_dir", blocker)
    with pytest.raises(UsageError, match="--output_json: .* is a directory"):
        cli.check_output_file("--output_json", tmp_path)
    with pytest.raises(UsageError, match="--output_json: .*file is a file, not a directory"):
        cli.check_output_file("--output_json", blocker / "a" / "b.json")
    assert list(tmp_path.iterdir()) == [blocker]  # nothing created


def test_text_files(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("héllo\n")
    assert cli.read_text_file("--f", text) == "héllo\n"
    cases = {
        "missing.txt": "does not exist",
        "": "is a directory",
        "empty.txt": "is empty",
        "nul.txt": "not UTF-8 text",
        "latin1.txt": "not UTF-8 text",
    }
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "nul.txt").write_bytes(b"abc\0def")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    for name, message in cases.items():
        with pytest.raises(UsageError, match=f"^--f: .*{message}"):
            cli.check_text_file("--f", tmp_path / name)


def test_text_probe_allows_a_character_cut_at_its_end(tmp_path):
    """Only the first MiB is read; a multi-byte character split by that limit is not binary data."""
    big = tmp_path / "big.txt"
    big.write_bytes(b"a" * (cli.TEXT_PROBE_BYTES - 1) + "é".encode() + b"tail")
    cli.check_text_file("--f", big)


def test_resolve_dtype_and_device():
    assert cli.resolve_dtype("auto", "cpu") == torch.float32
    assert cli.resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert cli.resolve_dtype("float16", "cpu") == torch.float16
    assert cli.resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert cli.resolve_device("cpu") == "cpu"
    with pytest.raises(UsageError, match="^--device: 'gpu0'; allowed are cpu, cuda or cuda:N"):
        cli.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="^--device: cuda: CUDA is not available"):
            cli.resolve_device("cuda")


@pytest.mark.parametrize(("fields", "message"), [
    ({"num_attention_heads": 0}, "num_attention_heads: 0; allowed values are integers >= 1"),
    ({"hidden_size": 64.5}, "hidden_size: 64.5; allowed values are integers >= 1"),
    ({"num_key_value_heads": 3}, "num_key_value_heads: 3 does not divide num_attention_heads=4"),
    ({"hidden_size": 66}, "hidden_size: 66 is not a multiple of num_attention_heads=4"),
    # as transformers' Llama:
    ({"hidden_size": 66, "head_dim": 16}, "hidden_size: 66 is not a multiple of num_attention_heads=4"),
    ({"head_dim": 15}, "head_dim: 15 is odd"),
])  # fmt: skip
def test_shape_fields(fields, message):
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    check_shape_fields(base)
    check_shape_fields(base | {"head_dim": 32})  # an explicit head_dim other than hidden / heads
    with pytest.raises(ValueError, match=message):
        check_shape_fields(base | fields)


def test_load_config_sources(tmp_path, monkeypatch):
    from .conftest import CONFIGS

    config = cli.load_config("--config", str(CONFIGS / "test_tiny_opt.json"), {"num_encoders": 3})
    assert config.model_type == "opt-llama" and config.num_encoders == 3
    config.save_pretrained(tmp_path / "ckpt")
    assert cli.load_config("--model", str(tmp_path / "ckpt")).num_encoders == 3
    (tmp_path / "no_type.json").write_text(json.dumps({"hidden_size": 8}))
    (tmp_path / "not_json.json").write_text("{")
    (tmp_path / "empty_dir").mkdir()
    monkeypatch.setattr(cli.huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cases = {
        str(tmp_path / "gone"): "does not exist; allowed is a local path or a hub id",  # missing path, not "repo id"
        "outputs/missing": "does not exist locally, and offline",
        str(tmp_path / "no_type.json"): "model_type None; allowed are opt-llama, llama",
        str(tmp_path / "not_json.json"): "cannot read a config from",
        str(tmp_path / "empty_dir"): "has no config.json",
    }
    for source, message in cases.items():
        with pytest.raises(UsageError, match=f"^--model: .*{message}"):
            cli.load_config("--model", source)
    with pytest.raises(UsageError, match=r"^--config_overrides: unknown config field\(s\) \['bogus'\]"):
        cli.load_config("--config", str(CONFIGS / "test_tiny_opt.json"), {"bogus": 1})


def test_an_invalid_value_is_blamed_on_the_flag_it_came_from(tmp_path):
    """A value the config's validation refuses names --config_overrides where the overrides brought it (the source
    alone is valid), else the source's flag, overrides or not."""
    from .conftest import CONFIGS

    source = str(CONFIGS / "test_tiny_opt.json")
    for overrides, field in (({"prefill": "exact"}, "prefill: 'exact'"), ({"num_key_value_heads": 3}, "num_key_")):
        with pytest.raises(UsageError, match=f"^--config_overrides: invalid config over {source}: {field}"):
            cli.load_config("--config_name", source, overrides)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(json.loads(Path(source).read_text()) | {"prefill": "exact"}))
    for overrides in (None, {"num_encoders": 3}):
        with pytest.raises(UsageError, match=f"^--config_name: {bad}: invalid config: prefill: "):
            cli.load_config("--config_name", str(bad), overrides)


def test_sequential_switch():
    from .conftest import tiny_config

    config = tiny_config()
    cli.set_sequential(config, "--sequential")
    assert config.sequential_forward
    llama = tiny_config("llama_tiny.json")
    with pytest.raises(UsageError, match="^--sequential: model_type 'llama' .*allowed only for opt-llama"):
        cli.set_sequential(llama, "--sequential")


def test_kernel_flags_on_a_llama_warn_once_each_where_a_tool_builds_it(monkeypatch, caplog):
    """A Llama is transformers' LlamaForCausalLM, whose kernels the LCKV_* flags never reach: each flag that is on
    says so in one line, wherever a tool builds the model (run_clm.py, run_generation.py / test_harness.py through
    ``instantiate``, test_latency.py through ``build_random_model``); an LCKV model gets no such line."""
    from types import SimpleNamespace

    import run_clm
    from models.kernels import FLAGS
    from tools.generation import instantiate
    from tools.measure import build_random_model

    from .conftest import tiny_config

    llama = tiny_config("llama_tiny.json", hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=256)
    on = ["LCKV_FLASH_ATTN", "LCKV_FUSED_CROSSENTROPY"]
    for flag in FLAGS:
        monkeypatch.setenv(flag, "1" if flag in on else "0")
    expected = [
        f"{flag}=1: no effect on model_type 'llama' (the LCKV_* kernel flags select the kernels of opt-llama and "
        "lckv-llama models; this one runs transformers' own)"
        for flag in on
    ]
    builders = {
        # a 256-entry vocabulary as the "tokenizer" (build_model reads its length and special ids)
        "run_clm": lambda: run_clm.build_model(SimpleNamespace(model_name_or_path=None), llama, list(range(256))),
        "instantiate": lambda: instantiate(llama, None, "cpu", 0),
        "build_random_model": lambda: build_random_model(llama, torch.float32, "cpu", "sdpa"),
    }
    for name, build in builders.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tools.cli"):
            build()
        assert [r.getMessage() for r in caplog.records if r.name == "tools.cli"] == expected, name
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tools.cli"):
        cli.warn_kernel_flags_without_effect(tiny_config())
    assert not [r for r in caplog.records if r.name == "tools.cli"]


def test_env_flags_are_checked_and_import_never_fails_on_them(monkeypatch):
    """A bad flag value is a UsageError of the tools' first check; the library reads the flags when it builds a model
    (``import models`` already happened, with the flag set, and did not fail)."""
    from models.kernels import KernelSelection

    from .conftest import tiny_config, tiny_model

    cli.check_env_flags({"LCKV_FLASH_ATTN": "1"})
    with pytest.raises(UsageError, match=r"^LCKV_FLASH_ATTN='yes': allowed values are 1 \(on\) and 0 or unset"):
        cli.check_env_flags({"LCKV_FLASH_ATTN": "yes"})
    monkeypatch.setenv("LCKV_FUSED_SWIGLU", "on")
    with pytest.raises(ValueError, match="^LCKV_FUSED_SWIGLU='on'"):
        tiny_model(tiny_config())  # building a model selects its kernels, and refuses the flag
    monkeypatch.delenv("LCKV_FUSED_SWIGLU")
    assert tiny_model(tiny_config()).model.kernel_selection == KernelSelection.from_environ()


def test_a_tool_prints_its_stacks_on_sigusr1_and_goes_on():
    """``run_cli`` registers ``faulthandler`` on SIGUSR1 (what ``bench/step.sh`` sends at a step's limit): the stack of
    the function the tool was in reaches stderr, and the tool finishes."""
    from .conftest import REPO

    program = (
        "import os, signal, sys\n"
        "from tools.cli import run_cli\n"
        "def waiting_here(argv):\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    print('went on')\n"
        "run_cli(waiting_here, [])\n"
    )
    done = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "went on\n"
    assert "in waiting_here" in done.stderr, done.stderr
