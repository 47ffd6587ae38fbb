"""config.prefill: the sequential (token-by-token) prefill is exact, composes with generate, compiles once."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import CompileConfig, DynamicCache, StaticCache

from models import SPLIT_KV, modeling_opt_llama, sequential_prefill
from models.chunked_prefill import prefill_in_chunks
from models.configuration_opt_llama import OptLlamaConfig
from models.roofline import Hardware

from .conftest import tiny_config, tiny_model
from .numerics import FLOAT64_ATOL
from .test_model_oracles import model64, sequential_logits

ATOL = 2e-5  # float32 against float32: the same computation compiled and eager, or two attention kernels
NUM_ENCODERS = 2
LONG = 13  # prompt tokens: more than num_encoders + 1 = 3 iterations, so the iterative prefill is approximate
NEW = 6


def model_with(prefill: str = "sequential", dtype: torch.dtype = torch.float32, **overrides):
    return tiny_model(
        tiny_config(prefill=prefill, **{"num_encoders": NUM_ENCODERS, "num_trained_encoders": 1, **overrides}),
        dtype=dtype,
    )


def padded_prompts(length: int, vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(3, length)`` prompts of lengths ``length``, ``length - 3`` and ``length - 6``, left-padded with 0."""
    ids = torch.randint(3, vocab, (3, length))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids.masked_fill(mask == 0, 0), mask


def make_cache(kind: str, model, length: int):
    return (
        StaticCache(config=model.config, max_cache_len=length)
        if kind == "static"
        else DynamicCache(config=model.config)
    )


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_sequential_prefill_logits_equal_token_by_token_decoding(cache_kind):
    """Oracle (float64): the logits of a left-padded batch of prompts of different lengths equal decoding one token
    at a time."""
    model = model_with("sequential", torch.float64)
    ids, mask = padded_prompts(LONG)
    expected = sequential_logits(model, ids, mask)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(
            ids,
            attention_mask=mask,
            position_ids=position_ids,
            cache=make_cache(cache_kind, model, LONG + 2),
            use_cache=True,
        )
    for row, start in enumerate([0, 3, 6]):  # padded positions output nothing meaningful
        torch.testing.assert_close(out.logits[row, start:], expected[row, start:], atol=FLOAT64_ATOL, rtol=0)
    iterative = model_with("iterative", torch.float64)
    with torch.no_grad():
        approx = iterative(
            ids, attention_mask=mask, position_ids=position_ids, cache=DynamicCache(config=iterative.config)
        ).logits
    assert (approx[0, -1] - expected[0, -1]).abs().max() > 1e-3  # the oracle can tell the paths apart


GENERATION = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=20),
    "beam_search": dict(do_sample=False, num_beams=3, num_return_sequences=2),
}


LARGE = dict(initializer_range=0.5)  # large random weights: an approximate prefill gives other tokens


def generate_with(prefill: str, ids: torch.Tensor, mask: torch.Tensor, mode: str, cache_kind: str, **overrides):
    """``generate`` (seeded) of a model with large random weights and ``prefill``: ``(B, T + NEW)`` tokens."""
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0, **GENERATION[mode])
    if cache_kind == "static":
        kwargs["cache_implementation"] = "static"
    torch.manual_seed(1)
    return model_with(prefill, **LARGE, **overrides).generate(ids, **kwargs)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("mode", list(GENERATION))
def test_generate_with_the_sequential_prefill_equals_enough_iterations(mode, cache_kind):
    """generate with prefill="sequential" (3 iterations) gives the tokens of the iterative prefill with an iteration
    per prompt token, exact by another code path (long, left-padded prompts); 3 iterations there give other tokens."""
    ids, mask = padded_prompts(LONG)
    exact = generate_with("iterative", ids, mask, mode, cache_kind, num_encoders=LONG - 1)
    assert torch.equal(generate_with("sequential", ids, mask, mode, cache_kind), exact)
    assert not torch.equal(generate_with("iterative", ids, mask, mode, cache_kind), exact)


