"""The split-KV kernel's launch configuration (models/kernels/decode_launch.py): the defaults are the launch every
shape had before tuning, a tuning table is read as documented and stays one compiled graph, and every tile / warps /
stages the tuner may pick computes what SDPA computes (Triton's interpreter; the GPU's compiled code is checked by
tests/test_decode_attention_gpu.py and by the tuner itself)."""

import pytest
import torch

from bench import tune_decode_attention as tune
from models import SPLIT_KV
from models.kernels import decode_launch
from models.kernels.decode_attention import split_kv_decode_attention
from models.kernels.decode_launch import (
    DEFAULT,
    MAX_SPLITS,
    TILE,
    KernelConfig,
    LaunchConfig,
    check_kernel_config,
    check_table,
    launch_config,
    num_kv_splits,
)

from .conftest import tiny_config, tiny_model
from .test_decode_attention import cache_mask, decode_inputs, run_kernel, sdpa_reference
from .test_static_cache import assert_decode_step_compiles_once


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.parametrize(
    "batch, kv_heads, slots, processors, expected",
    [
        (1, 4, 4096, 132, 64),  # batch 1 on an H100: 66 wanted, capped at MAX_SPLITS
        (1, 4, 4096, 16, 8),  # 2 waves of 16 processors over 4 heads
        (1, 4, 100, 132, 2),  # at most one tile per split
        (128, 4, 4096, 132, 1),  # enough programs without splitting
        (1, 32, 4096, 132, 9),  # ceil(264 / 32)
    ],
)
def test_num_kv_splits(batch, kv_heads, slots, processors, expected):
    assert num_kv_splits(batch, kv_heads, slots, processors) == expected
    assert 1 <= expected <= min(MAX_SPLITS, ceil_div(slots, TILE))


SHAPES = [  # (B, Hkv, G, D, S, bytes per value, SMs): the tuned models' shapes and odd ones
    (batch, kv_heads, group, dim, slots, value_bytes, processors)
    for batch in (1, 3, 32, 128, 512, 2048)
    for kv_heads, group, dim in ((4, 8, 64), (32, 1, 128), (52, 1, 128), (2, 2, 16))
    for slots in (100, 4096)
    for value_bytes in (2, 4)
    for processors in (4, 132)
]


def test_defaults_are_the_launch_before_tuning():
    """Tile 64, 4 warps, 2 stages, and splits for 2 waves per SM (at most one tile each, at most 64): with no
    table, and with TUNED for every shape it does not list (all of them while it is empty)."""
    for batch, kv_heads, group, dim, slots, value_bytes, processors in SHAPES:
        splits = max(1, min(ceil_div(2 * processors, batch * kv_heads), ceil_div(slots, 64), 64))
        before = LaunchConfig(num_splits=splits, block_n=64, num_warps=4, num_stages=2)
        assert launch_config(batch, kv_heads, group, dim, slots, value_bytes, processors, table={}) == before
        if (group, dim, value_bytes) not in decode_launch.TUNED:
            assert launch_config(batch, kv_heads, group, dim, slots, value_bytes, processors) == before


def test_tuned_table_is_valid():
    check_table(decode_launch.TUNED)
    for rows in decode_launch.TUNED.values():
        for _, config in rows:
            assert config in tune.kernel_grid(tune.BLOCK_NS, tune.NUM_WARPS, tune.NUM_STAGES, tune.WAVES_CHOICES)


SMALL, LARGE = KernelConfig(32, 2, 3, 4), KernelConfig(128, 8, 4, 1)
TABLE = {(8, 64, 2): ((4, SMALL), (512, LARGE))}


@pytest.mark.parametrize(
    "batch, kv_heads, group, value_bytes, expected",
    [
        (1, 4, 8, 2, SMALL),  # 4 KV rows: the first row
        (1, 2, 8, 2, SMALL),  # below the first row: still the first row
        (127, 4, 8, 2, SMALL),  # 508 KV rows
        (128, 4, 8, 2, LARGE),  # 512: the second row from its first count on
        (4096, 4, 8, 2, LARGE),
        (128, 4, 8, 4, DEFAULT),  # fp32: another key
        (128, 4, 4, 2, DEFAULT),  # another group
    ],
)
def test_table_rows_by_kv_rows(batch, kv_heads, group, value_bytes, expected):
    launch = launch_config(batch, kv_heads, group, 64, 4096, value_bytes, 132, table=TABLE)
    assert launch[1:] == (expected.block_n, expected.num_warps, expected.num_stages)
    assert launch.num_splits == num_kv_splits(batch, kv_heads, 4096, 132, expected.waves, expected.block_n)


