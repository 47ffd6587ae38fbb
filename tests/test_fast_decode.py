"""The captured decode loop (models/fast_decode.py): exactly plain generate's tokens (greedy, seeded sampling, rows
ending early, an interval that does not divide the new tokens, left padding), for opt-llama, lckv-llama and Llama;
what it cannot capture runs plain generate; its two captured steps compile once."""

import logging

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import (
    CompileConfig,
    DynamicCache,
    EncoderDecoderCache,
    GenerationConfig,
    GenerationMixin,
    LlamaForCausalLM,
    StaticCache,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from models import LckvLlamaConfig
from models import fast_decode as fd
from models.fast_decode import (
    CHECKED_STEPS,
    enable_fast_decode,
    fast_sample,
    select_compile_options,
    stop_check_interval,
)

from .conftest import tiny_config, tiny_model

PROMPT, NEW, INTERVAL = 7, 11, 4  # 10 decode steps after the prefill's token: intervals of 4, 4 and 2
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
)
CONFIGS = {
    "opt-llama": lambda: tiny_config(),  # published layout string "0_1_1_1_2_0"
    "lckv-llama": lambda: LckvLlamaConfig(layer_types="0_4_4_4_4_5", forward_passes=3, backward_passes=2, **SHAPE),
    "llama": lambda: tiny_config("llama_tiny.json", **SHAPE),
}
SAMPLING = dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.7)


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    model = enable_fast_decode(tiny_model(CONFIGS[request.param]()))
    model.generation_config.stop_check_interval = INTERVAL
    return model


@pytest.fixture
def loops(monkeypatch) -> dict:
    """Counts the captured loops (``decode``) and plain generate's loops (``GenerationMixin._sample``) that ran."""
    ran = {"fast": 0, "plain": 0}
    decode, plain = fd.decode, GenerationMixin._sample

    def counted_decode(*args, **kwargs):
        ran["fast"] += 1
        return decode(*args, **kwargs)

    def counted_plain(*args, **kwargs):
        ran["plain"] += 1
        return plain(*args, **kwargs)

    monkeypatch.setattr(fd, "decode", counted_decode)
    monkeypatch.setattr(GenerationMixin, "_sample", counted_plain)
    return ran


