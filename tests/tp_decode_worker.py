"""One process of the tensor-parallel decode-step test (tests/test_tensor_parallel.py), started by ``torchrun``.

    torchrun --standalone --nproc_per_node 2 -m tests.tp_decode_worker \\
        '{"configs": {"name": "config.json"}, "out_dir": "..."}'

Each config is built as test_latency.py builds it under ``torchrun`` (``build_model``: sharded, ``sdpa_split_kv``) and
measured by ``test_latency.run`` with ``--compile`` on the CPU: generate compiles the decode step with its
``compile_config``, here a backend that records each graph TorchDynamo hands it and runs it as traced (the CPU has
no CUDA graphs). Writes ``decode_rank<R>.json``: per model, each graph's count of the ops that matter (the split-KV
kernel, SDPA, all-reduces), the graph breaks, and the compiled step time ``CompiledStepTimer`` measured.
"""

import json
import os
import sys
from collections import Counter
from collections.abc import Callable

import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig

import models  # noqa: F401  (registers opt-llama and sdpa_split_kv)
import test_latency
from tools import latency
from tools.measure import load_config_for_length

WATCHED_OPS = ("split_kv_decode", "scaled_dot_product_attention", "all_reduce")


def graph_recorder(graphs: list[dict[str, int]]) -> Callable:
    """A ``torch.compile`` backend that appends to ``graphs`` the ``WATCHED_OPS`` counts of every graph it is given
    (one entry per compiled graph: a graph break or a recompilation adds one) and runs the graph as traced. A function,
    not an object: generate deep-copies its compile config, and with it an object's record."""

    def backend(graph: torch.fx.GraphModule, example_inputs, **kwargs):
        ops = Counter()
        for node in graph.graph.nodes:
            if node.op == "call_function":
                name = getattr(node.target, "__name__", str(node.target))
                ops.update(op for op in WATCHED_OPS if op in name)
        graphs.append({op: ops[op] for op in WATCHED_OPS})
        return graph.forward

    return backend


def measure(config_path: str, out_dir: str) -> dict:
    args = latency.parse_args(
        [
            "--configs",
            config_path,
            "--prompt_len",
            "5",
            "--gen_len",
            "4",
            "--compile",
            "--device",
            "cpu",
            "--batches",
            "2",
            "--output_dir",
            out_dir,
        ]
    )
    model = latency.build_model(
        load_config_for_length(config_path, args.prompt_len + args.gen_len), args, torch.float32
    )
    graphs = []
    compile_config = CompileConfig(backend=graph_recorder(graphs), mode=None)
    compile_config._compile_all_devices = True  # generate compiles on CUDA only unless told otherwise
    model.generation_config.compile_config = compile_config
    torch._dynamo.reset()
    counters.clear()
    result = test_latency.run(model, args, 2, config_path)  # a warm-up generate (1-token prompt), then the timed one
    return {
        "graphs": graphs,
        "graph_breaks": sum(counters["graph_break"].values()),
        "layers": model.config.num_hidden_layers,
        "compiled_step_ms": result.compiled_step_ms,
    }


def main(payload: dict) -> None:
    results = {name: measure(path, payload["out_dir"]) for name, path in payload["configs"].items()}
    with open(os.path.join(payload["out_dir"], f"decode_rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
