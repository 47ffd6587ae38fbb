"""models.roofline and the "auto" prefill choice: formulas against hand-computed values and torch's FLOP counter."""

import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from models import roofline
from models.prefill_modes import choose_prefill, prefill_seconds
from models.roofline import Hardware, Shape
from tools import cli

from .conftest import CONFIGS, tiny_config

# Layers 0 and 3 standard, layer 1 reads layer 2 (the target) from above: block = layers 1..2, 3 iterations.
TOY = Shape(
    layer_weights=(10, 8, 10, 10),
    layer_kv_weights=(2, 0, 2, 2),
    query_heads=2,
    kv_heads=1,
    head_dim=4,
    block=range(1, 3),
    num_iterations=3,
)
TOY_LLAMA = Shape(
    layer_weights=(10, 10, 10, 10),
    layer_kv_weights=(2, 2, 2, 2),
    query_heads=2,
    kv_heads=1,
    head_dim=4,
    block=range(4, 4),
    num_iterations=1,
)


def test_iterative_prefill_cost_by_hand():
    # B = 2, T = 5, k = 3: weights 38 + 2 extra iterations x (layer 1's 8 + the target's K/V 2) = 58;
    # full layer runs 4 + 2 x 1 = 6, each 4 Hq D = 32 FLOPs per pair over B T^2 / 2 = 25 pairs.
    cost = roofline.iterative_prefill_cost(TOY, batch=2, length=5, value_bytes=2)
    assert cost.flops == 2 * 2 * 5 * 58 + 6 * 32 * 25 == 5960
    assert cost.bytes == 2 * 58
    # Two tokens: only two iterations (k = min(num_encoders + 1, T)).
    assert roofline.iterative_prefill_cost(TOY, 1, 2).flops == 2 * 2 * (38 + 10) + (4 + 1) * 32 * 2


def test_parallel_prefill_and_token_step_cost_by_hand():
    cost = roofline.parallel_prefill_cost(TOY_LLAMA, batch=2, length=5, value_bytes=2)
    assert (cost.flops, cost.bytes) == (2 * 2 * 5 * 40 + 4 * 32 * 25, 80)
    # B = 2, 3 filled tokens: 2 x (2 x 38 weights + 4 layers x 32 x 3 keys); weights 76 bytes + 2 x 3 x 4 layers x 2
    # Hkv D b
    step = roofline.token_step_cost(TOY, batch=2, filled=3, value_bytes=2)
    assert (step.flops, step.bytes) == (2 * (76 + 4 * 32 * 3), 76 + 2 * 3 * 4 * 2 * 1 * 4 * 2)
    assert step.seconds(Hardware("toy", hbm_bandwidth=10, peak_flops=100)) == max(920 / 100, 460 / 10)


def test_sequential_prefill_seconds_by_hand():
    # B = 1: step t reads n = t + 1 tokens: FLOPs 76 + 128 n at 100/s, bytes 76 + 64 n at 60/s, 4 layers x 0.5 s each.
    # n = 1: max(2.04, 2.333); n = 2: max(3.32, 3.4); n = 3: max(4.60, 4.467): the memory term wins, then compute.
    hardware = Hardware("toy", hbm_bandwidth=60, peak_flops=100, step_overhead_per_layer=0.5)
    expected = 140 / 60 + 204 / 60 + 4.60 + 3 * 4 * 0.5
    assert roofline.sequential_prefill_seconds(TOY, batch=1, length=3, hardware=hardware) == pytest.approx(expected)


def test_sum_of_max_linear_equals_the_sum():
    rng = random.Random(0)
    cases = [(1, 1, 4, 0.5, 9), (0, 2, 5, 0, 5), (3, 1, 3, 1, 4), (0, 1, 0, 2, 0)]
    cases += [(*(rng.uniform(-5, 5) for _ in range(4)), rng.randint(0, 30)) for _ in range(200)]
    for a0, a1, b0, b1, steps in cases:
        brute = sum(max(a0 + a1 * t, b0 + b1 * t) for t in range(steps))
        assert roofline.sum_of_max_linear(a0, a1, b0, b1, steps) == pytest.approx(brute, abs=1e-9)


def test_decode_roofline_by_hand():
    # steps 1..3 after a 5-token prompt read 6, 7, 8 tokens of 10 bytes per sequence, and 100 bytes of weights.
    assert (
        roofline.decode_roofline_seconds(100, 10, batch=2, prompt_length=5, steps=3, bandwidth=10)
        == (300 + 2 * 10 * 21) / 10
    )


def matrix_and_attention_flops(counter: FlopCounterMode) -> tuple[int, int]:
    """(matrix multiplies, attention) FLOPs counted; SDPA's math path counts as batched matrix multiplies."""
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = sum(n for op, n in counts.items() if "bmm" in op or "attention" in op)
    return sum(counts.values()) - attention, attention


def test_iterative_prefill_flops_equal_the_counted_forward():
    """torch's FLOP counter over the real forward: the matrix work matches, attention is counted over all T^2
    pairs (the dense strict mask), the roofline's causal ideal over T^2 / 2."""
    config = tiny_config(num_encoders=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    batch, length = 2, 7
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(batch, length, dtype=torch.long, device="meta"), logits_to_keep=1)
    matrix, attention = matrix_and_attention_flops(counter)
    lm_head = 2 * batch * config.hidden_size * config.vocab_size  # the last token's logits
    shape = roofline.model_shape(config)
    assert shape.block == range(1, 5) and shape.layer_kv_weights[1] == 0 < shape.layer_kv_weights[4]
    cost = roofline.iterative_prefill_cost(shape, batch, length)
    full_runs = 6 + 2 * 3  # 6 layers once, layers 1..3 in both extra iterations
    causal_attention = full_runs * roofline.attention_flops(shape, batch * length, length / 2)
    assert matrix - lm_head == cost.flops - causal_attention
    assert attention == 2 * causal_attention


