"""The decode step's RoPE + cache-write kernel (models/kernels/rotary_cache.py, triton_rotary_cache.py), on the CPU
through Triton's interpreter: against the plain rotary and ``StaticLayer.update`` it replaces, where it applies and
where it leaves the two steps to the caller, through a compiled (functionalized) trace, and in fused LCKV and Llama
models (same greedy tokens as unfused, the kernel run at each decode step)."""

import copy

import pytest
import torch
from transformers.cache_utils import DynamicCache, StaticCache, StaticLayer

from models.config_loading import llama_twin
from models.fused_projections import fuse_projections
from models.kernels import rotary_cache
from models.kernels.plain import PlainRotaryEmbedding, plain_rotate
from models.kernels.rotary_cache import (
    RotaryCacheKernel,
    give_rotary_cache,
    load_rotary_cache_kernel,
    rotate_and_cache,
    writable_layer,
)
from models.kernels.rotary_cache_launch import WHOLE_ROWS, rotary_cache_launch
from tests.conftest import load_interpreted, tiny_config, tiny_model

# float32 RoPE of values about 1: a product and a sum per element, rounded once (float32 against float32 reference
# computed in another order: a few ulps)
FP32 = dict(rtol=4 * torch.finfo(torch.float32).eps, atol=4 * torch.finfo(torch.float32).eps)
CONFIG = llama_twin(tiny_config())  # 4 query heads, 2 KV heads of 16 dims, 6 layers
B, HQ, HKV, D, SLOTS, FILLED = 2, 4, 2, 16, 6, 3
LAYER = 1  # a layer whose fill level the kernel advances (layer 0's is advanced after it)


@pytest.fixture
def kernel() -> RotaryCacheKernel:
    """The kernel on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py)."""
    return load_interpreted(load_rotary_cache_kernel, "tests/test_rotary_cache_gpu.py")


def decode_inputs(dtype: torch.dtype = torch.float32, batch_cos: bool = True, layer_idx: int = LAYER):
    """One token's queries, keys and values as views of one fused product (as the attention makes them), RoPE tables
    at each row's position, and a static cache layer holding ``FILLED`` tokens of ``SLOTS``."""
    product = torch.randn(B, 1, (HQ + 2 * HKV) * D, dtype=dtype)
    queries, keys, values = (
        part.view(B, 1, -1, D).transpose(1, 2) for part in product.split([HQ * D, HKV * D, HKV * D], dim=-1)
    )
    rotary = PlainRotaryEmbedding(config=CONFIG)
    positions = torch.tensor([[FILLED], [FILLED + 5]])[: B if batch_cos else 1]
    cos, sin = rotary(product, positions)
    cache = StaticCache(config=CONFIG, max_cache_len=SLOTS)
    layer = cache.layers[layer_idx]
    layer.lazy_initialization(keys, values)
    layer.keys.normal_()
    layer.values.normal_()
    layer.cumulative_length.fill_(FILLED)
    return cache, queries, keys, values, cos, sin


def zero_counter() -> torch.Tensor:
    """The kernel's counter of arrivals, as ``give_rotary_cache`` makes it."""
    return torch.zeros(1, dtype=torch.int32)


def two_steps(cache, queries, keys, values, cos, sin, layer_idx: int = LAYER):
    """What the kernel replaces: the plain rotary, then ``cache.update``."""
    rotated_queries, rotated_keys = plain_rotate(queries, cos, sin), plain_rotate(keys, cos, sin)
    cached_keys, cached_values = cache.update(rotated_keys, values, layer_idx)
    return rotated_queries, rotated_keys, cached_keys, cached_values


