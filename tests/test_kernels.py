"""Env-flag kernels: flag parsing, fallbacks, the selection a model keeps, the strict mask as a shifted causal
attention, fused vs plain (GPU)."""

import dataclasses
import json
import sys

import pytest
import torch

from models import kernels
from models.kernels import FLAGS, STRICT_CAUSAL, KernelSelection, missing_reason
from models.kernels.attention import sdpa_causal_attention, strict_causal_attention
from models.kernels.flags import FLASH_ATTN, FUSED_CROSSENTROPY
from models.kernels.plain import PlainRMSNorm, PlainSwiGLUMLP, plain_apply_rotary_pos_emb
from models.masks import build_masks

from .conftest import tiny_config, tiny_model

ALL_ON = dict.fromkeys(FLAGS, "1")
ALL_OFF = dict.fromkeys(FLAGS, "0")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def no_fast_packages(monkeypatch):
    """Make liger-kernel and flash-attn unimportable, as on a CPU install, even where they are installed."""
    for name in ("liger_kernel", "flash_attn"):
        monkeypatch.setitem(sys.modules, name, None)
    for module in ("rms_norm", "rotary", "swiglu", "cross_entropy", "flash_attention"):
        monkeypatch.delitem(sys.modules, f"models.kernels.{module}", raising=False)


def fallback_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "models.kernels.flags"]