def left_padded_batch(vocab_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(3, PROMPT)`` prompts and their padding mask: row 0 left-padded by 2 tokens, row 2 by 5."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab_size, (3, PROMPT), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


def generate(model, fast: bool, cache_len: int = PROMPT + NEW, **kwargs) -> tuple[object, torch.Tensor, int]:
    """One seeded generate on a fresh static cache: its output, the next random draw after it, the cache length."""
    model.generation_config.fast_decode = fast
    ids, mask = left_padded_batch(model.config.vocab_size)
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    torch.manual_seed(0)
    kwargs = dict(attention_mask=mask, cache=cache, max_new_tokens=NEW, pad_token_id=0) | kwargs
    out = model.generate(ids, **kwargs)
    return out, torch.rand(4), int(cache.get_seq_length())


def assert_same_as_plain(model, loops: dict, **kwargs) -> torch.Tensor:
    """The captured loop gives plain generate's sequences, leaves the random generator and the cache where plain
    generate leaves them, and did run; returns the sequences."""
    before = dict(loops)
    fast = generate(model, True, **kwargs)
    plain = generate(model, False, **kwargs)
    assert loops["fast"] == before["fast"] + 1 and loops["plain"] == before["plain"] + 1
    assert torch.equal(fast[0], plain[0])
    assert torch.equal(fast[1], plain[1]) and fast[2] == plain[2]
    return fast[0]


@pytest.mark.parametrize("decoding", [dict(do_sample=False), SAMPLING], ids=["greedy", "sampling"])
def test_same_tokens_as_plain_generate(model, loops, decoding):
    reference = generate(model, False, eos_token_id=None, **decoding)[0][:, PROMPT:]
    unused = min(set(range(3, 256)) - set(reference.flatten().tolist()))
    full = assert_same_as_plain(model, loops, eos_token_id=unused, **decoding)
    assert full.shape[1] == PROMPT + NEW
    # Row 0 stops at its third token (its pad tokens follow), the others go on unless they draw that token too.
    some = assert_same_as_plain(model, loops, eos_token_id=int(reference[0, 2]), **decoding)
    assert some.shape[1] == PROMPT + NEW and (some[0, PROMPT + 3 :] == 0).all()
    # Every row stops by its second token: the captured loop ran intervals past the end and undid them.
    ended = assert_same_as_plain(model, loops, eos_token_id=reference[:, 1].tolist(), **decoding)
    assert ended.shape[1] <= PROMPT + 2


@pytest.mark.parametrize("interval", [1, 3, 64])
def test_any_stop_check_interval(loops, interval):
    model = enable_fast_decode(tiny_model(CONFIGS["llama"]()))
    model.generation_config.stop_check_interval = interval
    reference = generate(model, False, eos_token_id=None, **SAMPLING)[0][:, PROMPT:]
    assert_same_as_plain(model, loops, eos_token_id=int(reference[1, 4]), min_new_tokens=3, **SAMPLING)
    assert_same_as_plain(model, loops, eos_token_id=reference[:, 5].tolist(), **SAMPLING)


@pytest.mark.parametrize(
    "setting",
    [
        dict(min_p=0.05),
        dict(typical_p=0.9),
        dict(epsilon_cutoff=3e-3),
        dict(eta_cutoff=3e-3),
        dict(min_length=PROMPT + 5),
        dict(temperature=1.5, top_k=5),
    ],
    ids=str,
)
def test_every_captured_processor(loops, setting):
    model = enable_fast_decode(tiny_model(CONFIGS["llama"]()))
    model.generation_config.stop_check_interval = INTERVAL
    reference = generate(model, False, eos_token_id=None, do_sample=True, **setting)[0][:, PROMPT:]
    assert_same_as_plain(model, loops, eos_token_id=reference[:, 2].tolist(), do_sample=True, **setting)


class Collector(BaseStreamer):
    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ends += 1


@pytest.mark.parametrize("ending", ["full", "early"])
def test_streamer_gets_what_plain_generate_streams(loops, ending):
    model = enable_fast_decode(tiny_model(CONFIGS["opt-llama"]()))
    model.generation_config.stop_check_interval = INTERVAL
    reference = generate(model, False, eos_token_id=None, do_sample=False)[0][:, PROMPT:]
    eos = reference[:, 3].tolist() if ending == "early" else None
    streamed = []
    for fast in (True, False):
        streamer = Collector()
        generate(model, fast, eos_token_id=eos, do_sample=False, streamer=streamer)
        streamed.append(streamer)
    assert loops == {"fast": 1, "plain": 2}
    fast, plain = streamed
    assert fast.ends == plain.ends == 1 and len(fast.puts) == len(plain.puts)  # the prompt, then each step's tokens
    assert len(plain.puts) <= 5 if eos else len(plain.puts) == NEW + 1
    assert all(torch.equal(a, b) for a, b in zip(fast.puts, plain.puts, strict=True))


def test_return_dict_gives_sequences_and_cache(loops):
    model = enable_fast_decode(tiny_model(CONFIGS["llama"]()))
    fast, _, fast_length = generate(model, True, return_dict_in_generate=True, eos_token_id=None)
    plain, _, plain_length = generate(model, False, return_dict_in_generate=True, eos_token_id=None)
    assert loops == {"fast": 1, "plain": 1}
    assert torch.equal(fast.sequences, plain.sequences) and fast.cache is not None and fast_length == plain_length


class NeverStop(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


WINDOWED = dict(kv_sources=[0, 4, 4, 4, 4, 5], sliding_window_layers=[0, 5], sliding_window=3, num_encoders=4)


@pytest.mark.parametrize(
    ("overrides", "kwargs", "reason"),
    [
        ({}, dict(repetition_penalty=1.3), "logits processor RepetitionPenaltyLogitsProcessor"),
        ({}, dict(return_dict_in_generate=True, output_scores=True), "output_scores"),
        ({}, dict(stopping_criteria=StoppingCriteriaList([NeverStop()])), "stopping criterion NeverStop"),
        ({}, dict(max_time=60.0), "stopping criterion MaxTimeCriteria"),
        (
            WINDOWED,
            {},
            "StaticCache with StaticSlidingWindowLayer layers (allowed: a static cache without sliding layers)",
        ),
        ({}, dict(cache=None), None),  # a dynamic cache: plain generate, nothing to say
    ],
    ids=["repetition_penalty", "output_scores", "stopping_criterion", "max_time", "window_cache", "dynamic_cache"],
)
def test_what_it_cannot_capture_runs_plain_generate(loops, caplog, overrides, kwargs, reason):
    model = enable_fast_decode(tiny_model(tiny_config(**overrides)))
    with caplog.at_level(logging.WARNING, logger=fd.__name__):
        fast = generate(model, True, do_sample=True, **kwargs)
    assert loops == {"fast": 0, "plain": 1}
    warnings = [r.getMessage() for r in caplog.records if r.name == fd.__name__]
    assert warnings == ([f"fast decoding falls back to generate's own loop: {reason}"] if reason else [])
    plain = generate(model, False, do_sample=True, **kwargs)
    assert torch.equal(getattr(fast[0], "sequences", fast[0]), getattr(plain[0], "sequences", plain[0]))


def test_custom_generate_callable_on_a_plain_llama(loops):
    llama = tiny_model(CONFIGS["llama"]())
    assert type(llama) is LlamaForCausalLM
    ids, mask = left_padded_batch()
    kwargs = dict(
        attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, cache_implementation="static", do_sample=False
    )
    assert torch.equal(llama.generate(ids, custom_generate=fast_sample, **kwargs), llama.generate(ids, **kwargs))
    assert loops == {"fast": 1, "plain": 1}
    with pytest.raises(
        ValueError,
        match="^custom_generate=fast_sample: generation mode beam_search; allowed are greedy search and sampling$",
    ):
        llama.generate(ids, custom_generate=fast_sample, num_beams=2, **kwargs)


def test_enable_fast_decode_keeps_the_class_identity():
    llama = tiny_model(CONFIGS["llama"]())
    fast = enable_fast_decode(llama)
    assert fast is llama and isinstance(fast, (LlamaForCausalLM, fd.FastDecodeMixin))
    assert type(fast).__name__ == "LlamaForCausalLM" and enable_fast_decode(fast).__class__ is type(fast)
    assert type(enable_fast_decode(tiny_model(CONFIGS["llama"]()))) is type(fast)  # one class per architecture


def test_an_offloaded_cache_decodes_without_compiling(model, caplog):
    # transformers would compile the forward over an offloaded static cache (the resident one shows the check would
    # pass), which crashed dynamo on the GPU; it decodes eagerly instead, saying so once when compiling was asked for.
    config = GenerationConfig(compile_config=CompileConfig())
    config.compile_config._compile_all_devices = True  # the CPU counts as compile-worthy hardware
    resident = StaticCache(config=model.config, max_cache_len=8)
    offloaded = StaticCache(config=model.config, max_cache_len=8, offloading=True)
    assert model._valid_auto_compile_criteria({"cache": resident}, config)
    fd.warn_compile_config_ignored.cache_clear()
    with caplog.at_level(logging.WARNING, logger=fd.__name__):
        for cache in (offloaded, EncoderDecoderCache(offloaded, DynamicCache())):
            assert not model._valid_auto_compile_criteria({"cache": cache}, config)
    assert caplog.text.count("offloaded cache decodes without compiling") == 1
    caplog.clear()
    fd.warn_compile_config_ignored.cache_clear()
    config.disable_compile = True  # nothing to say: no compiling was asked for
    with caplog.at_level(logging.WARNING, logger=fd.__name__):
        assert not model._valid_auto_compile_criteria({"cache": offloaded}, config)
    assert caplog.text == ""


def test_custom_generate_over_an_offloaded_cache_runs_plain_generate_uncompiled(monkeypatch):
    # A model without FastDecodeMixin has transformers' own compile check: fast_sample turns compiling off itself.
    llama = tiny_model(CONFIGS["llama"]())
    seen = []

    def plain(model, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs):
        seen.append((generation_config.disable_compile, fd.offloaded(kwargs["cache"])))
        return input_ids

    monkeypatch.setattr(GenerationMixin, "_sample", plain)
    cache = StaticCache(config=llama.config, max_cache_len=16, offloading=True)
    llama.generate(torch.ones(1, 3, dtype=torch.long), custom_generate=fast_sample, cache=cache, max_new_tokens=2)
    assert seen == [(True, True)]
    # The caller's generation config is left as it was (fast_sample falls back with a copy).
    monkeypatch.setattr(fd, "unsupported_reason", lambda *args: "an offloaded cache")  # no generate around it here
    config = GenerationConfig(max_new_tokens=2, pad_token_id=0)
    fast_sample(llama, torch.ones(1, 3, dtype=torch.long), None, StoppingCriteriaList(), config, cache=cache)
    assert seen[-1] == (True, True) and not config.disable_compile


def test_stop_check_interval_is_checked():
    config = LlamaForCausalLM(CONFIGS["llama"]()).generation_config
    assert stop_check_interval(config) == fd.DEFAULT_STOP_CHECK_INTERVAL
    config.stop_check_interval = 0
    with pytest.raises(ValueError, match="^stop_check_interval: 0; allowed are integers >= 1$"):
        stop_check_interval(config)


def test_select_step_compiles_as_the_forward_with_the_same_random_draws():
    assert select_compile_options(CompileConfig()) == ("inductor", {"triton.cudagraphs": True, "fallback_random": True})
    assert select_compile_options(CompileConfig(mode=None, options={"max_autotune": True})) == (
        "inductor",
        {"max_autotune": True, "fallback_random": True},
    )
    assert select_compile_options(CompileConfig(backend="eager")) == ("eager", {})


@pytest.mark.parametrize("name", ["opt-llama", "llama"])
def test_captured_steps_compile_once(loops, name):
    """Through dynamo (the eager backend stands in for inductor on the CPU): one forward graph and one token-selection
    graph, whatever the prompt length, max_new_tokens or min_new_tokens, and still plain generate's tokens."""
    model = enable_fast_decode(tiny_model(CONFIGS[name]()))
    model.generation_config.stop_check_interval = INTERVAL
    compile_config = CompileConfig(backend="eager", fullgraph=True)
    compile_config._compile_all_devices = True  # generate compiles on CUDA only unless told
    torch._dynamo.reset()
    counters.clear()
    ids, mask = left_padded_batch()
    states = []
    for prompt, new in ((PROMPT, NEW), (PROMPT - 2, NEW + 2), (PROMPT, 3)):
        outputs = []
        for fast in (True, False):
            model.generation_config.fast_decode = fast
            model.generation_config.compile_config = compile_config if fast else None
            torch.manual_seed(0)
            outputs.append(
                model.generate(
                    ids[:, -prompt:],
                    attention_mask=mask[:, -prompt:],
                    max_new_tokens=new,
                    min_new_tokens=new // 2,
                    pad_token_id=0,
                    eos_token_id=None,
                    cache=StaticCache(config=model.config, max_cache_len=PROMPT + NEW + 2),
                    **SAMPLING,
                )
            )
        assert torch.equal(*outputs)
        states.append(model._fast_decode_state)
    assert loops == {"fast": 3, "plain": 3} and counters["stats"]["unique_graphs"] == 2
    assert states[1] is states[0] and states[2] is states[0]  # buffers at the same addresses: captured steps replay
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["opt-llama", "llama"])
def test_guard_checks_skipped_after_the_first_interval(loops, monkeypatch, name):
    """The compiled calls skip dynamo's guard checks from the second stop-check interval on (and after CHECKED_STEPS
    calls), and still run the graph of their shapes: batches 2, 3 and 2 again (two graphs of each call, told apart by
    the checks dynamo keeps) give plain generate's tokens. A stance the caller set holds; skip_guard_checks=False
    checks every call."""
    model = enable_fast_decode(tiny_model(CONFIGS[name]()))
    model.generation_config.stop_check_interval = INTERVAL
    compile_config = CompileConfig(backend="eager", fullgraph=True)
    compile_config._compile_all_devices = True  # generate compiles on CUDA only unless told
    stances = []  # dynamo's stance at each compiled forward call
    compiled_call = model.get_compiled_call

    def recording_compiled_call(config):
        call = compiled_call(config)
        return lambda **inputs: stances.append(torch._dynamo.eval_frame._stance) or call(**inputs)

    def skipped() -> list[bool]:
        return [stance.skip_guard_eval_unsafe for stance in stances]

    monkeypatch.setattr(model, "get_compiled_call", recording_compiled_call)
    torch._dynamo.reset()
    ids, mask = left_padded_batch()
    for rows in (slice(0, 2), slice(0, 3), slice(1, 3)):
        outputs = []
        for fast in (True, False):
            model.generation_config.fast_decode = fast
            model.generation_config.compile_config = compile_config if fast else None
            stances.clear()
            torch.manual_seed(0)
            outputs.append(
                model.generate(
                    ids[rows],
                    attention_mask=mask[rows],
                    max_new_tokens=NEW,
                    pad_token_id=0,
                    eos_token_id=None,
                    cache=StaticCache(config=model.config, max_cache_len=PROMPT + NEW),
                    **SAMPLING,
                )
            )
            if fast:  # the first interval's steps checked, the later ones skipped
                assert skipped() == [False] * INTERVAL + [True] * (NEW - 1 - INTERVAL)
        assert torch.equal(*outputs)
    model.generation_config.fast_decode, model.generation_config.compile_config = True, compile_config

    def generate_two_rows() -> None:
        stances.clear()
        cache = StaticCache(config=model.config, max_cache_len=PROMPT + NEW)
        model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=NEW, pad_token_id=0, cache=cache, **SAMPLING)

    model.generation_config.stop_check_interval = 1  # the interval alone would check only the first call
    generate_two_rows()
    assert skipped() == [False] * CHECKED_STEPS + [True] * (NEW - 1 - CHECKED_STEPS)
    with torch.compiler.set_stance("force_eager"):  # a stance the caller set holds inside the loop
        generate_two_rows()
    assert {stance.stance for stance in stances} == {"force_eager"} and not any(skipped())
    model.generation_config.skip_guard_checks = False  # every call checked
    generate_two_rows()
    assert skipped() == [False] * (NEW - 1)
    torch._dynamo.reset()