@pytest.mark.parametrize("mode", list(GENERATION))
def test_generate_equals_iterative_when_iterations_cover_the_prompt(mode):
    """num_encoders + 1 >= prompt length: the iterative prefill is exact, so both prefills give the same tokens."""
    ids, mask = padded_prompts(9)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0, **GENERATION[mode])
    outputs = []
    for prefill in ("sequential", "iterative"):
        torch.manual_seed(1)
        outputs.append(model_with(prefill, num_encoders=8).generate(ids, **kwargs))
    assert torch.equal(outputs[0], outputs[1])


@pytest.fixture
def cpu_compiled_step(monkeypatch) -> CompileCounterWithBackend:
    """The token step compiled on the CPU (dynamo traces and guards it as on a GPU, the graph runs eagerly); the
    counter counts the frames dynamo compiles, recompilations included."""
    counter = CompileCounterWithBackend("eager")
    monkeypatch.setattr(sequential_prefill, "CPU_COMPILE_BACKEND", counter)
    sequential_prefill.compiled_token_step.cache_clear()
    torch._dynamo.reset()
    yield counter
    sequential_prefill.compiled_token_step.cache_clear()
    torch._dynamo.reset()


def test_token_step_compiles_once_over_a_static_cache(cpu_compiled_step, monkeypatch):
    """The compiled step traces one graph and replays it at every position, with the eager result; a second prompt
    continuing the same cache does not recompile either."""
    model = model_with("sequential")
    ids, mask = padded_prompts(LONG)
    full_mask = torch.cat([mask, torch.ones_like(mask)], dim=1)
    position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
    results = []
    for backend in (None, cpu_compiled_step):
        monkeypatch.setattr(sequential_prefill, "CPU_COMPILE_BACKEND", backend)
        cache = StaticCache(config=model.config, max_cache_len=3 * LONG)
        with torch.no_grad():
            first = model(ids, attention_mask=mask, position_ids=position_ids[:, :LONG], cache=cache).logits
            second = model(ids, attention_mask=full_mask, position_ids=position_ids[:, LONG:], cache=cache).logits
        results.append(torch.cat([first, second], dim=1))
    assert cpu_compiled_step.frame_count == 1
    torch.testing.assert_close(results[1], results[0], atol=ATOL, rtol=0)


def test_prefill_and_decode_steps_compile_once_per_batch_size_at_any_prompt_length(cpu_compiled_step, monkeypatch):
    """One compilation per batch size, batch 1 included, over prompts that cross several MASK_CHUNK windows and end
    in a shorter one: the token step through prefill_cache and generate (at batch 1 a mask row sliced from a window
    used to keep a stride of that window, and every new stride recompiled the step), and the two steps of generate's
    captured decode loop (compiled with transformers' compile config, on the CPU too)."""
    window = 8
    monkeypatch.setattr(sequential_prefill, "MASK_CHUNK", window)  # the same code path at a few tokens per window
    model = model_with("sequential")
    cache_len = 4 * window
    decode = CompileConfig(backend="eager", fullgraph=True, dynamic=False, mode=None)
    decode._compile_all_devices = True  # transformers' switch for compiling generate's decode step off CUDA
    torch._dynamo.utils.counters.clear()
    for batches, (batch, prompt_lengths) in enumerate(((1, (5, 3 * window + 5)), (3, (3 * window + 5, 7))), start=1):
        for length in prompt_lengths:
            ids = torch.randint(3, 256, (batch, length))
            with torch.no_grad():
                sequential_prefill.prefill_cache(model, ids, StaticCache(config=model.config, max_cache_len=cache_len))
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    cache=StaticCache(config=model.config, max_cache_len=cache_len),
                    max_new_tokens=3,
                    do_sample=False,
                    pad_token_id=0,
                    compile_config=decode,
                )
        assert cpu_compiled_step.frame_count == batches  # the token step
        # and generate's captured decode loop (models.fast_decode): its forward step and its token-selection step
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3 * batches


