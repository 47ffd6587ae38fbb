"""The equivalence oracles of docs/design.md section 7: random weights, computed in float64 and compared at
``FLOAT64_ATOL`` (tests/numerics.py), so that they compare the computations, not one machine's float32 rounding; the key
ones run with one thread and with 3."""

from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaForCausalLM
from transformers.models.llama import modeling_llama

from models.config_loading import llama_twin
from models.kernels.plain import PlainRMSNorm, PlainRotaryEmbedding, plain_eager_attention
from tools.measure import kv_bytes

from .conftest import tiny_config, tiny_model
from .numerics import FLOAT64_ATOL

ATOL = FLOAT64_ATOL
model64 = partial(tiny_model, dtype=torch.float64)
BACKENDS = ["eager", "sdpa", "flex_attention", "sdpa_packed_gqa"]
# LCKV (paper layout), more warmup layers, and a general source list with two targets.
LAYOUTS = {
    "lckv": dict(layer_types="0_1_1_1_2_0"),
    "warmup": dict(layer_types="0_0_1_2_0_0", target_layer=3),
    "two_targets": dict(kv_sources=[0, 2, 2, 5, 5, 5]),
}


@pytest.fixture(autouse=True)
def _flex_attention_uncompiled(monkeypatch):
    """flex_attention runs uncompiled here (torch's reference kernel and BlockMask builder): the oracles check the
    model's masks, not inductor's CPU build of transformers' compiled ones, whose C++ for a padded one-token
    decoding mask fails to compile in torch 2.13."""
    from torch.nn.attention import flex_attention as torch_flex
    from transformers import masking_utils
    from transformers.integrations import flex_attention as transformers_flex

    monkeypatch.setattr(transformers_flex.WrappedFlexAttention, "__call__", lambda self: torch_flex.flex_attention)
    monkeypatch.setattr(
        masking_utils,
        "create_block_mask",
        lambda *args, _compile=False, **kwargs: torch_flex.create_block_mask(*args, **kwargs),
    )


