"""The sink + window streaming cache (models/cache_streaming.py) and run_streaming.py."""

import json

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DummyLayer

import run_generation
import run_streaming
from models.cache_streaming import SinkWindowCache
from tools.generation import load_config_or_checkpoint

from .conftest import CONFIGS, tiny_config, tiny_model
from .numerics import FLOAT64_ATOL
from .test_generation import make_tiny_files

LAYOUTS = {
    "lckv": dict(layer_types="0_1_1_1_2_0"),
    "two_targets": dict(kv_sources=[0, 2, 2, 5, 5, 5]),
    "llama": dict(layer_types="0_0_0_0_0_0"),  # every layer standard: a Llama
}
LIMIT = 16  # max_position_embeddings of the long-stream tests, kept small for CPU


def random_ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length))


def decode(model, ids: torch.Tensor, cache, prefill: int) -> torch.Tensor:
    """Prefill ``prefill`` tokens, then feed the rest one by one; logits ``(B, T, vocab)``."""
    with torch.no_grad():
        logits = [model(ids[:, :prefill], cache=cache, use_cache=True).logits]
        logits += [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(prefill, ids.shape[1])]
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_window_larger_than_text_equals_ordinary_cached_decoding(layout):
    model = tiny_model(tiny_config(**LAYOUTS[layout]))
    ids = random_ids(2, 20)
    streamed = decode(model, ids, SinkWindowCache(model.config, window_size=60, num_sink_tokens=4), prefill=7)
    ordinary = decode(model, ids, DynamicCache(config=model.config), prefill=7)
    assert torch.equal(streamed, ordinary)
    with torch.no_grad():
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(
            model.generate(ids, cache=SinkWindowCache(model.config, window_size=60), **kwargs),
            model.generate(ids, **kwargs),
        )


@pytest.mark.parametrize("num_sink_tokens", [0, 2])
def test_evicted_keys_are_rerotated_to_their_slots(num_sink_tokens):
    """One standard layer: its KVs depend only on token and position, so after evictions the streamed logits must
    equal a fresh forward over the kept tokens (sinks + window) at positions 0, 1, ... (float64)."""
    model = tiny_model(tiny_config(num_hidden_layers=1, layer_types="0", target_layer=0), dtype=torch.float64)
    window = 5
    ids = random_ids(1, 24)
    cache = SinkWindowCache(model.config, window_size=window, num_sink_tokens=num_sink_tokens)
    streamed = decode(model, ids, cache, prefill=3)
    assert cache.kv_layers[0].shifted  # evictions happened
    for t in range(num_sink_tokens + window, ids.shape[1]):
        kept = torch.cat([ids[:, :num_sink_tokens], ids[:, t - window + 1 : t + 1]], dim=1)
        with torch.no_grad():
            fresh = model(kept).logits[:, -1]
        torch.testing.assert_close(streamed[:, t], fresh, atol=FLOAT64_ATOL, rtol=0)


@pytest.mark.parametrize("layout", ["lckv", "llama"])
def test_cache_stays_within_sinks_plus_window_past_5x_the_limit(layout):
    model = tiny_model(tiny_config(max_position_embeddings=LIMIT, **LAYOUTS[layout]))
    sinks, window = 4, 8
    cache = SinkWindowCache(model.config, window_size=window, num_sink_tokens=sinks)
    assert [isinstance(layer, DummyLayer) for layer in cache.layers] == [
        m == "reuse" for m in model.config.kv_sharing_modes
    ]
    ids = random_ids(2, 5 * LIMIT)
    with torch.no_grad():
        model(ids[:, :window], cache=cache, use_cache=True)
        for t in range(window, ids.shape[1]):
            logits = model(ids[:, t : t + 1], cache=cache, use_cache=True).logits
            assert torch.isfinite(logits).all()
            assert max(layer.keys.shape[-2] for layer in cache.kv_layers) <= sinks + window
            assert all(layer.values.shape[-2] == layer.keys.shape[-2] for layer in cache.kv_layers)
    assert cache.get_seq_length() == sinks + window
    # generate (sampling, beams) with a chunked long prompt, well past the limit
    for kwargs in (dict(do_sample=True, top_k=20), dict(num_beams=2)):
        cache = SinkWindowCache(model.config, window_size=window, num_sink_tokens=sinks)
        with torch.no_grad():
            out = model.generate(
                ids[:, :20],
                cache=cache,
                prefill_chunk_size=window,
                max_new_tokens=2 * LIMIT,
                min_new_tokens=2 * LIMIT,
                pad_token_id=0,
                **kwargs,
            )
        assert out.shape[1] == 20 + 2 * LIMIT
        assert cache.get_seq_length() == sinks + window