def train_step(config, environ, seed=0, dtype=torch.float32, device="cpu", batch=None):
    """Build the model with the kernels of ``environ``'s flags, one forward + backward in train mode.

    Returns the loss, the logits (None under the fused loss) and the parameter gradients by name.
    """
    from transformers import AutoModelForCausalLM

    selection = KernelSelection.from_environ(environ)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config, dtype=dtype, attn_implementation="sdpa", kernel_selection=selection
    )
    model = model.to(device).train()
    if batch is None:
        batch = torch.randint(3, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    batch = batch.to(device)
    out = model(input_ids=batch, labels=batch)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out.loss.detach(), None if out.logits is None else out.logits.detach(), grads


# ---- flags -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", FLAGS)
def test_flag_values(flag):
    assert kernels.flag_enabled(flag, {flag: "1"})
    assert not kernels.flag_enabled(flag, {flag: "0"})
    assert not kernels.flag_enabled(flag, {})


@pytest.mark.parametrize("value", ["2", "true", "on", "", " 1"])
def test_bad_flag_value_is_one_line_error(value):
    with pytest.raises(ValueError, match=rf"^{FUSED_CROSSENTROPY}=.*allowed values are 1 \(on\) and 0 or unset") as err:
        KernelSelection.from_environ({FUSED_CROSSENTROPY: value})
    assert "\n" not in str(err.value)


def test_flags_off_select_plain_kernels(caplog):
    selection = KernelSelection.from_environ(ALL_OFF)
    assert selection.rms_norm is PlainRMSNorm and selection.swiglu_mlp is PlainSwiGLUMLP
    assert selection.apply_rotary_pos_emb is plain_apply_rotary_pos_emb
    assert selection.fused_linear_cross_entropy is None and selection.causal_attention is None
    assert not selection.strict_as_causal
    assert dataclasses.replace(selection, split_kv=None) == KernelSelection()  # the defaults are the plain path
    assert fallback_lines(caplog) == []


def test_without_cuda_every_flag_warns_once_and_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    selection = KernelSelection.from_environ(ALL_ON)
    lines = fallback_lines(caplog)
    assert sorted(line.split("=")[0] for line in lines) == sorted(FLAGS)
    assert all("=1 falls back: CUDA is not available; using " in line and "\n" not in line for line in lines)
    assert selection.rms_norm is PlainRMSNorm and selection.causal_attention is None


def test_without_packages_flags_warn_and_attention_uses_sdpa(monkeypatch, caplog, no_fast_packages):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    selection = KernelSelection.from_environ(ALL_ON)
    lines = fallback_lines(caplog)
    assert len(lines) == len(FLAGS)
    assert sum("liger_kernel is not installed" in line for line in lines) == len(FLAGS) - 1
    assert any(line.startswith(f"{FLASH_ATTN}=1") and "flash_attn is not installed" in line for line in lines)
    assert selection.rms_norm is PlainRMSNorm and selection.fused_linear_cross_entropy is None
    assert selection.causal_attention is sdpa_causal_attention and selection.strict_as_causal


def test_a_fallback_names_what_is_missing():
    """A kernel package not installed, or (a name under this package's root: the model runs from a checkpoint's
    bundled code, as ``transformers_modules.<checkpoint>.kernels`` there) the kernel modules not bundled."""
    assert missing_reason("liger_kernel.ops.rms_norm") == "liger_kernel is not installed (see requirements-gpu.txt)"
    assert "not in a checkpoint's bundled code" in missing_reason("models.kernels.rms_norm")


def test_fallback_is_bit_identical_to_flags_off(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = tiny_config()
    loss_off, logits_off, grads_off = train_step(config, ALL_OFF)
    loss_on, logits_on, grads_on = train_step(config, ALL_ON)
    assert torch.equal(loss_on, loss_off) and torch.equal(logits_on, logits_off)
    assert all(torch.equal(grads_on[name], grads_off[name]) for name in grads_off)


# ---- strict mask as a shifted causal attention (CPU, fp32) ---------------------------------------------------


def dense_strict_attention(module, query, key, value):
    """The model's flags-off path: SDPA with a dense ``kv < q`` mask, rows without keys zeroed afterwards."""
    from models.kernels.attention import configured_attention

    length = query.shape[2]
    mask = torch.ones(length, length, dtype=torch.bool).tril(-1)[None, None]
    out, _ = configured_attention("sdpa")(module, query, key, value, mask, dropout=0.0, scaling=module.scaling)
    return out * (torch.arange(length) > 0).to(out.dtype)[None, :, None, None]


def strict_attention_inputs(length: int, device: str = "cpu", dtype=torch.float32):
    """A condensed layer of the tiny config (GQA, strict mask) and random queries / keys / values."""
    from models.modeling_opt_llama import OptLlamaAttention

    config = tiny_config()
    module = OptLlamaAttention(config, layer_idx=1, kernel_selection=KernelSelection())
    assert module.is_strict
    heads = (config.num_attention_heads, config.num_key_value_heads, config.num_key_value_heads)
    return module, [torch.randn(2, h, length, config.head_dim, device=device, dtype=dtype) for h in heads]


def test_strict_shift_equals_dense_strict_mask_forward_and_grads():
    module, inputs = strict_attention_inputs(17)
    inputs = [x.requires_grad_() for x in inputs]
    grad_out = torch.randn(2, 17, *inputs[0].shape[1:2], inputs[0].shape[-1])
    results = []
    for attend in (
        lambda q, k, v: dense_strict_attention(module, q, k, v),
        lambda q, k, v: strict_causal_attention(sdpa_causal_attention, module, q, k, v, 0.0, module.scaling),
    ):
        out = attend(*inputs)
        results.append((out, torch.autograd.grad(out, inputs, grad_out)))
    (dense, dense_grads), (shift, shift_grads) = results
    assert torch.equal(shift[:, 0], torch.zeros_like(shift[:, 0]))
    torch.testing.assert_close(shift, dense, rtol=1e-5, atol=1e-6)
    for got, want in zip(shift_grads, dense_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_strict_marker_only_for_unpadded_prefill():
    config = tiny_config()
    config._attn_implementation = "sdpa"
    embeds, positions = torch.zeros(2, 6, config.hidden_size), torch.arange(6)[None]
    ones = torch.ones(2, 6, dtype=torch.long)

    def strict_mask(attention_mask, strict_as_causal=True):
        return build_masks(
            config, embeds, attention_mask, None, positions, {"strict": 4}, strict_as_causal=strict_as_causal
        )["strict"]

    assert strict_mask(None) is STRICT_CAUSAL and strict_mask(ones) is STRICT_CAUSAL
    assert isinstance(strict_mask(ones.index_fill(1, torch.tensor([0]), 0)), torch.Tensor)  # padded
    assert isinstance(strict_mask(None, strict_as_causal=False), torch.Tensor)  # a selection without the fast attention


def test_model_on_shifted_strict_path_equals_dense_path(monkeypatch, no_fast_packages):
    """LCKV_FLASH_ATTN's SDPA path (used on GPUs without flash-attn), forced on CPU: same loss and grads."""
    config = tiny_config()
    loss_dense, logits_dense, grads_dense = train_step(config, ALL_OFF)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []
    original = kernels.attention.strict_causal_attention
    monkeypatch.setattr(kernels.attention, "strict_causal_attention", lambda *a: calls.append(1) or original(*a))
    loss_fast, logits_fast, grads_fast = train_step(config, {FLASH_ATTN: "1"})
    assert calls, "the strict layers did not take the shifted path"
    torch.testing.assert_close(logits_fast, logits_dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_fast, loss_dense, rtol=1e-6, atol=1e-6)
    for name, grad in grads_dense.items():
        torch.testing.assert_close(grads_fast[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_model_keeps_the_kernels_it_was_built_with(monkeypatch, no_fast_packages):
    """The kernels are a per-model selection made when the model is built: turning LCKV_FLASH_ATTN on afterwards leaves
    a model built before on the dense strict path (norms, MLPs, masks and attention alike), a model built afterwards
    takes the shifted causal path, and a selection passed to the constructor wins over the environment."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the SDPA route of the flag, forced on the CPU
    monkeypatch.setenv(FLASH_ATTN, "0")
    config = tiny_config()
    before = tiny_model(config)
    monkeypatch.setenv(FLASH_ATTN, "1")
    after, explicit = tiny_model(config), tiny_model(config, kernel_selection=KernelSelection())
    assert (
        before.model.kernel_selection.causal_attention is None and explicit.model.kernel_selection == KernelSelection()
    )
    assert after.model.kernel_selection.causal_attention is sdpa_causal_attention
    for model in (before, after, explicit):
        selection = model.model.kernel_selection
        assert all(layer.self_attn.kernel_selection is selection for layer in model.model.layers)
        assert all(type(norm) is selection.rms_norm for norm in model.modules() if isinstance(norm, PlainRMSNorm))

    calls = []
    original = kernels.attention.strict_causal_attention
    monkeypatch.setattr(kernels.attention, "strict_causal_attention", lambda *a: calls.append(1) or original(*a))
    ids = torch.randint(3, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = {}
    with torch.no_grad():
        for name, model in (("before", before), ("explicit", explicit), ("after", after)):
            calls.clear()
            logits[name] = model(ids).logits
            shifted = sum(config.layer_strict)  # one shifted attention per strict layer run
            assert len(calls) >= shifted if name == "after" else calls == [], name
    assert torch.equal(logits["explicit"], logits["before"])
    torch.testing.assert_close(logits["after"], logits["before"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_packed_decode_attention_equals_expanded_gqa(mask_kind):
    """Decoding with grouped KV heads, read once: equal to transformers' eager attention on repeat_kv-expanded KV."""
    from models.kernels.attention import configured_attention, packed_decode_attention

    module, (query, key, value) = strict_attention_inputs(9)
    query = query[:, :, :1]
    visible = torch.rand(2, 1, 1, 9) > 0.3
    visible[..., 0] = True
    additive = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    mask = {"none": None, "bool": visible, "float": additive}[mask_kind]
    reference_mask = None if mask is None else additive
    expanded, _ = configured_attention("eager")(
        module, query, key, value, reference_mask, dropout=0.0, scaling=module.scaling
    )
    packed = packed_decode_attention(query, key, value, mask, 0.0, module.scaling)
    assert packed.shape == expanded.shape == (2, 1, query.shape[1], query.shape[-1])
    torch.testing.assert_close(packed, expanded, rtol=1e-5, atol=1e-6)


def test_model_decoding_on_packed_path_equals_plain(monkeypatch, no_fast_packages):
    """LCKV_FLASH_ATTN's decode path, forced on CPU: cached greedy generation gives the same tokens and scores."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(num_encoders=3)
    ids = torch.randint(3, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    calls = []
    original = kernels.attention.packed_decode_attention
    monkeypatch.setattr(kernels.attention, "packed_decode_attention", lambda *a: calls.append(1) or original(*a))
    outputs = []
    for environ in (ALL_OFF, {FLASH_ATTN: "1"}):
        cuda = environ is not ALL_OFF  # the fast path needs CUDA; faked on, the flag selects it on the CPU
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        selection = KernelSelection.from_environ(environ)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", kernel_selection=selection).eval()
        calls.clear()
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=0,
                output_scores=True,
                return_dict_in_generate=True,
            )
        outputs.append((out.sequences, torch.stack(out.scores), len(calls)))
    (plain_ids, plain_scores, plain_calls), (packed_ids, packed_scores, packed_calls) = outputs
    assert plain_calls == 0 and packed_calls == 5 * config.num_hidden_layers  # every layer of each decoding step
    assert torch.equal(packed_ids, plain_ids)
    torch.testing.assert_close(packed_scores, plain_scores, rtol=1e-5, atol=1e-5)


# ---- benchmark smoke test (CPU, tiny) --------------------------------------------------------------------


def test_fused_rotary_wrapper_stands_in_for_missing_queries_or_keys(monkeypatch):
    """liger rotates queries and keys together; the wrapper gives it a one-head stand-in for a missing one
    (condensed layers have no keys, a KV-only step has no queries) and drops it. A reference RoPE plays liger."""
    import types

    shapes = []

    def reference_liger_rope(q, k, cos, sin):
        shapes.append((q.shape[1], k.shape[1]))
        return plain_apply_rotary_pos_emb(q, k, cos, sin)

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_rope = reference_liger_rope
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", functional)
    monkeypatch.delitem(sys.modules, "models.kernels.rotary", raising=False)
    try:
        from models.kernels.rotary import fused_apply_rotary_pos_emb

        q, k, cos, sin = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
        for pair in [(q, k), (q, None), (None, k), (None, None)]:
            got, expected = fused_apply_rotary_pos_emb(*pair, cos, sin), plain_apply_rotary_pos_emb(*pair, cos, sin)
            for g, e in zip(got, expected, strict=True):
                assert (g is None and e is None) or torch.equal(g, e)
        assert shapes == [(4, 2), (4, 1), (1, 2)]
    finally:
        sys.modules.pop("models.kernels.rotary", None)  # imported against the stand-in liger: never reuse it


def test_bench_kernels_runs_on_cpu(tmp_path, monkeypatch):
    from bench.bench_kernels import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    main(
        [
            "--configs",
            "configs/test_tiny_opt.json",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--batch_size",
            "1",
            "--block_size",
            "16",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--output_dir",
            str(tmp_path),
        ]
    )
    results = json.loads((tmp_path / "kernels.json").read_text())["results"]
    assert [r["flags"] for r in results] == ["off", *FLAGS, "all"]
    assert all(r["tokens_per_s"] > 0 and r["kernels"]["rms_norm"] == "PlainRMSNorm" for r in results)


# ---- GPU: fused kernels vs the plain path, bf16 ------------------------------------------------------------


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()


def flat_grads(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.float().flatten() for _, g in sorted(grads.items())])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("config_name", ["test_tiny_opt.json", "llama_tiny_opt.json"])
@pytest.mark.parametrize("flag", [*FLAGS, "all"])
def test_gpu_fused_kernel_matches_plain(config_name, flag, caplog):
    """bf16 fused vs bf16 plain, both against fp32 plain: the fused path may not be much further from fp32."""
    config = tiny_config(config_name, max_position_embeddings=512)
    batch = torch.randint(3, config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0))
    on = ALL_ON if flag == "all" else {flag: "1"}
    reference = train_step(config, ALL_OFF, device="cuda", batch=batch)
    plain = train_step(config, ALL_OFF, dtype=torch.bfloat16, device="cuda", batch=batch)
    fused = train_step(config, on, dtype=torch.bfloat16, device="cuda", batch=batch)
    assert not [line for line in fallback_lines(caplog) if "liger" in line], "liger-kernel must be installed on GPU"
    for index, what in ((0, "loss"), (1, "logits")):
        if fused[index] is not None:
            budget = 2 * relative_error(plain[index], reference[index]) + 5e-3
            assert relative_error(fused[index], reference[index]) <= budget, what
    budget = 2 * relative_error(flat_grads(plain[2]), flat_grads(reference[2])) + 5e-3
    assert relative_error(flat_grads(fused[2]), flat_grads(reference[2])) <= budget, "grads"
    for name, grad in reference[2].items():  # each parameter too: a dropped gradient is 1 away, a small share of all
        budget = 2 * relative_error(plain[2][name], grad) + 5e-3
        assert relative_error(fused[2][name], grad) <= budget, name


@gpu
@pytest.mark.gpu
def test_gpu_strict_mask_on_fast_path():
    """flash-attn (or SDPA when it is missing) in bf16 vs the dense strict mask in fp32."""
    selection = KernelSelection.from_environ({FLASH_ATTN: "1"})
    config = tiny_config()
    config._attn_implementation = "sdpa"
    embeds = torch.zeros(2, 64, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    positions = torch.arange(64, device="cuda")[None]
    masks = build_masks(
        config, embeds, None, None, positions, {"strict": 4}, strict_as_causal=selection.strict_as_causal
    )
    assert masks["strict"] is STRICT_CAUSAL
    module, inputs = strict_attention_inputs(64, "cuda", torch.bfloat16)
    shift = strict_causal_attention(selection.causal_attention, module, *inputs, 0.0, module.scaling)
    dense = dense_strict_attention(module, *[x.float().cpu() for x in inputs])
    assert relative_error(shift.cpu(), dense) < 2e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("config_name", ["test_tiny_opt.json", "llama_tiny_opt.json"])
def test_gpu_training_steps_all_on_vs_off(config_name):
    """Three AdamW steps from the same weights on the same batch: with every kernel on, the loss falls as without
    (within bf16 tolerance). The gradients themselves are checked parameter by parameter, against fp32, in
    ``test_gpu_fused_kernel_matches_plain`` (bf16 weights near 1, the norms', cannot take a 1e-3 step, so the
    parameters' changes cannot be compared here)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(config_name, max_position_embeddings=512)
    batch = torch.randint(3, config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0)).cuda()
    losses = {}
    for name, environ in (("off", ALL_OFF), ("on", ALL_ON)):
        torch.manual_seed(0)
        model = (
            AutoModelForCausalLM.from_config(
                config,
                dtype=torch.bfloat16,
                attn_implementation="sdpa",
                kernel_selection=KernelSelection.from_environ(environ),
            )
            .cuda()
            .train()
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[name] = []
        for _ in range(3):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    assert losses["on"][-1] < losses["on"][0]
    torch.testing.assert_close(torch.tensor(losses["on"]), torch.tensor(losses["off"]), rtol=2e-2, atol=0)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_items_in_batch", [None, 100])
def test_gpu_fused_cross_entropy_matches_transformers_loss(num_items_in_batch):
    """Same shift, ignore_index and num_items_in_batch semantics as transformers' ForCausalLMLoss (fp32)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from models.kernels.cross_entropy import fused_linear_cross_entropy

    hidden = torch.randn(2, 64, 128, device="cuda", requires_grad=True)
    weight = torch.randn(1000, 128, device="cuda", requires_grad=True)
    labels = torch.randint(0, 1000, (2, 64), device="cuda").index_fill(1, torch.arange(5, device="cuda"), -100)
    fused = fused_linear_cross_entropy(hidden, weight, labels, num_items_in_batch=num_items_in_batch)
    plain = ForCausalLMLoss(hidden @ weight.T, labels, 1000, num_items_in_batch=num_items_in_batch)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)
    for got, want in zip(
        torch.autograd.grad(fused, (hidden, weight)), torch.autograd.grad(plain, (hidden, weight)), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