def sequential_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Ground truth: decode one token at a time through the cache. ``(B, T)`` -> ``(B, T, vocab)``."""
    cache = DynamicCache(config=model.config)
    logits = []
    for t in range(input_ids.shape[1]):
        mask = attention_mask[:, : t + 1] if attention_mask is not None else None
        with torch.no_grad():
            out = model(input_ids[:, t : t + 1], attention_mask=mask, cache=cache, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def random_ids(batch: int, length: int, vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length))


def llama_in_float64(llama: LlamaForCausalLM, monkeypatch) -> LlamaForCausalLM:
    """transformers' Llama computing in float64 throughout: its RMSNorm, rotary tables and eager softmax keep float32
    steps, so, test-side, they become this project's (bitwise Llama's below float64: tests/test_precision.py)."""
    for parent in list(llama.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, modeling_llama.LlamaRMSNorm):
                norm = PlainRMSNorm(child.weight.shape[0], eps=child.variance_epsilon)
                norm.weight = child.weight
                setattr(parent, name, norm)
    llama.model.rotary_emb = PlainRotaryEmbedding(config=llama.config)
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", plain_eager_attention)
    return llama.double()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_standard_layers_equal_llama(backend, num_threads, monkeypatch):
    """Oracle 1: every layer standard => logits equal transformers' Llama with the same weights."""
    config = tiny_config(layer_types="0_0_0_0_0_0")
    ours = model64(config, backend)
    llama = LlamaForCausalLM(llama_twin(config)).eval()
    llama.config._attn_implementation = backend
    llama.load_state_dict(ours.state_dict(), strict=True)
    llama = llama_in_float64(llama, monkeypatch)
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        expected = llama(ids, attention_mask=mask).logits
        actual = ours(ids, attention_mask=mask).logits
    torch.testing.assert_close(actual[0], expected[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(actual[1, 3:], expected[1, 3:], atol=ATOL, rtol=0)


def test_llama_state_dict_loads_and_condensed_layers_have_no_kv():
    """Parameter names follow Llama: a Llama state dict loads; condensed layers just lack k_proj/v_proj."""
    config = tiny_config()
    ours = tiny_model(config)
    llama = LlamaForCausalLM(llama_twin(config))
    result = ours.load_state_dict(llama.state_dict(), strict=False)
    assert result.missing_keys == []
    condensed = [i for i, src in enumerate(config.layer_kv_sources) if src != i]
    expected_unused = {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in condensed for p in "kv"}
    assert set(result.unexpected_keys) == expected_unused
    kv_params = 2 * config.hidden_size * config.num_key_value_heads * config.head_dim
    n_ours = sum(p.numel() for p in ours.parameters())
    n_llama = sum(p.numel() for p in llama.parameters())
    assert n_llama - n_ours == len(condensed) * kv_params


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_parallel_equals_sequential(layout, backend, num_threads):
    """Oracle 2: enough iterations (num_encoders + 1 >= T) => parallel logits equal token-by-token decoding."""
    length = 9
    model = model64(tiny_config(num_encoders=length - 1, num_trained_encoders=1, **LAYOUTS[layout]), backend)
    ids = random_ids(2, length)
    with torch.no_grad():
        parallel = model(ids).logits
    torch.testing.assert_close(parallel, sequential_logits(model, ids), atol=ATOL, rtol=0)
    # ... and too few iterations do differ after the exact prefix: the oracle can fail.
    model.config.num_encoders = 2
    with torch.no_grad():
        short = model(ids).logits
    torch.testing.assert_close(short[:, :3], parallel[:, :3], atol=ATOL, rtol=0)
    assert (short[:, 3:] - parallel[:, 3:]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequential_forward_option_and_left_padding(backend, num_threads):
    """config.sequential_forward gives the exact semantics; padded rows equal the same prompt unpadded. A padding
    position attends to no key: its output has no meaning (eager attention averages whatever keys the step's mask
    spans), so only real tokens are compared."""
    model = model64(tiny_config(num_encoders=1), backend)
    ids = random_ids(2, 8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    model.config.sequential_forward = True
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        alone = model(ids[:1, 3:]).logits
    expected = sequential_logits(model, ids, mask)
    torch.testing.assert_close(padded[0, 3:], expected[0, 3:], atol=ATOL, rtol=0)
    torch.testing.assert_close(padded[1], expected[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(padded[0, 3:], alone[0], atol=ATOL, rtol=0)
    assert torch.isfinite(padded).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_cache_forward_equals_prefill_then_decode(layout, num_threads):
    """Sharing is model logic: a full no-cache forward equals chunked prefill + decoding with the cache."""
    length = 10
    model = model64(tiny_config(num_encoders=length - 1, **LAYOUTS[layout]))
    ids = random_ids(2, length)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :4], cache=cache, use_cache=True).logits
        second = model(ids[:, 4:7], cache=cache, use_cache=True).logits
        rest = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(7, length)]
    torch.testing.assert_close(torch.cat([first, second, *rest], dim=1), full, atol=ATOL, rtol=0)


GENERATE_MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=20, temperature=0.8, num_return_sequences=2),
    "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2),
}


# Without a cache, generate recomputes the whole sequence each step. The cached path prefills the prompt
# by iterations and decodes exactly, so the two agree whenever the no-cache forward is exact too: when the
# iterations cover the sequence, or with the token-by-token `sequential_forward` at any length.
EXACT_NO_CACHE = {
    "iterations_cover": dict(num_encoders=13),
    "sequential_forward": dict(num_encoders=1, sequential_forward=True),
}


@pytest.mark.parametrize("exact", EXACT_NO_CACHE)
@pytest.mark.parametrize("mode", GENERATE_MODES)
def test_generate_with_and_without_cache(mode, exact):
    """Oracle 3: generate with the cache gives the same tokens as recomputing without it."""
    model = model64(tiny_config(**EXACT_NO_CACHE[exact]))
    ids = random_ids(2, 6)
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(1)
        with torch.no_grad():
            outs.append(
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=8,
                    use_cache=use_cache,
                    pad_token_id=0,
                    **GENERATE_MODES[mode],
                )
            )
    assert outs[0].shape[1] == 14
    assert torch.equal(outs[0], outs[1])