@pytest.mark.parametrize("layer_idx", [0, LAYER], ids=["level-after", "level-in-kernel"])
@pytest.mark.parametrize("batch_cos", [True, False], ids=["cos-per-row", "cos-broadcast"])
def test_kernel_equals_rotary_then_cache_update(kernel, batch_cos, layer_idx):
    """The outputs, the one slot written, and the level advanced once: after the kernel for layer 0, else by the last
    of the kernel's 8 programs, 4 per row at this batch (programs that each advanced it would each write at a later
    slot), which leaves its counter at zero."""
    cache, *inputs = decode_inputs(batch_cos=batch_cos, layer_idx=layer_idx)
    expected_cache = copy.deepcopy(cache)
    expected = two_steps(expected_cache, *inputs, layer_idx=layer_idx)
    arrivals = zero_counter()
    written = rotate_and_cache(kernel, arrivals, cache, layer_idx, *inputs)
    assert written is not None
    for out, reference in zip(written, expected, strict=True):
        assert out.shape == reference.shape
        torch.testing.assert_close(out, reference, **FP32)
    layer, expected_layer = cache.layers[layer_idx], expected_cache.layers[layer_idx]
    assert int(layer.cumulative_length) == int(expected_layer.cumulative_length) == FILLED + 1
    others = [s for s in range(SLOTS) if s != FILLED]
    assert layer.keys[:, :, others].equal(expected_layer.keys[:, :, others])  # nothing else written
    assert layer.values[:, :, FILLED].equal(inputs[2][:, :, 0])  # values copied as they are
    assert written[2] is layer.keys and written[3] is layer.values  # the cache's own tensors, as update returns
    assert arrivals.item() == 0


@pytest.mark.parametrize("batch", [3, 40], ids=["a-head-per-program", "blocks-of-heads"])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(6, 3, 24), (5, 1, 10)])
def test_ragged_heads_and_head_dim(kernel, heads, kv_heads, head_dim, batch):
    """Head counts and a head dim that are not powers of two (a program's tile is padded to them, some programs' heads
    are all past the row's): every head of every row rotated, and its KVs written at the level, which the last of the
    programs advances."""
    slots, level = 5, 2
    queries = torch.randn(batch, heads, 1, head_dim)
    keys, values = torch.randn(2, batch, kv_heads, 1, head_dim)
    positions = torch.arange(batch)[:, None] + level
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim)
    angles = torch.cat([positions[..., None] * inv_freq] * 2, dim=-1)  # (B, 1, D)
    cos, sin = angles.cos(), angles.sin()
    key_cache, value_cache = torch.randn(2, batch, kv_heads, slots, head_dim)
    expected_keys, expected_values = key_cache.clone(), value_cache.clone()
    expected_keys[:, :, level] = plain_rotate(keys, cos, sin)[:, :, 0]
    expected_values[:, :, level] = values[:, :, 0]
    fill, arrivals = torch.tensor(level), zero_counter()
    rotated_queries, rotated_keys = kernel.run_advancing(
        queries, keys, values, cos, sin, key_cache, value_cache, fill, arrivals
    )
    torch.testing.assert_close(rotated_queries, plain_rotate(queries, cos, sin), **FP32)
    torch.testing.assert_close(rotated_keys, plain_rotate(keys, cos, sin), **FP32)
    torch.testing.assert_close(key_cache, expected_keys, **FP32)
    assert value_cache.equal(expected_values) and int(fill) == level + 1 and arrivals.item() == 0