def test_token_step_flops_equal_the_counted_decode_step():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(num_encoders=2), attn_implementation="sdpa").eval()
    cache = DynamicCache(config=model.config)
    batch, cached = 3, 5
    with torch.no_grad():
        model(torch.zeros(batch, cached, dtype=torch.long, device="meta"), cache=cache, use_cache=True)
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(batch, 1, dtype=torch.long, device="meta"), cache=cache, use_cache=True)
    matrix, attention = matrix_and_attention_flops(counter)
    lm_head = 2 * batch * model.config.hidden_size * model.config.vocab_size
    shape = roofline.model_shape(model.config)
    step = roofline.token_step_cost(shape, batch, filled=cached + 1)
    step_attention = shape.num_layers * roofline.attention_flops(shape, batch, cached + 1)
    assert (matrix - lm_head, attention) == (step.flops - step_attention, step_attention)


def test_llama_shape_of_an_lckv_config_is_the_llama_config_shape():
    lckv = tiny_config()
    llama = tiny_config(
        "llama_tiny.json",
        **{
            field: getattr(lckv, field)
            for field in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
            )
        },
    )
    assert roofline.model_shape(lckv, as_llama=True) == roofline.model_shape(llama) != roofline.model_shape(lckv)


@pytest.mark.parametrize("name", ["llama65b.json", "llama65b_opt.json"])
def test_tensor_parallel_shape_is_one_process_share(name):
    """Under TP=2 each process holds half of every layer's heads and MLP features: its token step, parallel prefill
    and KV reads are exactly half the model's (64 heads, MHA: all split evenly)."""
    config = AutoConfig.from_pretrained(CONFIGS / name)
    whole, half = roofline.model_shape(config), roofline.model_shape(config, tp=2)
    assert (half.query_heads, half.kv_heads) == (whole.query_heads // 2, whole.kv_heads // 2) == (32, 32)
    assert sum(half.layer_weights) * 2 == sum(whole.layer_weights)
    for cost in (roofline.token_step_cost, roofline.parallel_prefill_cost):
        assert cost(half, 8, 100).flops * 2 == cost(whole, 8, 100).flops
        assert cost(half, 8, 100).bytes * 2 == cost(whole, 8, 100).bytes
    assert half.kv_read_bytes_per_token(2) * 2 == whole.kv_read_bytes_per_token(2)


def test_tensor_parallel_shape_keeps_one_kv_head_when_heads_are_fewer_than_processes():
    config = tiny_config()  # 2 KV heads: with 4 processes each still computes one (replicated)
    assert roofline.model_shape(config, tp=4).kv_heads == 1 and roofline.model_shape(config, tp=2).kv_heads == 1


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H200", (4.8e12, 989e12)),
        ("NVIDIA H100 80GB HBM3", (3.35e12, 989e12)),
        ("NVIDIA H100 PCIe", (2.0e12, 756e12)),
        ("NVIDIA A100-SXM4-80GB", (2.0e12, 312e12)),
        ("NVIDIA A100-PCIE-40GB", (1.555e12, 312e12)),
        ("NVIDIA GeForce RTX 4090", (3.35e12, 989e12)),  # not in the table: H100 SXM figures
    ],
)
def test_gpu_table_by_device_name(name, expected):
    hardware = roofline.gpu_hardware(name)
    assert (hardware.hbm_bandwidth, hardware.peak_flops) == expected
    assert roofline.device_hardware(torch.device("cpu")) is None


H200 = roofline.gpu_hardware("NVIDIA H200")


@pytest.fixture(scope="module")
def tinyllama_opt():
    return cli.load_config("--configs", str(CONFIGS / "tinyllama_opt.json"))


def test_auto_picks_each_path_by_cost(tinyllama_opt):
    """Iterative where the sequential steps' weights reads and overhead dominate (batch 1), sequential where the
    iterations' matrix work does (batch 512), each the cheaper by the cost model."""
    for batch, expected in ((1, "iterative"), (512, "sequential")):
        seconds = prefill_seconds(tinyllama_opt, batch, 2047, H200)
        assert min(seconds, key=seconds.get) == expected == choose_prefill("auto", tinyllama_opt, batch, 2047, H200)
    # A short prompt flips between the batches too, and a slower memory flips a large batch back.
    assert choose_prefill("auto", tinyllama_opt, 16, 256, H200) == "iterative"
    assert choose_prefill("auto", tinyllama_opt, 64, 256, H200) == "sequential"
    slow_memory = Hardware("slow memory", hbm_bandwidth=0.3e12, peak_flops=989e12)
    assert choose_prefill("auto", tinyllama_opt, 512, 2047, slow_memory) == "iterative"


def test_auto_stays_iterative_where_the_model_prices_nothing(tinyllama_opt):
    iterations = tinyllama_opt.num_encoders + 1
    assert choose_prefill("auto", tinyllama_opt, 512, 2047, None) == "iterative"  # no GPU (CPU)
    assert choose_prefill("auto", tinyllama_opt, 512, 2047, H200, captured=False) == "iterative"  # eager steps
    assert choose_prefill("auto", tinyllama_opt, 4096, iterations, H200) == "iterative"  # exact already
    assert choose_prefill("sequential", tinyllama_opt, 1, 2, None) == "sequential"
    assert choose_prefill("iterative", tinyllama_opt, 4096, 4096, H200) == "iterative"
    with pytest.raises(ValueError, match=r"^prefill: 'fast'; allowed values are iterative, sequential, auto$"):
        choose_prefill("fast", tinyllama_opt, 1, 2, None)
