"""README command 1: ``bash quickstart.sh`` runs end to end (with ``--smoke``'s seconds of training), prints the table
of both models, and writes nothing outside the clone and its output folder."""

import os
import re
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_smoke_prints_the_table_and_keeps_its_caches_in_the_clone(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    for name in ("XDG_CACHE_HOME", "HF_HOME", "HF_DATASETS_CACHE", "PIP_CACHE_DIR"):
        env.pop(name, None)
    start = time.perf_counter()
    proc = subprocess.run(
        ["bash", "quickstart.sh", "--smoke", "--output_dir", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    print(f"quickstart.sh --smoke: {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Fetched at run time: only the corpus" in out
    rows = {
        m.group(1): m.groups()[1:]
        for m in re.finditer(r"^(LCKV \(opt-llama\)|Llama) +([\d.]+) +([\d,]+) +([\d.]+) +([\d.]+) +(\d+)$", out, re.M)
    }
    assert set(rows) == {"LCKV (opt-llama)", "Llama"}, out[-3000:]
    kv = {name: int(row[1].replace(",", "")) for name, row in rows.items()}
    assert 0 < kv["LCKV (opt-llama)"] < kv["Llama"]  # 3 of 8 layers cache KVs
    assert out.count("--- LCKV sample:") == 2
    assert (tmp_path / "out" / "lckv" / "eval_results.json").exists() and (
        tmp_path / "out" / "llama" / "eval_results.json"
    ).exists()
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    assert written == [], written  # caches (corpus, tokenized blocks, pip) stay in the clone