def test_without_streaming_past_the_limit_is_an_error():
    model = tiny_model(tiny_config(max_position_embeddings=LIMIT))
    with torch.no_grad(), pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(random_ids(1, LIMIT + 1))
    with torch.no_grad(), pytest.raises(ValueError, match="max_position_embeddings=16"):
        model.generate(random_ids(1, LIMIT - 2), max_new_tokens=5, min_new_tokens=5, pad_token_id=0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(window_size=0), "window_size"),
        (dict(window_size=4, num_sink_tokens=-1), "num_sink_tokens"),
        (dict(window_size=LIMIT), "window_size"),
    ],
)
def test_bad_cache_arguments(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        SinkWindowCache(tiny_config(max_position_embeddings=LIMIT), **kwargs)


def test_too_many_new_tokens_for_a_full_cache_and_padding_are_errors():
    model = tiny_model(tiny_config())
    cache = SinkWindowCache(model.config, window_size=4, num_sink_tokens=2)
    with torch.no_grad():
        model(random_ids(1, 6), cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="prefill_chunk_size=4"):
            model(random_ids(1, 5), cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="unpadded"):
            model(random_ids(1, 1), attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1, 1]]), cache=cache, use_cache=True)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return make_tiny_files(tmp_path_factory.mktemp("streaming"), max_position_embeddings=LIMIT)


def cli(files, *args: str) -> list[str]:
    return ["--config", str(files / "opt.json"), "--tokenizer", str(files / "tok"), "--quiet", *args]


def test_run_streaming_perplexity_and_generation_past_5x_the_limit(tiny_files, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    run_streaming.main(
        cli(
            tiny_files,
            "--mode",
            "perplexity",
            "--text_file",
            str(tiny_files / "text.txt"),
            "--num_tokens",
            str(5 * LIMIT),
            "--window_size",
            "8",
            "--output_json",
            str(out),
        )
    )
    result = json.loads(out.read_text())
    assert result["num_tokens"] == 5 * LIMIT and result["max_cache_tokens"] == 4 + 8
    assert 1 < result["ppl"] < float("inf")
    assert [b["start"] for b in result["ppl_by_position"]] == list(range(0, 5 * LIMIT - 1, LIMIT))
    result = run_streaming.run(
        run_streaming.parse_args(
            cli(
                tiny_files,
                "--prompt",
                "ROMEO: But soft, " * 6,
                "--max_new_tokens",
                str(3 * LIMIT),
                "--ignore_eos",
                "--window_size",
                "6",
            )
        )
    )
    assert result["new_tokens"] == 3 * LIMIT and result["max_cache_tokens"] == 4 + 6


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--window_size", "0", "--prompt", "x"],
            "run_streaming.py: error: --window_size: 0; allowed values are integers >= 1",
        ),
        (
            ["--num_sink_tokens", "-1", "--prompt", "x"],
            "run_streaming.py: error: --num_sink_tokens: -1; allowed values are integers >= 0",
        ),
        (["--prompt", "  "], "run_streaming.py: error: prompt: empty; give some text"),
        (
            ["--mode", "perplexity", "--text_file", "missing.txt"],
            "run_streaming.py: error: --text_file: missing.txt does not exist; allowed is an existing file",
        ),
    ],
)
def test_run_streaming_bad_input_is_a_one_line_error(tiny_files, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        run_streaming.main(cli(tiny_files, *args))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == message


def test_run_streaming_loads_a_llama_checkpoint(tiny_files, tmp_path):
    """A Llama checkpoint streams as an all-standard opt-llama with its own weights: with a window longer than the
    text, the streamed perplexity is the Llama's own."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    config = load_config_or_checkpoint(run_generation.parse_args(["--config", str(tiny_files / "llama.json")]))
    config.vocab_size = 300
    torch.manual_seed(0)
    llama = LlamaForCausalLM(config).eval()
    llama.save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_files / "tok")
    tokenizer.save_pretrained(tmp_path)
    out = tmp_path / "ppl.json"
    run_streaming.main(
        [
            "--model_name_or_path",
            str(tmp_path),
            "--mode",
            "perplexity",
            "--text_file",
            str(tiny_files / "text.txt"),
            "--num_tokens",
            str(LIMIT),
            "--window_size",
            "12",
            "--output_json",
            str(out),
            "--quiet",
        ]
    )
    ids = tokenizer((tiny_files / "text.txt").read_text(), return_tensors="pt").input_ids[:, :LIMIT]
    with torch.no_grad():
        expected = torch.exp(llama(ids, labels=ids).loss).item()
    assert json.loads(out.read_text())["ppl"] == pytest.approx(expected, rel=1e-5)


def test_bench_streaming_runs_on_cpu(tmp_path):
    """The benchmark end to end at toy size: trains both models briefly, streams, writes JSON and the plot."""
    from bench.bench_streaming import main

    main(
        [
            "--config",
            str(CONFIGS / "test_tiny_opt.json"),
            "--max_position_embeddings",
            "16",
            "--train_steps",
            "2",
            "--batch_size",
            "2",
            "--windows",
            "4",
            "12",
            "--num_streams",
            "1",
            "--ppl_factor",
            "2",
            "--length_factor",
            "5",
            "--output_dir",
            str(tmp_path),
        ]
    )
    result = json.loads((tmp_path / "streaming.json").read_text())
    runs = {(run["model"], run["window_size"]): run for run in result["runs"]}
    assert set(runs) == {("lckv", 4), ("lckv", 12), ("llama", 4), ("llama", 12)}
    assert runs["lckv", 12]["num_tokens"] == 5 * 16 and runs["lckv", 4]["num_tokens"] == 2 * 16
    assert all(run["max_cache_tokens"] == 4 + window for (_, window), run in runs.items())
    assert runs["lckv", 12]["cache_bytes"] * 2 == runs["llama", 12]["cache_bytes"]  # 3 of 6 layers hold KVs
    assert (tmp_path / "streaming.png").stat().st_size > 0
