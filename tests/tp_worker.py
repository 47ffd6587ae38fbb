"""One process of the tensor-parallel test (tests/test_tensor_parallel.py), started by ``torchrun``.

    torchrun --standalone --nproc_per_node 2 -m tests.tp_worker '{"checkpoints": {...}, "prompts": [...], ...}'

Loads each checkpoint with ``tp_plan="auto"`` and writes, per process, ``rank<R>.pt``: the logits of the prompts,
the greedy tokens with a dynamic and a static cache and, for the checkpoints named in ``compiled``, with the static
cache and a decode step compiled as one graph (``fullgraph``; TorchDynamo traces it, the ``eager`` backend runs it:
the CPU has no CUDA graphs), and the key shapes each cache holds per layer (None for a layer that caches nothing).
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, CompileConfig
from transformers.distributed import DistributedConfig

import models  # noqa: F401  (registers opt-llama)


def cached_key_shapes(cache) -> list[tuple[int, ...] | None]:
    return [tuple(layer.keys.shape) if getattr(layer, "keys", None) is not None else None for layer in cache.layers]


def traced_decode_config() -> CompileConfig:
    """``generate``'s compile settings for a one-graph decode step that also compiles on the CPU."""
    config = CompileConfig(backend="eager", fullgraph=True)
    config._compile_all_devices = True  # generate compiles on CUDA only unless told otherwise
    return config


def main(payload: dict) -> None:
    prompts = torch.tensor(payload["prompts"])
    results = {}
    for name, path in payload["checkpoints"].items():
        model = AutoModelForCausalLM.from_pretrained(
            path, distributed_config=DistributedConfig(tp_plan="auto"), dtype=torch.float32
        ).eval()
        with torch.no_grad():
            logits = model(prompts).logits
            outputs = {
                kind: model.generate(
                    prompts,
                    max_new_tokens=payload["new_tokens"],
                    do_sample=False,
                    cache_implementation=kind,
                    return_dict_in_generate=True,
                )
                for kind in ("dynamic", "static")
            }
        results[name] = {
            "logits": logits,
            "q_proj_is_sharded": type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "DTensor",
        }
        for kind, output in outputs.items():
            results[name][f"tokens_{kind}"] = output.sequences
            results[name][f"keys_{kind}"] = cached_key_shapes(output.past_key_values)
        if name in payload["compiled"]:
            with torch.no_grad():
                results[name]["tokens_compiled"] = model.generate(
                    prompts,
                    max_new_tokens=payload["new_tokens"],
                    do_sample=False,
                    cache_implementation="static",
                    compile_config=traced_decode_config(),
                )
            results[name]["compiled_call"] = getattr(model, "_compiled_call", None) is not None
    torch.save(results, os.path.join(payload["out_dir"], f"rank{os.environ['RANK']}.pt"))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
