"""A CUDA device's fixed facts (models/kernels/device_properties.py) are constants to a compiled step: the lookup is
run, not traced (the stand-in below is code dynamo cannot trace), and the step that reads them is compiled once (a
cached lookup in a module dict was not: dynamo guarded on the dict, which the first run filled). No GPU here: torch's
lookups are stood in for."""

from types import SimpleNamespace

import torch
from torch._dynamo.testing import CompileCounter

from models.kernels import decode_attention


def test_a_step_reading_the_device_is_compiled_once(monkeypatch):
    lookups = []

    def properties(index):
        lookups.append(index)
        return SimpleNamespace(multi_processor_count=132)  # dynamo cannot trace this: it must be run

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    device = torch.device("cuda")

    def step(x: torch.Tensor) -> torch.Tensor:
        return x * decode_attention.processors(device)  # the split-KV launch's input, read inside the step

    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    x = torch.ones(3)
    for _ in range(3):
        assert compiled(x).tolist() == [132.0] * 3
    assert counter.frame_count == 1
    assert lookups  # looked up at trace time, baked into the graph