def test_latency_tool_decodes_both_models_with_the_captured_loop(loops, tmp_path):
    import sys

    from .conftest import CONFIGS as CONFIG_DIR

    sys.path.insert(0, str(CONFIG_DIR.parent))
    import test_latency

    llama = tmp_path / "tiny_llama.json"
    llama.write_text(CONFIGS["llama"]().to_json_string())
    argv = [
        "--configs",
        str(llama),
        str(CONFIG_DIR / "test_tiny_opt.json"),
        "--prompt_len",
        "4",
        "--gen_len",
        "3",
        "--batches",
        "1",
        "--cache",
        "static",
        "--device",
        "cpu",
        "--output_dir",
        str(tmp_path),
    ]
    out = test_latency.main(argv)
    assert loops == {"fast": 4, "plain": 0}  # each model: the untimed warm-up and the timed run
    assert all(r["runs"][0]["step_ms"] > 0 for r in out["models"].values())


@pytest.mark.parametrize("config", ["opt.json", "llama.json"])
def test_run_generation_static_cache_streams_from_the_captured_loop(loops, tmp_path, capsys, config):
    import run_generation

    from .test_generation import make_tiny_files

    files = make_tiny_files(tmp_path)
    argv = [
        "--config",
        str(files / config),
        "--tokenizer",
        str(files / "tok"),
        "--prompt",
        "ROMEO: But soft",
        "--max_new_tokens",
        "12",
        "--ignore_eos",
    ]
    static = run_generation.run(run_generation.parse_args([*argv, "--static_cache"]))
    assert loops == {"fast": 1, "plain": 0}
    assert static["cache"]["text"][0] in capsys.readouterr().out  # streamed, in bursts
    assert static["cache"]["text"] == run_generation.run(run_generation.parse_args(argv))["cache"]["text"]


def test_models_that_prepare_their_own_inputs_run_plain_generate():
    class OwnInputs(LlamaForCausalLM):
        def prepare_inputs_for_generation(self, *args, **kwargs):
            return super().prepare_inputs_for_generation(*args, **kwargs)

    class OwnMasks(LlamaForCausalLM):
        def create_masks_for_generate(self, *args, **kwargs):
            raise AssertionError("not called: the forward builds its masks")

    config = CONFIGS["llama"]()
    assert (
        fd.model_hooks_reason(LlamaForCausalLM(config)) is None
        and fd.model_hooks_reason(tiny_model(tiny_config())) is None
    )
    assert fd.model_hooks_reason(OwnInputs(config)) == "the model's own prepare_inputs_for_generation"
    assert fd.model_hooks_reason(OwnMasks(config)) == "the model's own create_masks_for_generate"
