"""generate(cache_implementation="static") gives the dynamic cache's tokens; the decode step compiles without breaks."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from transformers import StaticCache
from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

from models import PACKED_SDPA
from models.chunked_prefill import prefill_in_chunks, set_cached_length, static_slots

from .conftest import tiny_config, tiny_model

PROMPT, NEW = 7, 10
# opt-llama with sliding-window layers 0 and 5 (window 3) around layers reading layer 4: its static cache holds
# StaticSlidingWindowLayers, which keep their length in a tensor and a Python int, their window rolling.
WINDOWED = dict(kv_sources=[0, 4, 4, 4, 4, 5], sliding_window_layers=[0, 5], sliding_window=3, num_encoders=12)


@pytest.fixture(params=["test_tiny_opt.json", "llama_tiny.json"], ids=["opt-llama", "llama"])
def model(request):
    overrides = (
        {}
        if request.param == "test_tiny_opt.json"
        else {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "vocab_size": 256}
    )
    return tiny_model(tiny_config(request.param, **overrides))


def left_padded_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(3, PROMPT)`` prompts and their padding mask: row 0 is left-padded by 2, row 2 by 5 tokens."""
    ids = torch.randint(3, vocab_size, (3, PROMPT))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("num_beams", [1, 3])
def test_static_matches_dynamic_greedy(model, num_beams):
    ids, mask = left_padded_batch(model.config.vocab_size)
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
        num_beams=num_beams,
        pad_token_id=0,
    )
    dynamic = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(static, dynamic)


def test_static_sampling_runs(model):
    ids, mask = left_padded_batch(model.config.vocab_size)
    out = model.generate(
        ids,
        attention_mask=mask,
        cache_implementation="static",
        do_sample=True,
        top_k=20,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        pad_token_id=0,
    )
    assert out.shape == (3, PROMPT + NEW)


def test_decode_step_compiles_fullgraph_without_recompiling(model):
    """The decode forward as generate calls it (masks precomputed, static cache) traces as one graph, once."""
    assert_decode_step_compiles_once(model)


def test_packed_decode_step_compiles_fullgraph(monkeypatch):
    """LCKV_FLASH_ATTN's packed GQA decode attention (forced on the CPU) keeps the decode step one graph."""
    import sys

    from models.kernels import KernelSelection
    from models.kernels.flags import FLASH_ATTN

    monkeypatch.setitem(sys.modules, "flash_attn", None)  # as on the GPU machine: SDPA route
    with monkeypatch.context() as cuda:  # CUDA faked only while selecting kernels, not while compiling
        cuda.setattr(torch.cuda, "is_available", lambda: True)
        selection = KernelSelection.from_environ({FLASH_ATTN: "1"})
    # Decoding takes the packed path whenever the fast attention is on (tests/test_kernels.py counts the calls).
    assert selection.causal_attention is not None
    assert_decode_step_compiles_once(tiny_model(tiny_config(), kernel_selection=selection))


def test_packed_sdpa_compiled_decode_reads_gqa_kv_unexpanded(model, monkeypatch):
    """Inside a compiled decode step transformers' SDPA expands GQA KVs (repeat_kv); "sdpa_packed_gqa" does not,
    for opt-llama and Llama alike, and it generates the same tokens."""
    from transformers.integrations import sdpa_attention

    original = sdpa_attention.repeat_kv

    def repeat_kv_outside_compile(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
        if torch.compiler.is_compiling():
            raise RuntimeError("repeat_kv inside the compiled decode step")
        return original(hidden_states, n_rep)

    monkeypatch.setattr(sdpa_attention, "repeat_kv", repeat_kv_outside_compile)
    ids, mask = left_padded_batch(model.config.vocab_size)
    kwargs = dict(
        attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, cache_implementation="static"
    )
    stock = tiny_model(model.config, attn_implementation="sdpa")
    with pytest.raises(Exception, match="repeat_kv inside the compiled decode step"):
        assert_decode_step_compiles_once(stock)
    packed = tiny_model(model.config, attn_implementation=PACKED_SDPA)
    assert_decode_step_compiles_once(packed)
    assert torch.equal(packed.generate(ids, **kwargs), stock.generate(ids, **kwargs))


def test_chunked_prefill_into_static_cache_matches_generate(model):
    """Prefilling 2 sequences at a time into one StaticCache, then generate: the tokens of a plain generate."""
    ids = torch.randint(3, model.config.vocab_size, (5, PROMPT))
    kwargs = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    expected = model.generate(ids, **kwargs)
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + NEW)
    prefill_in_chunks(model, ids[:, :-1], cache, chunk=2)
    assert cache.get_seq_length() == PROMPT - 1
    assert torch.equal(model.generate(ids, cache=cache, **kwargs), expected)
    with pytest.raises(ValueError, match="chunk: 0; allowed values are integers >= 1"):
        prefill_in_chunks(model, ids, cache, chunk=0)


