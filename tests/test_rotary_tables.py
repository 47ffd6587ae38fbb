"""A step's RoPE tables from one kernel (models/kernels/triton_rotary_tables.py, ``RotaryTablesMixin``), on the CPU
through Triton's interpreter: against the rotary modules it stands in for (Llama's and the LCKV model's, a dynamic
RoPE included), where it applies, and in a compiled decode step, where no kernel but it computes a cosine or a sine.
The GPU tests (tests/test_rotary_cache_gpu.py) compare it with eager CUDA."""

import re

import pytest
import torch
from transformers import StaticCache
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from models.config_loading import llama_twin
from models.fused_projections import TabledLlamaRotaryEmbedding, TabledPlainRotaryEmbedding, fuse_projections
from models.kernels.decode_attention import SPLIT_KV
from models.kernels.plain import PlainRotaryEmbedding
from models.kernels.rotary_cache import RotaryCacheKernel, load_rotary_cache_kernel
from tests.conftest import load_interpreted, tiny_config, tiny_model

CONFIG = llama_twin(tiny_config())  # head_dim 16
# Positions past 2**12 (angles of thousands of radians, where a cosine's argument reduction matters) and one past the
# config's max_position_embeddings (a dynamic RoPE rescales there).
POSITIONS = torch.tensor([[0, 1, 7, 4095], [4096, 33, 65535, 100_000]])


@pytest.fixture
def kernel() -> RotaryCacheKernel:
    """The kernels on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py)."""
    return load_interpreted(load_rotary_cache_kernel, "tests/test_rotary_cache_gpu.py")


def tabled(plain: torch.nn.Module, kernel: RotaryCacheKernel) -> torch.nn.Module:
    """``plain`` (a fresh rotary module) as ``fuse_projections`` leaves it."""
    tabled_class = {LlamaRotaryEmbedding: TabledLlamaRotaryEmbedding, PlainRotaryEmbedding: TabledPlainRotaryEmbedding}
    module = tabled_class[type(plain)](config=plain.config)
    module.rotary_cache = kernel
    return module


def assert_tables_close(got: tuple, expected: tuple, dtype: torch.dtype) -> None:
    """Same shape and dtype; each value within rounding of the other. In Triton's interpreter the kernel's cosine and
    sine are numpy's, which may differ from torch's by an ulp of float32, and its cast of float32 to bf16 rounds toward
    zero where torch (and the compiled kernel) round to nearest, so bf16 values differ by up to an ulp of bf16. The GPU
    test compares the compiled kernel with eager CUDA bit for bit (tests/test_rotary_cache_gpu.py)."""
    eps = torch.finfo(dtype).eps
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype == dtype
        torch.testing.assert_close(g, e, rtol=2 * eps, atol=2 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("rotary_class", [LlamaRotaryEmbedding, PlainRotaryEmbedding], ids=["llama", "lckv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rope", ["default", "dynamic", "linear"])
def test_tables_equal_the_modules_own(kernel, rotary_class, dtype, rope):
    """The kernel's tables equal the module's own forward: every RoPE type the formula serves (a dynamic RoPE's
    frequencies updated for the length first), per-row positions and positions shared by the batch (an expanded
    ``(1, T)``), ``attention_scaling`` applied."""
    config = CONFIG.__class__(**CONFIG.to_dict())
    if rope != "default":
        config.rope_parameters = {**config.rope_parameters, "rope_type": rope, "factor": 2.0}
    plain = rotary_class(config=config)
    plain.attention_scaling = 0.75  # a RoPE type's scaling (YaRN's, say), applied to both tables
    module = tabled(rotary_class(config=config), kernel)
    module.attention_scaling = plain.attention_scaling
    x = torch.zeros(1, dtype=dtype)
    for positions in (POSITIONS, POSITIONS[:1].expand(3, -1)):
        assert_tables_close(module(x, positions), plain(x, positions), dtype)
    assert module.inv_freq.equal(plain.inv_freq)  # a dynamic RoPE's update happened in both


@pytest.mark.parametrize("head_dim", [6, 12, 128])
def test_head_dims_and_tiles(kernel, head_dim):
    """Half head dims that are no power of two (6, 3) and whose tile holds few positions (128: 32 per program), more
    rows than one program's tile, and an empty batch."""
    config = CONFIG.__class__(**{**CONFIG.to_dict(), "head_dim": head_dim})
    plain, module = PlainRotaryEmbedding(config=config), tabled(PlainRotaryEmbedding(config=config), kernel)
    x = torch.zeros(1, dtype=torch.float32)
    positions = torch.arange(3 * 700).view(3, 700)
    assert_tables_close(module(x, positions), plain(x, positions), torch.float32)
    empty = torch.zeros(0, 5, dtype=torch.long)
    assert all(t.shape == (0, 5, head_dim) for t in module(x, empty))


def test_where_the_kernel_applies(kernel, monkeypatch):
    """The module's own forward where the kernel does not apply: float64 tables (the LCKV model's float64 path), 1-D
    or floating positions, no kernel."""
    calls = []
    counted = kernel._replace(tables=lambda *args: calls.append(args) or kernel.tables(*args))
    plain = PlainRotaryEmbedding(config=CONFIG)
    module = tabled(PlainRotaryEmbedding(config=CONFIG), counted)
    positions = POSITIONS[:, :2]
    for x, pos in (
        (torch.zeros(1, dtype=torch.float64), positions),
        (torch.zeros(1), positions.float()),
        (torch.zeros(1), positions[0]),
    ):
        for got, expected in zip(module(x, pos), plain(x, pos), strict=True):
            assert got.equal(expected)
    assert not calls
    module(torch.zeros(1), positions)
    assert len(calls) == 1
    module.rotary_cache = None
    assert module(torch.zeros(1), positions)[0].equal(plain(torch.zeros(1), positions)[0])


@pytest.mark.parametrize("name", ["opt-llama", "llama"])
def test_compiled_decode_step_computes_the_tables_once(kernel, name):
    """In a decode step compiled by inductor the tables come from one call of the op and no kernel computes a cosine
    or a sine; unfused, inductor recomputes them in the kernels that read them (the premise: on the GPU, in each
    kernel rotating a query or key outside the RoPE and decode kernels)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    config = tiny_config() if name == "opt-llama" else llama_twin(tiny_config())

    def step_code(fused: bool) -> str:
        model = tiny_model(config, attn_implementation=SPLIT_KV)
        if fused:
            assert fuse_projections(model) > 0 and model.model.rotary_emb.rotary_cache is not None
        cache = StaticCache(config=model.config, max_cache_len=32)
        ids = torch.randint(3, config.vocab_size, (2, 8))
        torch._dynamo.reset()
        with torch.no_grad(), inductor_config.patch(fx_graph_cache=False):
            model(ids, past_key_values=cache, use_cache=True)
            step = torch.compile(model.forward, fullgraph=True)
            _, code = run_and_get_code(
                step, ids[:, -1:], past_key_values=cache, cache_position=torch.tensor([8]), use_cache=True
            )
        return "\n".join(code)

    trigonometry = re.compile(r"\b(cos|sin)\s*\(")  # a call: not the decode op's `cos=` and `sin=` arguments
    assert len(trigonometry.findall(step_code(fused=False))) > 2
    fused = step_code(fused=True)
    assert not trigonometry.findall(fused) and fused.count("torch.ops.lckv.rotary_tables.default(") == 1