def test_prefill_token_steps_read_only_the_filled_span(interpreted_split_kv, monkeypatch):
    """Under sdpa_split_kv every attention of the sequential prefill's token steps (the cyclic block's layers; the
    layers outside it run over the whole segment) runs the split-KV kernel, whose span per row is the last visible
    slot + 1 of the step's mask: the filled tokens a layer may see (up to the query for a causal layer, before it for
    a strict one; none for a left-padded row's padding), never the S preallocated slots; and the prefill equals the
    one over SDPA."""
    from .test_decode_attention import watched_split_kv

    spans = []
    run = interpreted_split_kv.run
    selection = watched_split_kv(
        monkeypatch,
        interpreted_split_kv,
        lambda q, k, v, mask, lengths, *rest: (
            spans.append((k.shape[2], lengths.tolist())) or run(q, k, v, mask, lengths, *rest)
        ),
    )
    fields = dict(prefill="sequential", num_encoders=NUM_ENCODERS, num_trained_encoders=1)
    model = tiny_model(tiny_config(**fields), attn_implementation=SPLIT_KV, kernel_selection=selection)
    reference = tiny_model(tiny_config(**fields))
    config = model.config
    length, slots = 6, 16
    ids, mask = torch.randint(3, 256, (2, length)), torch.ones(2, length, dtype=torch.long)
    mask[1, :2] = 0  # row 1 left-padded by 2
    logits = {}
    for name, candidate in (("split_kv", model), ("sdpa", reference)):
        with torch.no_grad():
            logits[name] = sequential_prefill.prefill_cache(
                candidate, ids, StaticCache(config=config, max_cache_len=slots), mask
            )
    torch.testing.assert_close(logits["split_kv"], logits["sdpa"], atol=ATOL, rtol=0)

    def span(row: int, t: int, strict: bool) -> int:  # last real key the query at t may see, + 1
        return max((kv + 1 for kv in range(t + 1) if mask[row, kv] and (kv < t or not strict)), default=0)

    strict = model.config.layer_strict
    expected = [
        (slots, [span(row, t, strict[layer]) for row in range(2)])
        for t in range(length)
        for layer in model.model.plan.block
    ]
    assert spans == expected and spans[-1] == (slots, [6, 6])  # the target, a causal layer, sees its token


def test_prefill_cache_then_generate_equals_generate():
    """prefill_cache (one token embedded per step, only the last logits kept) leaves the cache generate would have;
    its logits are the token-by-token model's (float64)."""
    model = model_with("sequential", torch.float64)
    ids = torch.randint(3, 256, (3, LONG))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, cache_implementation="static", **kwargs)
    cache = StaticCache(config=model.config, max_cache_len=LONG + NEW)
    logits = sequential_prefill.prefill_cache(model, ids[:, :-1], cache)
    assert logits.shape == (3, 1, 256) and int(cache.get_seq_length()) == LONG - 1
    torch.testing.assert_close(logits[:, 0], sequential_logits(model, ids[:, :-1])[:, -1], atol=FLOAT64_ATOL, rtol=0)
    assert torch.equal(model.generate(ids, cache=cache, **kwargs), expected)


def test_chunked_prefill_composes_with_sequential_prefill():
    """models.chunked_prefill over the sequential path gives the exact tokens (enough iterations, another path)."""
    model = model_with("sequential", **LARGE)
    ids = torch.randint(3, 256, (5, LONG))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    expected = model_with("iterative", num_encoders=LONG - 1, **LARGE).generate(ids, **kwargs)
    cache = StaticCache(config=model.config, max_cache_len=LONG + NEW)
    prefill_in_chunks(model, ids[:, :-1], cache, chunk=2)
    assert torch.equal(model.generate(ids, cache=cache, **kwargs), expected)
    assert not torch.equal(model_with("iterative", **LARGE).generate(ids, **kwargs), expected)  # the check can fail