@pytest.mark.parametrize("batch", [1, 3, 40, 64, 65, 127, 128, 4096])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 4, 64), (32, 32, 128), (52, 52, 128), (6, 3, 16)])
def test_launch_splits_a_rows_heads_evenly_below_whole_rows(batch, heads, kv_heads, head_dim):
    """Each program's blocks are an equal share of the padded heads (query and KV heads split the same way, a KV block
    at least one head); the grid is the most programs per row within ``WHOLE_ROWS`` in all (a power of two, at most
    one per padded query head), one per row from 65 rows (128 // 65 = 1); warps by the tile."""
    launch = rotary_cache_launch(batch, heads, kv_heads, head_dim)
    padded_q, padded_kv = (1 << (n - 1).bit_length() for n in (heads, kv_heads))
    programs = launch.programs_per_row
    assert programs & (programs - 1) == 0 and programs <= padded_q
    assert programs * launch.block_hq == padded_q
    assert launch.block_hkv == max(1, padded_kv // programs) and programs * launch.block_hkv >= kv_heads
    assert launch.block_d == 1 << (head_dim - 1).bit_length()
    assert batch * programs <= max(batch, WHOLE_ROWS)  # within WHOLE_ROWS programs, or one per row
    assert programs == padded_q or batch * programs * 2 > WHOLE_ROWS  # and no power of two more would fit
    tile = max(launch.block_hq, launch.block_hkv) * launch.block_d
    assert launch.num_warps == (1 if tile <= 256 else 4 if tile <= 4096 else 8)


@pytest.mark.parametrize(
    "batch, heads, kv_heads, head_dim, expected",
    [
        (1, 32, 32, 128, (32, 1, 1, 128, 1)),  # Llama-2-7B at batch 1 (measured): a program per head, one warp
        (3, 32, 32, 128, (32, 1, 1, 128, 1)),
        (32, 32, 32, 128, (4, 8, 8, 128, 4)),
        (1, 32, 4, 64, (32, 1, 1, 64, 1)),  # TinyLlama at batch 1 (measured): KV heads in the first 4 programs
        (40, 6, 3, 16, (2, 4, 2, 16, 1)),  # blocks of several heads, the second's partly past the row's
        (128, 32, 4, 64, (1, 32, 4, 64, 4)),  # whole rows, the warps of before the split
        (4096, 52, 52, 128, (1, 64, 64, 128, 8)),
    ],
)
def test_launch_at_model_shapes(batch, heads, kv_heads, head_dim, expected):
    assert rotary_cache_launch(batch, heads, kv_heads, head_dim) == expected


def test_consecutive_steps_write_consecutive_slots(kernel):
    """The counter is back at zero after each launch: three steps fill three slots and advance the level by three."""
    cache, *inputs = decode_inputs()
    expected_cache = copy.deepcopy(cache)
    arrivals = zero_counter()
    for _ in range(3):
        expected = two_steps(expected_cache, *inputs)
        written = rotate_and_cache(kernel, arrivals, cache, LAYER, *inputs)
        torch.testing.assert_close(written[2], expected[2], **FP32)
    assert int(cache.layers[LAYER].cumulative_length) == FILLED + 3 and arrivals.item() == 0


def test_without_a_counter_the_level_is_advanced_after_the_kernel(kernel):
    """A module the kernel was given without its counter, or a counter on another device: the kernel writes, and the
    level grows by one all the same."""
    for arrivals in (None, torch.zeros(1, dtype=torch.int32, device="meta")):
        cache, *inputs = decode_inputs()
        expected_cache = copy.deepcopy(cache)
        expected = two_steps(expected_cache, *inputs)
        written = rotate_and_cache(kernel, arrivals, cache, LAYER, *inputs)
        torch.testing.assert_close(written[2], expected[2], **FP32)
        assert int(cache.layers[LAYER].cumulative_length) == FILLED + 1


def test_give_rotary_cache_makes_the_counter_a_buffer(kernel):
    """The counter moves with the module and stays out of its state dict."""
    module = torch.nn.Linear(2, 2, dtype=torch.float64)
    give_rotary_cache(module, kernel)
    assert module.rotary_cache is kernel and module.rotary_cache_arrivals.tolist() == [0]
    assert "rotary_cache_arrivals" in dict(module.named_buffers())
    assert module.rotary_cache_arrivals.dtype == torch.int32 and "rotary_cache_arrivals" not in module.state_dict()
    assert module.half().rotary_cache_arrivals.dtype == torch.int32  # a float cast leaves integer buffers alone
    plain = torch.nn.Linear(2, 2)
    give_rotary_cache(plain, None)
    assert not hasattr(plain, "rotary_cache_arrivals")


def test_where_the_kernel_applies(kernel):
    cache, queries, keys, values, cos, sin = decode_inputs()
    layer = cache.layers[LAYER]

    def writable(keys=keys, values=values, queries=queries, cache=cache, layer_idx=LAYER, kernel=kernel):
        return writable_layer(kernel, cache, layer_idx, queries, keys, values)

    assert writable() is layer
    assert writable(kernel=None) is None
    assert writable(cache=None) is None
    assert writable(keys=torch.cat([keys, keys], dim=2)) is None  # two tokens
    assert writable(keys=keys.double()) is None  # float64: the plain path's precision
    assert writable(keys=keys.half()) is None  # another dtype than the cache's
    assert writable(values=values.half()) is None
    assert writable(keys=keys[:1], values=values[:1]) is None  # another batch than the cache's
    assert writable(keys=keys[:, :1], values=values[:, :1]) is None  # other heads
    assert writable(layer_idx=2) is None  # not initialized: update's lazy path
    assert writable(layer_idx=99) is None  # no such layer
    assert writable(kernel=kernel._replace(devices=frozenset({"cuda"}))) is None
    assert writable(cache=DynamicCache(config=CONFIG)) is None
    subclassed = copy.deepcopy(cache)
    subclassed.layers[LAYER].__class__ = type("Sliding", (StaticLayer,), {})
    assert writable(cache=subclassed) is None
    offloaded = copy.deepcopy(cache)
    offloaded.offloading = True
    assert writable(cache=offloaded) is None
    with torch.enable_grad():  # a gradient wanted for any input: the op has no backward
        for name in ("queries", "keys", "values"):
            assert writable(**{name: locals()[name].clone().requires_grad_()}) is None
    full = copy.deepcopy(cache)
    full.layers[LAYER].cumulative_length.fill_(SLOTS)
    assert writable(cache=full) is None  # StaticLayer.update raises there
    before = layer.keys.clone()
    two_tokens = torch.cat([keys, keys], dim=2)
    assert rotate_and_cache(kernel, zero_counter(), cache, LAYER, queries, two_tokens, values, cos, sin) is None
    assert layer.keys.equal(before) and int(layer.cumulative_length) == FILLED  # nothing done


def test_kernel_writes_nothing_past_the_last_slot(kernel):
    """Inside a compiled step the fill level is not read on the host: a full cache is left as it is (the level still
    grows, as ``StaticLayer.update``'s does before its write fails)."""
    cache, queries, keys, values, cos, sin = decode_inputs()
    layer = cache.layers[LAYER]
    before = layer.keys.clone(), layer.values.clone()
    level = torch.tensor(SLOTS)
    kernel.run(queries, keys, values, cos, sin, layer.keys, layer.values, level)
    assert layer.keys.equal(before[0]) and layer.values.equal(before[1]) and level.item() == SLOTS
    kernel.run_advancing(queries, keys, values, cos, sin, layer.keys, layer.values, level, zero_counter())
    assert layer.keys.equal(before[0]) and layer.values.equal(before[1]) and level.item() == SLOTS + 1


def test_compiled_trace_writes_the_cache(kernel):
    """Through dynamo and functionalization (``aot_eager``), as in a compiled decode step: one graph, the same
    outputs and cache writes as eager."""
    cache, *inputs = decode_inputs()
    eager_cache = copy.deepcopy(cache)
    expected = rotate_and_cache(kernel, zero_counter(), eager_cache, LAYER, *inputs)
    arrivals = zero_counter()

    def step(queries, keys, values, cos, sin):
        return rotate_and_cache(kernel, arrivals, cache, LAYER, queries, keys, values, cos, sin)

    with torch.no_grad():
        out = torch.compile(step, backend="aot_eager", fullgraph=True)(*inputs)
    for got, reference in zip(out[:2], expected[:2], strict=True):
        torch.testing.assert_close(got, reference, rtol=0, atol=0)
    layer, eager_layer = cache.layers[LAYER], eager_cache.layers[LAYER]
    assert layer.keys.equal(eager_layer.keys) and layer.values.equal(eager_layer.values)
    assert int(layer.cumulative_length) == FILLED + 1 and arrivals.item() == 0


class Counting:
    """Counts the calls of the ops it wraps, together."""

    def __init__(self):
        self.calls = 0

    def wrap(self, op):
        def counted(*args):
            self.calls += 1
            return op(*args)

        return counted


@pytest.mark.parametrize("name", ["opt-llama", "llama"])
def test_fused_model_decodes_as_before(kernel, monkeypatch, name):
    """Greedy generation through a static cache gives the unfused model's tokens; every decode step of every layer
    with its own KVs ran the kernel (the prefill, several tokens, did not), and every forward's RoPE tables came from
    the tables kernel."""
    counting, advancing, tables = Counting(), Counting(), Counting()
    counted = kernel._replace(
        run=counting.wrap(kernel.run),
        run_advancing=advancing.wrap(kernel.run_advancing),
        tables=tables.wrap(kernel.tables),
    )
    monkeypatch.setattr(rotary_cache, "load_rotary_cache_kernel", lambda: counted)
    monkeypatch.setattr("models.fused_projections.load_rotary_cache_kernel", lambda: counted)
    config = tiny_config()
    model = tiny_model(config if name == "opt-llama" else llama_twin(config))
    ids = torch.randint(3, 256, (2, 5))
    generate = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        plain = model.generate(ids, **generate)
        assert fuse_projections(model) > 0
        fused = model.generate(ids, **generate)
    assert fused.equal(plain)
    kv_layers = sum(
        getattr(layer.self_attn, "has_own_kv", True) for layer in model.model.layers
    )  # a Llama layer has its own KVs
    # 4 new tokens: the first from the prefill, 3 decode steps; every layer but layer 0 advances its level in the kernel
    assert counting.calls + advancing.calls == 3 * kv_layers and advancing.calls == 3 * (kv_layers - 1)
    assert tables.calls == 4  # the RoPE tables of every forward: the prefill's and the 3 steps


def counters(model) -> list[int]:
    """Every attention's kernel counter."""
    return [int(buffer) for name, buffer in model.named_buffers() if name.endswith("rotary_cache_arrivals")]


@pytest.mark.parametrize("name", ["opt-llama", "llama"])
def test_a_conversion_leaves_the_counter_zero(kernel, monkeypatch, name):
    """A conversion's new memory may hold anything (``to_empty``); the kernel counts from zero, so the attention
    zeroes its counter after every conversion. Stood in for by a conversion that fills integer tensors with 7."""
    monkeypatch.setattr("models.fused_projections.load_rotary_cache_kernel", lambda: kernel)
    config = tiny_config()
    model = tiny_model(config if name == "opt-llama" else llama_twin(config))
    fuse_projections(model)
    assert counters(model) and set(counters(model)) == {0}
    model._apply(lambda t: t.new_full(t.shape, 7) if t.dtype == torch.int32 else t)
    assert set(counters(model)) == {0}


@pytest.mark.parametrize("name", ["opt-llama", "llama"])
def test_fused_on_meta_then_materialised_decodes_as_before(kernel, monkeypatch, name):
    """A model built and fused on the meta device, materialised with ``to_empty`` and loaded, decodes as the model it
    was loaded from (the counter made zero, the parts views of the new fused matrices)."""
    monkeypatch.setattr("models.fused_projections.load_rotary_cache_kernel", lambda: kernel)
    config = tiny_config() if name == "opt-llama" else llama_twin(tiny_config())
    reference = tiny_model(config)
    with torch.device("meta"):
        model = tiny_model(config, seed=1)
    assert fuse_projections(model) > 0
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    model.model.rotary_emb.inv_freq.copy_(reference.model.rotary_emb.inv_freq)  # a non-persistent buffer
    assert set(counters(model)) == {0}
    ids = torch.randint(3, 256, (2, 5))
    generate = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        assert model.generate(ids, **generate).equal(reference.generate(ids, **generate))