def test_waves_and_tile_set_the_splits():
    assert num_kv_splits(1, 4, 4096, 132, waves=4, block_n=128) == 32  # 132 wanted, one 128-slot tile each
    assert num_kv_splits(1, 32, 4096, 132, waves=1, block_n=32) == 5  # ceil(132 / 32)
    assert num_kv_splits(1, 32, 4096, 132, waves=4, block_n=32) == 17


@pytest.mark.parametrize(
    "config, field",
    [
        (KernelConfig(48, 4, 2, 2), "block_n"),  # not a power of two
        (KernelConfig(8, 4, 2, 2), "block_n"),  # below tl.dot's 16
        (KernelConfig(64, 3, 2, 2), "num_warps"),
        (KernelConfig(64, 4, 0, 2), "num_stages"),
        (KernelConfig(64, 4, 2, 0), "waves"),
    ],
)
def test_check_kernel_config_names_the_field(config, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        check_kernel_config(config)


@pytest.mark.parametrize(
    "rows",
    [(), ((0, DEFAULT),), ((8, DEFAULT), (4, SMALL)), ((4, DEFAULT), (4, SMALL)), ((4, KernelConfig(64, 4, 2, 0)),)],
    ids=["empty", "first-0", "descending", "repeated", "bad-config"],
)
def test_check_table_refuses(rows):
    with pytest.raises(ValueError):
        check_table({(8, 64, 2): rows})


# Every value of each grid dimension in three runs: warps and stages do not change the interpreter's arithmetic
# (they shape the compiled GPU code), tile and splits do.
CANDIDATES = [KernelConfig(n, w, s, 2) for n, w, s in zip(tune.BLOCK_NS, tune.NUM_WARPS, tune.NUM_STAGES, strict=True)]
STRICT_SPANS = [(0, 100), (5, 70), (0, 150), (3, 4)]  # strict mask: left padding, a full row, a row that sees nothing


@pytest.mark.parametrize("config", CANDIDATES, ids=str)
@pytest.mark.parametrize("splits", [1, 3, 8])  # 8 splits of a 100-slot span with 32-slot tiles: some empty
def test_every_tuning_candidate_equals_sdpa(interpreted_kernel, config, splits):
    query, key, value = decode_inputs(len(STRICT_SPANS), 8, 2, seed=2)
    mask = cache_mask(STRICT_SPANS, strict=True)
    out = run_kernel(interpreted_kernel, query, key, value, mask, splits, config)
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    torch.testing.assert_close(out[:3], sdpa_reference(query, key, value, mask)[:3], rtol=1e-5, atol=1e-6)


def test_decode_attention_launches_the_table_config(interpreted_kernel, monkeypatch):
    query, key, value = decode_inputs(2, 8, 2)  # G 4, D 16, fp32
    monkeypatch.setattr(decode_launch, "TUNED", {(4, 16, 4): ((1, SMALL),)})
    launches = []

    def kernel(*args):
        launches.append(args[6:])
        return interpreted_kernel(*args)

    split_kv_decode_attention(kernel, query, key, value, cache_mask([(0, 100), (2, 50)]), None)
    assert launches == [(num_kv_splits(2, 2, 150, 4, SMALL.waves, SMALL.block_n), 32, 2, 3)]


def test_compiled_decode_step_with_a_table_is_one_graph(interpreted_kernel, monkeypatch):
    """A tuned config is a constant of the traced step: fullgraph, no recompilation as the cache fills."""
    config = tiny_config()
    key = (
        config.num_attention_heads // config.num_key_value_heads,
        config.hidden_size // config.num_attention_heads,
        4,
    )
    monkeypatch.setattr(decode_launch, "TUNED", {key: ((1, SMALL),)})
    assert_decode_step_compiles_once(tiny_model(config, attn_implementation=SPLIT_KV))