def test_auto_in_the_model_follows_the_cost_model(monkeypatch):
    """prefill="auto" in a forward that fills a cache asks choose_prefill (models.prefill_modes, tested in
    tests/test_roofline.py) with the batch, prompt length, value size, the device's GPU, whether the token step
    is captured and the tensor-parallel processes (1 here), and runs the path it answers; without a cache (no prefill)
    always iteratively."""
    ran_sequentially, asked = [], []
    original_prefill, original_choose = modeling_opt_llama.sequential_prefill, sequential_prefill.choose_prefill
    monkeypatch.setattr(
        modeling_opt_llama,
        "sequential_prefill",
        lambda model, embeds, *a, **k: (
            ran_sequentially.append(embeds.shape[0]) or original_prefill(model, embeds, *a, **k)
        ),
    )
    monkeypatch.setattr(
        sequential_prefill, "choose_prefill", lambda *a, **k: asked.append((*a[2:], k)) or original_choose(*a, **k)
    )
    model = model_with("auto")
    compute_bound = Hardware("compute-bound", hbm_bandwidth=1e15, peak_flops=1e6, step_overhead_per_layer=0)
    with torch.no_grad():
        model(
            torch.randint(3, 256, (2, LONG)), cache=DynamicCache(config=model.config), use_cache=True
        )  # CPU: not priced
        monkeypatch.setattr(sequential_prefill, "device_hardware", lambda device: compute_bound)
        model(torch.randint(3, 256, (3, LONG)), cache=DynamicCache(config=model.config), use_cache=True)  # eager steps
        monkeypatch.setattr(sequential_prefill, "CPU_COMPILE_BACKEND", "eager")  # captured: priced
        model(
            torch.randint(3, 256, (4, LONG)), cache=StaticCache(config=model.config, max_cache_len=LONG), use_cache=True
        )
        model(torch.randint(3, 256, (5, LONG)), use_cache=False)
    assert asked == [
        (2, LONG, None, 4, {"captured": False, "tp": 1}),
        (3, LONG, compute_bound, 4, {"captured": False, "tp": 1}),
        (4, LONG, compute_bound, 4, {"captured": True, "tp": 1}),
    ]
    assert ran_sequentially == [4]
    sequential_prefill.compiled_token_step.cache_clear()
    torch._dynamo.reset()


def test_auto_stays_iterative_under_flex_attention(monkeypatch):
    # generate makes a static cache's flex masks whole, and a sequential prefill cannot cut them per token: where the
    # cost model would answer sequential (a compute-bound GPU, a captured step), "auto" keeps the iterative prefill.
    compute_bound = Hardware("compute-bound", hbm_bandwidth=1e15, peak_flops=1e6, step_overhead_per_layer=0)
    monkeypatch.setattr(sequential_prefill, "device_hardware", lambda device: compute_bound)
    monkeypatch.setattr(sequential_prefill, "CPU_COMPILE_BACKEND", "eager")
    config = tiny_config(prefill="auto")
    embeds, cache = torch.zeros(4, LONG, config.hidden_size), StaticCache(config=config, max_cache_len=LONG)
    chosen = {}
    for implementation in ("sdpa", "flex_attention"):
        config._attn_implementation = implementation
        chosen[implementation] = sequential_prefill.uses_sequential_prefill(config, embeds, cache)
    assert chosen == {"sdpa": True, "flex_attention": False}


def test_bad_prefill_value_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match=r"^prefill: 'fast'; allowed values are iterative, sequential, auto$"):
        OptLlamaConfig(prefill="fast")
    config = tiny_config(prefill="auto")
    config.save_pretrained(tmp_path)
    assert OptLlamaConfig.from_pretrained(tmp_path).prefill == "auto"


# Layouts whose layers outside the cyclic block differ: the paper's (one below, one above), a layer above the block
# reading the block's target (its committed KVs), no layer above (the block ends at the top), no block at all.
SEGMENT_LAYOUTS = {
    "lckv": dict(layer_types="0_1_1_1_2_0"),
    "above_reads_target": dict(layer_types="0_1_1_2_1_0", target_layer=3),
    "block_at_top": dict(kv_sources=[0, 5, 5, 5, 5, 5]),
    "no_block": dict(kv_sources=[0, 0, 2, 2, 4, 5]),
    "force_nodiag": dict(layer_types="0_1_1_1_2_0", force_nodiag=True),
    "own_kv_and_below_reader_in_block": dict(kv_sources=[0, 4, 2, 0, 4, 5]),
    # windows over full cache layers (the target has readers without one): one condensed, one above the block
    "window_layers": dict(layer_types="0_1_1_2_1_0", target_layer=3, sliding_window=3, sliding_window_layers=[1, 4]),
}


