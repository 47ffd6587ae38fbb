"""Write ``OUT/smoke_llama.json``: the Llama twin of configs/test_tiny_opt.json (same shapes, no LCKV fields), the
baseline of the GPU scripts' CPU smoke runs (bench/*.sh smoke).

    python -m bench.smoke_llama_config OUT
"""

import sys
from pathlib import Path

from models import OptLlamaConfig
from models.config_loading import llama_twin

REPO = Path(__file__).resolve().parents[1]


def write_smoke_llama_config(out_dir: Path) -> Path:
    """The Llama config of test_tiny_opt.json's shapes, written to ``out_dir/smoke_llama.json``; returns the path."""
    path = Path(out_dir) / "smoke_llama.json"
    llama_twin(OptLlamaConfig.from_json_file(REPO / "configs" / "test_tiny_opt.json")).to_json_file(path)
    return path


if __name__ == "__main__":
    write_smoke_llama_config(Path(sys.argv[1]))
