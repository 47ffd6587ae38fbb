"""Write ``OUT/smoke_llama.json``: the Llama twin of configs/test_tiny_opt.json (same shapes, no LCKV fields), the
baseline of the GPU scripts' CPU smoke runs (bench/*.sh smoke).

    python -m bench.smoke_llama_config OUT
"""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LCKV_FIELDS = (
    "layer_types",
    "target_layer",
    "num_encoders",
    "num_trained_encoders",
    "train_kv",
    "force_nodiag",
    "iteration_style",
)


def write_smoke_llama_config(out_dir: Path) -> Path:
    """The Llama config of test_tiny_opt.json's shapes, written to ``out_dir/smoke_llama.json``; returns the path."""
    opt = json.loads((REPO / "configs" / "test_tiny_opt.json").read_text())
    llama = {k: v for k, v in opt.items() if k not in LCKV_FIELDS} | {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
    }
    path = Path(out_dir) / "smoke_llama.json"
    path.write_text(json.dumps(llama))
    return path


if __name__ == "__main__":
    write_smoke_llama_config(Path(sys.argv[1]))