@pytest.fixture
def segment_runs(monkeypatch) -> list:
    """Segments of 4 tokens; the list records ``(layers, tokens)`` of each run of layers over a segment."""
    monkeypatch.setattr(sequential_prefill, "MASK_CHUNK", 4)
    runs, original = [], sequential_prefill.run_segment
    monkeypatch.setattr(
        sequential_prefill,
        "run_segment",
        lambda model, layers, inputs, *a, **k: (
            runs.append((layers, inputs.shape[1])) or original(model, layers, inputs, *a, **k)
        ),
    )
    return runs


@pytest.mark.parametrize("layout", SEGMENT_LAYOUTS)
def test_layers_outside_the_block_run_over_segments_exactly(layout, segment_runs, num_threads):
    """Oracle (float64): an exact forward of 11 tokens, one row left-padded, runs the layers below and above the
    cyclic block over segments of 4, 4 and 3 tokens and the block token by token, and gives the logits of decoding one
    token at a time. The dynamic cache the forward returns holds every layer's KVs, and decoding goes on from it."""
    model = model64(tiny_config(num_encoders=1, sequential_forward=True, **SEGMENT_LAYOUTS[layout]))
    plan = model.model.plan
    ids = torch.randint(3, 256, (2, 14))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        out = model(ids[:, :11], attention_mask=mask[:, :11], use_cache=True)
        rest = [
            model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=out.cache, use_cache=True).logits
            for t in range(11, 14)
        ]
    expected = sequential_logits(model, ids, mask)
    torch.testing.assert_close(torch.cat([out.logits, *rest], dim=1), expected, atol=FLOAT64_ATOL, rtol=0)
    assert type(out.cache) is DynamicCache
    parts = [part for part in (plan.below, plan.above) if part] if plan.block else [range(6)]
    assert segment_runs == [(part, tokens) for tokens in (4, 4, 3) for part in parts]


def test_a_large_batch_runs_every_layer_in_the_token_step(segment_runs, monkeypatch):
    """Where one layer's attention over a segment would pass SEGMENT_ATTENTION_BYTES, every layer runs in the token
    step (no segment runs), with the same logits and, layer by layer, the same reported hidden states
    (output_hidden_states: the layers run over segments report what the whole-stack step reports)."""
    model = model64(tiny_config(num_encoders=1, sequential_forward=True))
    ids = torch.randint(3, 256, (3, 9))
    outputs = []
    for budget in (sequential_prefill.SEGMENT_ATTENTION_BYTES, 0):
        monkeypatch.setattr(sequential_prefill, "SEGMENT_ATTENTION_BYTES", budget)
        with torch.no_grad():
            outputs.append(model(ids, output_hidden_states=True))
        assert bool(segment_runs) == (budget > 0)
        segment_runs.clear()
    with_segments, per_token = outputs
    torch.testing.assert_close(with_segments.logits, per_token.logits, atol=FLOAT64_ATOL, rtol=0)
    assert len(with_segments.hidden_states) == len(per_token.hidden_states) == 7
    for a, b in zip(with_segments.hidden_states, per_token.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=FLOAT64_ATOL, rtol=0)


def test_segment_attention_bytes_by_hand():
    """Keys and values expanded to every query head, and float32 scores of MASK_CHUNK queries: batch 2, 4 heads of
    dimension 16, 32 slots, 2-byte values: 2 * 4 * 32 * (2 * 16 * 2 + 4 * 64) bytes."""
    config = tiny_config()
    assert (config.num_attention_heads, config.head_dim) == (4, 16)
    assert sequential_prefill.segment_attention_bytes(config, 2, 32, 2) == 2 * 4 * 32 * (2 * 16 * 2 + 4 * 64)


def test_layers_that_cut_the_cyclic_block_are_refused():
    model = model_with()
    embeds = torch.zeros(1, 1, model.config.hidden_size)
    with pytest.raises(ValueError, match=r"^layers: range\(0, 3\) cuts the cyclic block range\(1, 5\); allowed are"):
        model.model.forward_layers(embeds, {}, torch.zeros(1, 1, dtype=torch.long), None, layers=range(3))