def test_greedy_decoding_equals_sequential_recomputation():
    """Oracle 3, against the ground truth: each greedy token is the argmax of the sequential computation."""
    model = model64(tiny_config(num_encoders=20))
    ids = random_ids(1, 5)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for t in range(5, out.shape[1]):
        assert sequential_logits(model, out[:, :t])[0, -1].argmax().item() == out[0, t].item()


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_left_padded_batch_equals_each_prompt_alone(mode):
    model = model64(tiny_config(num_encoders=12))
    prompts = [random_ids(1, 7)[0], random_ids(1, 4)[0]]
    kwargs = dict(
        max_new_tokens=6,
        pad_token_id=0,
        **{k: v for k, v in GENERATE_MODES[mode].items() if k != "num_return_sequences"},
    )
    batch = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, 7 - len(prompt) :] = prompt
        mask[row, 7 - len(prompt) :] = 1
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, **kwargs)
        for row, prompt in enumerate(prompts):
            alone = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kwargs)
            assert torch.equal(together[row, 7:], alone[0, len(prompt) :])


def test_save_and_auto_from_pretrained_round_trip(tmp_path):
    """Oracle 4: save / from_pretrained round trip gives identical logits; Auto classes resolve opt-llama."""
    model = tiny_model(tiny_config())
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(loaded).__name__ == "OptLlamaForCausalLM"
    ids = random_ids(2, 10)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def prefill_then_decode(model, ids: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over ``ids[:, :prompt_len]`` filling a cache, then one forward per remaining token: the logits of
    each, ``(B, prompt_len, V)`` and ``(B, T - prompt_len, V)``."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        prefill = model(ids[:, :prompt_len], cache=cache, use_cache=True).logits
        decode = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(prompt_len, ids.shape[1])]
    return prefill, torch.cat(decode, dim=1)


def test_prefill_then_decode_is_exact_while_the_prefill_is(capsys):
    """Oracle 5: an iterative prefill is exact for its first num_encoders + 1 positions. Decoding after a prefill that
    short equals the token-by-token model; after a longer one the prefill's later positions and the decoding that reads
    their KVs both differ (the oracle tells them apart)."""
    num_encoders, new_tokens = 3, 8
    exact = num_encoders + 1
    model = model64(tiny_config(num_encoders=num_encoders))
    ids = random_ids(1, 40 + new_tokens)
    truth = sequential_logits(model, ids)
    prefill, decode = prefill_then_decode(model, ids[:, : exact + new_tokens], exact)
    torch.testing.assert_close(prefill, truth[:, :exact], atol=ATOL, rtol=0)
    torch.testing.assert_close(decode, truth[:, exact : exact + new_tokens], atol=ATOL, rtol=0)

    prefill, decode = prefill_then_decode(model, ids, 40)
    torch.testing.assert_close(prefill[:, :exact], truth[:, :exact], atol=ATOL, rtol=0)
    gap_prefill = (prefill[:, exact:] - truth[:, exact:40]).abs().max().item()
    gap_decode = (decode - truth[:, 40:]).abs().max().item()
    agree = (decode.argmax(-1) == truth[:, 40:].argmax(-1)).float().mean().item()
    with capsys.disabled():
        print(
            f"\n[oracle 5] exact for {exact} positions; max |logit gap| of a 40-token prefill after that "
            f"{gap_prefill:.3g}, of the decoding after it {gap_decode:.3g}, greedy agreement {agree:.0%}"
        )
    assert gap_prefill > 1e-6 and gap_decode > 1e-6


