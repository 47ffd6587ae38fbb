"""Self-contained checkpoints (models/export.py, python -m tools.export, run_clm.py --bundle_code): they load in a
fresh process where this repository is not importable, through transformers' remote-code loader, and compute what the
in-repo model computes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.dynamic_module_utils import get_imports

import run_clm
from corpus import prepare_corpus
from models import export
from models.export import bundled_modules, export_checkpoint, flat_modules, write_json, write_whole
from tests.conftest import REPO, tiny_config, tiny_lckv_llama_config, tiny_model
from tools.export import main

PROMPTS = torch.tensor([[1, 17, 33, 5, 250, 9, 41, 77, 8, 19, 23, 3], [1, 60, 2, 99, 14, 14, 200, 7, 31, 45, 6, 11]])
NEW_TOKENS = 8
# What an exported checkpoint's code may import besides the standard library: torch and transformers (huggingface_hub
# comes with transformers).
ALLOWED_PACKAGES = {"torch", "transformers", "huggingface_hub"}

# Runs in a fresh interpreter (-I: no PYTHONPATH, no script directory on sys.path) started in another directory:
# `models` cannot be imported there, so the checkpoint's own code must do everything.
FRESH_PROCESS = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
sys.modules["models"] = None  # an `import models` anywhere would fail
checkpoints, prompts, new_tokens, out = json.loads(sys.argv[1])
prompts = torch.tensor(prompts)
results = {}
for name, path in checkpoints.items():
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(prompts).logits
        tokens = model.generate(prompts, max_new_tokens=new_tokens, do_sample=False)
    results[name] = {"module": type(model).__module__, "logits": logits, "tokens": tokens}
torch.save(results, out)
"""