def test_a_reader_apart_from_its_source_needs_a_static_cache():
    """committed_kv reads what a source committed to a static cache; a dynamic cache is refused in one line."""
    from models.cache_staging import committed_kv

    model = model_with()
    with pytest.raises(ValueError, match=r"^layer 4: its readers run apart from it, .* got DynamicLayer$"):
        cache = DynamicCache(config=model.config)
        cache.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), 4)
        committed_kv(cache, 4)


def test_token_steps_skip_guard_checks_after_the_checked_calls(cpu_compiled_step, monkeypatch):
    """Token 0 runs eagerly (it allocates the cache); of the compiled calls after it, CHECKED_STEPS run dynamo's guard
    checks and the rest skip them (models.fast_decode.guard_skipping), with the logits of an eager prefill."""
    entered, original = [], sequential_prefill.guard_skipping
    monkeypatch.setattr(
        sequential_prefill, "guard_skipping", lambda enabled: entered.append(enabled) or original(enabled)
    )
    monkeypatch.setattr(sequential_prefill, "MASK_CHUNK", 4)  # two segments
    model = model_with("sequential")
    ids = torch.randint(3, 256, (2, 7))
    logits = []
    for backend in (cpu_compiled_step, None):
        monkeypatch.setattr(sequential_prefill, "CPU_COMPILE_BACKEND", backend)
        with torch.no_grad():
            logits.append(
                sequential_prefill.prefill_cache(model, ids, StaticCache(config=model.config, max_cache_len=16))
            )
    assert entered == [False] * sequential_prefill.CHECKED_STEPS + [True] * (6 - sequential_prefill.CHECKED_STEPS)
    torch.testing.assert_close(logits[0], logits[1], atol=ATOL, rtol=0)


def test_an_empty_dynamic_cache_made_without_config_is_the_one_filled():
    """Where no scratch cache runs (window layers keep the dynamic cache), a ``DynamicCache()`` made without a config
    (empty, hence falsy) still receives the prompt's KVs, and decoding goes on from it exactly (float64)."""
    config = tiny_config(kv_sources=[0, 4, 4, 4, 4, 0], sliding_window=3, sliding_window_layers=[0, 5], num_encoders=1)
    model = model64(config)
    model.config.sequential_forward = True
    ids = torch.randint(3, 256, (2, 10))
    cache = DynamicCache()
    with torch.no_grad():
        model(ids[:, :8], cache=cache, use_cache=True)
        following = model(ids[:, 8:9], cache=cache, use_cache=True).logits
    assert cache.get_seq_length() == 9
    torch.testing.assert_close(following, sequential_logits(model, ids[:, :9])[:, 8:], atol=FLOAT64_ATOL, rtol=0)


def test_the_scratch_cache_across_modes_and_calls():
    """The kept scratch cache: a forward under inference mode, then one under no_grad, then one under autocast (which
    keeps the dynamic cache) all run; a left-padded eager forward gives the same logits at every position, padding
    included, before and after an unrelated forward (the cache is zeroed for each use)."""
    model = tiny_model(tiny_config(num_encoders=1, sequential_forward=True), attn_implementation="eager")
    ids, mask = padded_prompts(9)
    with torch.inference_mode():
        in_inference_mode = model(ids, attention_mask=mask).logits
    with torch.no_grad():
        first = model(ids, attention_mask=mask).logits
        model(torch.randint(3, 256, ids.shape))
        again = model(ids, attention_mask=mask).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(model(ids, attention_mask=mask).logits).all()
    assert torch.equal(first, again) and torch.equal(first, in_inference_mode)


def test_an_offloaded_static_cache_runs_every_layer_in_the_token_step():
    """Offloading prefetches in the order of a whole-stack step, so an offloaded cache gets no segments."""
    model = model_with()
    cache = StaticCache(config=model.config, max_cache_len=16)
    assert sequential_prefill.runs_segments(model.model, cache, 1, 4)
    cache.offloading = True
    assert not sequential_prefill.runs_segments(model.model, cache, 1, 4)