def test_cache_holds_only_kv_layers():
    """The cache after generating holds n_kv_layers / num_hidden_layers of a same-shape Llama's bytes."""
    config = tiny_config()
    model = tiny_model(config)
    llama = LlamaForCausalLM(llama_twin(config)).eval()
    ids = random_ids(2, 6)
    caches = []
    for m in (model, llama):
        with torch.no_grad():
            out = m.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
        caches.append(kv_bytes(out.cache))
    assert caches[0] * config.num_hidden_layers == caches[1] * config.num_kv_layers
    per_token = 2 * config.num_kv_layers * config.num_key_value_heads * config.head_dim * 4
    assert caches[0] == 2 * (6 + 5 - 1) * per_token  # the last sampled token is never fed back


# Every layer reads itself or a layer below: cross-layer (CLA) pairs, and YOCO-style (the top half reads one
# middle layer). No layer reads from above, so there is no cyclic block and nothing to iterate.
BELOW_LAYOUTS = {"cla": [0, 0, 2, 2, 4, 4], "yoco": [0, 1, 2, 2, 2, 2]}


@pytest.mark.parametrize("layout", BELOW_LAYOUTS)
def test_layouts_reading_from_below_are_exact_and_cache_only_their_sources(layout):
    kv_sources = BELOW_LAYOUTS[layout]
    config = tiny_config(kv_sources=kv_sources, num_encoders=1)
    model = model64(config)
    assert not model.model.plan.is_iterative
    ids = random_ids(2, 9)
    with torch.no_grad():
        parallel = model(ids).logits
        cache = DynamicCache(config=config)
        model(ids, cache=cache, use_cache=True)
    torch.testing.assert_close(parallel, sequential_logits(model, ids), atol=ATOL, rtol=0)
    holding = [i for i, layer in enumerate(cache.layers) if getattr(layer, "keys", None) is not None]
    assert holding == sorted(set(kv_sources))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def test_gradient_reaches_target_kv_through_condensed_layers():
    """Oracle 7: the target's k_proj/v_proj get gradient through the condensed layers only with >= 2 trained
    iterations."""
    ids = random_ids(2, 8)
    grads = {}
    for trained in (0, 1):
        model = tiny_model(tiny_config(num_encoders=4, num_trained_encoders=trained)).train()
        target = model.config.layer_kv_sources[1]
        attn = model.model.layers[target].self_attn
        with torch.no_grad():
            attn.o_proj.weight.zero_()  # the target's own attention no longer reaches the loss
        model(ids, labels=ids).loss.backward()
        grads[trained] = (attn.k_proj.weight.grad.abs().sum().item(), attn.v_proj.weight.grad.abs().sum().item())
    assert grads[0] == (0.0, 0.0)
    assert min(grads[1]) > 0


def test_untrained_iterations_build_no_graph():
    model = tiny_model(tiny_config(num_encoders=6, num_trained_encoders=2)).train()
    flags = []
    model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: flags.append(o.requires_grad))
    ids = random_ids(1, 5)
    model(ids, labels=ids).loss.backward()
    assert flags == [False] * 4 + [True] * 3


@pytest.mark.parametrize("training", [False, True], ids=["prefill", "training"])
def test_target_computes_only_its_kvs_before_the_last_iteration(training):
    """Before the last iteration only the block's top layer (the target) KVs feed the next one: its queries,
    attention and MLP run once per forward, its k_proj once per iteration."""
    model = tiny_model(tiny_config(num_encoders=6)).train(training)  # 0_1_1_1_2_0: target 4, 7 iterations
    calls = {"q_proj": 0, "k_proj": 0, "mlp": 0}
    target = model.model.layers[4]
    for name, module in [("q_proj", target.self_attn.q_proj), ("k_proj", target.self_attn.k_proj), ("mlp", target.mlp)]:
        module.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    ids = random_ids(2, 10)
    with torch.set_grad_enabled(training):
        out = model(ids, labels=ids)
    if training:
        out.loss.backward()
    assert calls == {"q_proj": 1, "k_proj": 7, "mlp": 1}