def assert_rewound_cache_generates_as_a_new_one(model) -> None:
    """``set_cached_length(cache, 0)`` on a cache holding another prompt's KVs: generation from it equals generation
    from a new cache (the timing tools reuse one cache this way), every layer reporting the length it was set to."""
    ids, other = (torch.randint(3, model.config.vocab_size, (2, PROMPT)) for _ in range(2))
    kwargs = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, cache=StaticCache(config=model.config, max_cache_len=PROMPT + NEW), **kwargs)
        cache = StaticCache(config=model.config, max_cache_len=PROMPT + NEW)
        model.generate(other, cache=cache, **kwargs)
        assert set_cached_length(cache, 2) is cache
        assert {int(layer.get_seq_length()) for layer in cache.layers if isinstance(layer, StaticLayer)} == {2}
        set_cached_length(cache, 0)
        assert model.generate(ids, cache=cache, **kwargs).equal(expected)


def test_a_rewound_static_cache_generates_as_a_new_one(model):
    assert_rewound_cache_generates_as_a_new_one(model)


def test_a_rewound_sliding_window_cache_generates_as_a_new_one():
    model = tiny_model(tiny_config(**WINDOWED))
    layers = StaticCache(config=model.config, max_cache_len=8).layers
    assert any(isinstance(layer, StaticSlidingWindowLayer) for layer in layers)
    assert_rewound_cache_generates_as_a_new_one(model)


def test_static_slots_of_kept_kvs():
    assert static_slots(16, 7, 7) == slice(0, 7)  # a full layer keeps every token: the first slots
    assert static_slots(3, 2, 2) == slice(0, 2)  # a window not yet exceeded: the same
    assert static_slots(3, 2, 7) == slice(1, 3)  # past the window: the last window - 1 slots


@pytest.mark.parametrize("prompt", [3, 4, PROMPT], ids=["within-window", "window", "past-window"])
def test_chunked_prefill_of_sliding_window_layers(prompt):
    """A window layer's per-chunk dynamic cache keeps its last window - 1 KVs; in the static cache they go where its
    rolling layout expects them: the next token's logits and the greedy tokens are a whole-batch prefill's, for
    prompts within, at and past the window (prefilled: the prompt without its last token)."""
    model = tiny_model(tiny_config(**WINDOWED))
    ids = torch.randint(3, model.config.vocab_size, (5, prompt))
    kwargs = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = StaticCache(config=model.config, max_cache_len=PROMPT + NEW)
        model(ids[:, :-1], cache=reference)
        cache = StaticCache(config=model.config, max_cache_len=PROMPT + NEW)
        prefill_in_chunks(model, ids[:, :-1], cache, chunk=2)
        torch.testing.assert_close(
            model(ids[:, -1:], cache=cache).logits, model(ids[:, -1:], cache=reference).logits, rtol=0, atol=1e-5
        )
        set_cached_length(cache, 0)
        prefill_in_chunks(model, ids[:, :-1], cache, chunk=2)
        assert model.generate(ids, cache=cache, **kwargs).equal(model.generate(ids, **kwargs))


def assert_decode_step_compiles_once(model) -> None:
    ids, mask = left_padded_batch(model.config.vocab_size)
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + 4)
    torch._dynamo.reset()
    counter = CompileCounter()
    step = torch.compile(model.forward, fullgraph=True, backend=counter, dynamic=False)
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
        for _ in range(3):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position_ids = mask.cumsum(-1)[:, -1:] - 1
            inputs = model.prepare_inputs_for_generation(
                ids[:, -1:], cache=cache, attention_mask=mask, position_ids=position_ids
            )
            step(**inputs)
    assert counter.frame_count == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_static_matches_dynamic_on_gpu(model):
    model = model.cuda()
    ids, mask = (t.cuda() for t in left_padded_batch(model.config.vocab_size))
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    dynamic = model.generate(ids, **kwargs)
    torch._dynamo.reset()
    compiled = model.generate(ids, cache_implementation="static", **kwargs)  # auto-compiles the decode step on CUDA
    assert torch.equal(compiled, dynamic)