def run_fresh_process(checkpoints: dict[str, Path], tmp_path: Path) -> dict:
    """Each checkpoint loaded and run in a fresh interpreter that cannot import this repository."""
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    out = tmp_path / "fresh.pt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    payload = json.dumps([{k: str(v) for k, v in checkpoints.items()}, PROMPTS.tolist(), NEW_TOKENS, str(out)])
    proc = subprocess.run(
        [sys.executable, "-I", "-c", FRESH_PROCESS, payload],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def save_published(config, model, path: Path) -> None:
    """The checkpoint as the original code writes it: its format's ``layer_types`` string and no semantics fields."""
    model.save_pretrained(path)
    fields = config.original_format()
    for name in ("force_nodiag", "iteration_style"):
        fields.pop(name)
    (path / "config.json").write_text(json.dumps(fields, indent=2))


def checkpoints(tmp_path: Path) -> dict[str, Path]:
    """Repo-form checkpoints of both model types: opt-llama in the published format (published semantics) and as this
    project saves it; lckv-llama in its own format with sliding-window layers."""
    published = tiny_config(force_nodiag=None, iteration_style=None)
    assert published.force_nodiag and published.iteration_style == "previous"
    project = tiny_config()
    window = tiny_lckv_llama_config("0s_4_4_4_4_5s", sliding_window=3, forward_passes=5, backward_passes=1)
    paths = {}
    for name, config, save in (
        ("opt-llama published", published, save_published),
        ("opt-llama project", project, lambda _, model, path: model.save_pretrained(path)),
        ("lckv-llama window", window, save_published),
    ):
        paths[name] = tmp_path / "repo_form" / name.replace(" ", "_")
        save(config, tiny_model(config), paths[name])
    return paths


def test_exported_checkpoints_compute_what_the_repo_model_computes(tmp_path):
    sources = checkpoints(tmp_path)
    exported = {name: tmp_path / "exported" / src.name for name, src in sources.items()}
    for name, src in sources.items():
        export_checkpoint(src, exported[name])
        assert (exported[name] / "kernels.py").is_file() and "auto_map" in json.loads(
            (exported[name] / "config.json").read_text()
        )

    fresh = run_fresh_process(exported, tmp_path)
    for name, src in sources.items():
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()  # the in-repo classes
        assert type(model).__module__ == "models.modeling_opt_llama"
        with torch.no_grad():
            logits = model(PROMPTS).logits
            tokens = model.generate(PROMPTS, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert fresh[name]["module"].startswith("transformers_modules."), name
        torch.testing.assert_close(fresh[name]["logits"], logits, rtol=0, atol=1e-6, msg=name)
        assert torch.equal(fresh[name]["tokens"], tokens), name


def test_bundle_is_what_the_loader_reaches_and_needs_only_torch_and_transformers():
    bundle = bundled_modules(["modeling_opt_llama", "configuration_opt_llama"], flat_modules())
    assert {
        "kernels",
        "attention",
        "decode_attention",
        "decode_launch",
        "triton_decode",
        "sequential_prefill",
        "masks",
    } <= set(bundle)
    assert not {"cli", "export", "rms_norm", "flash_attention"} & set(bundle)  # tools and optional kernels stay out
    for name, path in bundle.items():
        # transformers' own import scan (check_imports refuses a checkpoint whose code needs a missing package)
        needed = set(get_imports(path)) - set(sys.stdlib_module_names)
        assert needed <= ALLOWED_PACKAGES, f"{name}.py imports {needed - ALLOWED_PACKAGES}"


def test_dotted_relative_import_is_refused(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "top.py").write_text("from .sub.leaf import x\n")
    (tmp_path / "sub" / "__init__.py").write_text("")
    (tmp_path / "sub" / "leaf.py").write_text("x = 1\n")
    modules = flat_modules(tmp_path)
    assert set(modules) == {"top", "sub", "leaf"}
    with pytest.raises(ValueError, match=r"'from \.sub\.leaf import'"):
        bundled_modules(["top"], modules)


def test_flat_name_clash_is_refused(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "leaf.py").write_text("")
    (tmp_path / "sub" / "leaf.py").write_text("")
    with pytest.raises(ValueError, match="both bundle as leaf.py"):
        flat_modules(tmp_path)


@pytest.mark.parametrize(
    "case, match",
    [
        ("no_config", "SRC: .* has no config.json; allowed is a checkpoint directory"),
        ("dst_exists", "DST: .* exists; allowed is a new path"),
        ("llama", "SRC: .*: model_type 'llama'; allowed are opt-llama, lckv-llama"),
    ],
)
def test_bad_input_is_a_one_line_error(case, match, tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    if case != "no_config":
        model_type = "llama" if case == "llama" else "opt-llama"
        (src / "config.json").write_text(
            json.dumps(
                json.loads((REPO / "configs" / "test_tiny_opt.json").read_text())
                | {"model_type": model_type, "layer_types": None}
            )
        )
    if case == "dst_exists":
        dst.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(src), str(dst)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert re.search(match, err), err
    assert case == "dst_exists" or not dst.exists()


def test_run_clm_bundle_code_writes_the_self_contained_form(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    corpus = prepare_corpus()
    (tmp_path / "train.txt").write_text(corpus.train.read_text()[:4000])
    common = [
        "--train_file",
        str(tmp_path / "train.txt"),
        "--tokenizer_name",
        str(corpus.tokenizer),
        "--do_train",
        "--max_steps",
        "1",
        "--block_size",
        "16",
        "--per_device_train_batch_size",
        "2",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--bundle_code",
    ]
    out = tmp_path / "out"
    run_clm.main(["--config_name", str(REPO / "configs" / "test_tiny_opt.json"), "--output_dir", str(out), *common])
    expected = bundled_modules(["modeling_opt_llama", "configuration_opt_llama"], flat_modules())
    assert {p.stem for p in out.glob("*.py")} == set(expected)
    assert all((out / f"{name}.py").read_bytes() == path.read_bytes() for name, path in expected.items())
    assert (
        json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
        == "modeling_opt_llama.OptLlamaForCausalLM"
    )

    with pytest.raises(SystemExit) as exit_info:
        run_clm.main(
            [
                "--config_name",
                str(REPO / "configs" / "llama_tiny.json"),
                "--output_dir",
                str(tmp_path / "llama"),
                *common,
            ]
        )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "--bundle_code: model_type 'llama'" in err


def test_write_json_replaces_the_file_whole(tmp_path):
    """Indented by 2 with a final newline unless told otherwise; data that does not serialize leaves the previous file
    as it was and no temporary file behind."""
    path = tmp_path / "out.json"
    write_json(path, {"b": 1, "a": [2]})
    assert path.read_text() == '{\n  "b": 1,\n  "a": [\n    2\n  ]\n}\n'
    write_json(path, {"b": 1, "a": 2}, indent=4, sort_keys=True)
    assert path.read_text() == '{\n    "a": 2,\n    "b": 1\n}\n'
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 2, "b": 1} and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_write_whole_keeps_the_old_file_when_the_write_fails_midway(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")

    def half_then_fail(partial: Path) -> None:
        partial.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_whole(path, half_then_fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def checkpoint_files(root: Path) -> Path:
    """A checkpoint directory of files export copies: the tiny config, a tokenizer's own code, and a stale copy of a
    bundled module (an earlier export's)."""
    root.mkdir()
    (root / "config.json").write_text(tiny_config().to_json_string())
    (root / "tokenization_word.py").write_text("# a tokenizer's code, named by tokenizer_config.json's auto_map\n")
    (root / "modeling_opt_llama.py").write_text("# stale\n")
    return root


def test_export_keeps_other_code_and_writes_the_bundle_anew(tmp_path):
    source = checkpoint_files(tmp_path / "src")
    export_checkpoint(source, tmp_path / "dst")
    assert (tmp_path / "dst" / "tokenization_word.py").read_text() == (source / "tokenization_word.py").read_text()
    bundled = (tmp_path / "dst" / "modeling_opt_llama.py").read_text()
    assert bundled == flat_modules()["modeling_opt_llama"].read_text()


def test_export_leaves_nothing_when_it_fails_after_copying(tmp_path, monkeypatch):
    source = checkpoint_files(tmp_path / "src")

    def fail(staged: Path) -> None:
        assert (staged / "config.json").is_file()  # the copy was made
        raise OSError("disk full")

    monkeypatch.setattr(export, "bundle_code", fail)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(source, tmp_path / "out" / "dst")
    assert list((tmp_path / "out").iterdir()) == []