def test_train_kv_adds_kv_loss():
    ids = random_ids(2, 8)
    losses = {}
    for train_kv in (False, True):
        model = model64(tiny_config(train_kv=train_kv, num_encoders=3)).train()
        out = model(ids, labels=ids)
        losses[train_kv] = out
    assert losses[False].kv_loss is None
    kv_loss = losses[True].kv_loss
    assert kv_loss is not None and kv_loss.item() > 0
    torch.testing.assert_close(losses[True].loss, losses[False].loss + kv_loss, atol=ATOL, rtol=0)
    with torch.no_grad():  # evaluation: perplexity comes from the LM loss alone
        evaluated = model64(tiny_config(train_kv=True, num_encoders=3))(ids, labels=ids)
    assert evaluated.kv_loss is None
    torch.testing.assert_close(
        evaluated.loss, model64(tiny_config(num_encoders=3))(ids, labels=ids).loss.detach(), atol=ATOL, rtol=0
    )


def test_gradient_checkpointing_matches():
    ids = random_ids(2, 8)
    grads = []
    for checkpointing in (False, True):
        model = model64(tiny_config(num_encoders=3)).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append((loss.item(), model.model.layers[4].self_attn.k_proj.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=ATOL)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_without_keys_outputs_zero_not_nan(backend):
    """Token 0 sees no key under the strict mask: its condensed-layer attention output is exactly zero."""
    model = tiny_model(tiny_config(), backend)
    outputs = []
    model.model.layers[1].self_attn.o_proj.register_forward_hook(lambda m, i, o: outputs.append(i[0]))
    ids = random_ids(2, 5)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    assert torch.isfinite(logits).all()
    assert outputs[-1][0, 0].abs().max() == 0 and outputs[-1][1, 2].abs().max() == 0
    assert outputs[-1][0, 1].abs().max() > 0


def test_logits_to_keep_and_position_limit():
    model = model64(tiny_config())
    ids = random_ids(1, 10)
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    assert last.shape[1] == 1
    torch.testing.assert_close(last[:, -1], full[:, -1], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="^sequence length: 129 tokens exceed max_position_embeddings=128"):
        model(random_ids(1, 129))


def test_transformers_flash_attention_2_is_refused():
    """transformers' flash mask path would drop the strict mask; LCKV_FLASH_ATTN is the supported route."""
    with pytest.raises(ValueError, match="does not support Flash Attention 2"):
        AutoModelForCausalLM.from_config(tiny_config(), attn_implementation="flash_attention_2")


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_training_batch_equals_each_sequence_alone(side):
    """Padding-aware fine-tuning: a padded batch's loss and gradients equal those of each sequence alone."""
    model = model64(tiny_config(num_encoders=3, num_trained_encoders=1)).train()
    long, short = random_ids(1, 9)[0], random_ids(1, 5)[0]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    ids[0], mask[0] = long, 1
    cols = slice(0, 5) if side == "right" else slice(4, 9)
    ids[1, cols], mask[1, cols] = short, 1
    # A token counts when it and the position predicting it are real: with left padding the first real token
    # would otherwise be predicted from a pad.
    predicted = (mask == 1) & (torch.nn.functional.pad(mask, (1, 0))[:, :-1] == 1)
    predicted[:, 0] = mask[:, 0] == 1
    labels = ids.masked_fill(~predicted, -100)

    def loss_and_grad(*batch):
        model.zero_grad()
        loss = model(batch[0], attention_mask=batch[1], labels=batch[2]).loss
        loss.backward()
        return loss.detach(), model.model.layers[4].self_attn.k_proj.weight.grad.clone()

    padded_loss, padded_grad = loss_and_grad(ids, mask, labels)
    parts = [loss_and_grad(seq[None], torch.ones(1, len(seq), dtype=torch.long), seq[None]) for seq in (long, short)]
    weights = (len(long) - 1, len(short) - 1)  # predicted tokens per sequence
    expected_loss = sum(w * loss for w, (loss, _) in zip(weights, parts, strict=True)) / sum(weights)
    expected_grad = sum(w * grad for w, (_, grad) in zip(weights, parts, strict=True)) / sum(weights)
    torch.testing.assert_close(padded_loss, expected_loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(padded_grad, expected_grad, atol=ATOL, rtol=0)
