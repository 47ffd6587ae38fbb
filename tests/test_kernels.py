"""Env-flag kernels: flag parsing, fallbacks, the selection a model keeps, the strict mask as a shifted causal
attention, fused vs plain (GPU)."""

import dataclasses
import json
import math
import sys
from collections.abc import Callable

import pytest
import torch
from torch.nn import functional as F
from torch.utils._pytree import tree_map

from models import kernels
from models.kernels import FLAGS, STRICT_CAUSAL, KernelSelection, missing_reason
from models.kernels.attention import sdpa_causal_attention, strict_causal_attention
from models.kernels.flags import FLASH_ATTN, FUSED_CROSSENTROPY
from models.kernels.plain import PlainRMSNorm, PlainSwiGLUMLP, plain_apply_rotary_pos_emb
from models.masks import build_masks

from .conftest import tiny_config, tiny_model
from .numerics import (
    FLOAT32_UNIT_ROUNDOFF,
    SAFETY_FACTOR,
    SEEDS,
    RoundoffPerturbation,
    float32_error_bound,
    max_difference,
    rounds,
)
from .test_decode_attention import Float64Attention, assert_within_bound, attention_bound, float64_attention

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


# Ops a training step rounds in beyond those ``numerics.rounds`` covers (a forward's): the loss's log-softmax and NLL,
# their gradients, the attention's and the embedding's gradients (one perturbation each, as numerics.py's fused ops)
TRAINING_ROUNDING_OPS = {
    "_log_softmax",
    "_log_softmax_backward_data",
    "nll_loss_forward",
    "nll_loss_backward",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
    "embedding_dense_backward",
}


class TrainingRoundoffPerturbation(RoundoffPerturbation):
    """``RoundoffPerturbation`` also of a training step's loss and backward ops (``TRAINING_ROUNDING_OPS``)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if rounds(func) or func._overloadpacket.__name__ in TRAINING_ROUNDING_OPS:
            return tree_map(self._perturb, result)
        return result


def float32_error_bounds(compute: Callable[[], list[torch.Tensor]]) -> list[float]:
    """``numerics.float32_error_bound`` of each tensor that ``compute()`` (a float64 forward and backward) returns, from
    the same perturbed runs: ``SAFETY_FACTOR`` times its largest change when every rounding op's result, the
    backward's included, moves by float32's unit roundoff."""
    exact = compute()
    changes = [0.0] * len(exact)
    for seed in SEEDS:
        with TrainingRoundoffPerturbation(seed):
            perturbed = compute()
        changes = [max(c, max_difference(p, e)) for c, p, e in zip(changes, perturbed, exact, strict=True)]
    return [SAFETY_FACTOR * change for change in changes]


def fallback_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "models.kernels.flags"]


def train_step(config, environ, seed=0, dtype=torch.float32, device="cpu", batch=None):
    """Build the model with the kernels of ``environ``'s flags, one forward + backward in train mode.

    Returns the loss, the logits (None under the fused loss) and the parameter gradients by name.
    """
    from transformers import AutoModelForCausalLM

    selection = KernelSelection.from_environ(environ)
    torch.manual_seed(seed)
    exact = dtype == torch.float64  # the float32 model's weights exactly: drawn in float32, then upcast
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32 if exact else dtype, attn_implementation="sdpa", kernel_selection=selection
    )
    model = (model.double() if exact else model).to(device).train()
    if batch is None:
        batch = torch.randint(3, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    batch = batch.to(device)
    if exact:  # the same loss in float64: transformers' casts the logits to float32
        out = model(input_ids=batch)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
    else:
        out = model(input_ids=batch, labels=batch)
        loss = out.loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return loss.detach(), None if out.logits is None else out.logits.detach(), grads


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

# ATen's CPU SDPA rescales no weight by a new running max at these lengths: its flash kernel takes the keys in blocks
# of 512, its math path runs one softmax
SDPA_RESCALES = 0


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


def attention_grad_bounds(attention: Float64Attention, grad_out: torch.Tensor, kv_heads: int) -> list[torch.Tensor]:
    """Bounds on |float32 gradient - exact| of SDPA's query ``(B, Hq, L, D)``, key and value ``(B, Hkv, S, D)`` (these
    summed over each KV head's query heads) for the output gradient ``grad_out`` ``(B, L, Hq, D)``, first order in u.
    Each gradient is a sum of products: its error is at most u times a term's rounding count times the same sum of
    absolute values, plus the factors' own errors (the weights', the forward output's) carried through the products."""
    u = FLOAT32_UNIT_ROUNDOFF
    query, key, value, visible, scores, weights, out, weight_error, out_error = attention
    grad_out = grad_out.double().transpose(1, 2)
    heads, queries, dim = query.shape[1:]
    scale = dim**-0.5
    count = visible.sum(-1, keepdim=True)  # T: the keys a query sees
    # The weights as the backward reads them (the forward's, or exp(s - logsumexp) again), relative: a weight's own
    # error, the normaliser's (the weights' mean error, its T-term sum, the division) and the logsumexp's (its log and
    # addition: |logsumexp| + log T; the exponent's subtraction, at most log T beyond top - s).
    log_sum_exp = scores.logsumexp(-1, keepdim=True)
    normaliser = (weights * weight_error).sum(-1, keepdim=True) + u * (count + 1 + 2 * count.log() + log_sum_exp.abs())
    weight_error = torch.where(visible, weight_error + normaliser, 0.0)
    # dP = dO v^T: dot products of D terms.
    grad_weights = grad_out @ value.transpose(-1, -2)
    grad_weights_error = u * dim * (grad_out.abs() @ value.abs().transpose(-1, -2))
    # Delta = sum_d dO out (a flash kernel: D terms and the forward output's error) or sum_j P dP (the softmax's
    # backward: T terms, the weights' and dP's errors): the larger.
    delta = (grad_out * out).sum(-1, keepdim=True)
    delta_error = torch.maximum(
        u * dim * (grad_out * out).abs().sum(-1, keepdim=True) + (grad_out.abs() * out_error).sum(-1, keepdim=True),
        (weights * ((weight_error + u * count) * grad_weights.abs() + grad_weights_error)).sum(-1, keepdim=True),
    )
    # dS = P (dP - Delta), with the subtraction's and the product's roundings.
    centred = grad_weights - delta
    grad_scores = weights * centred
    grad_scores_error = weights * ((weight_error + 2 * u) * centred.abs() + grad_weights_error + delta_error)
    # dQ = scale dS k: T terms, their products and the scaling. dK = scale dS^T q and dV = P^T dO: L terms per query
    # head, summed over the G query heads of a KV head: G * L terms.
    grad_query = scale * (grad_scores_error @ key.abs() + u * (count + 2) * (grad_scores.abs() @ key.abs()))
    terms = heads // kv_heads * queries
    grad_key = scale * (
        grad_scores_error.transpose(-1, -2) @ query.abs()
        + u * (terms + 2) * (grad_scores.abs().transpose(-1, -2) @ query.abs())
    )
    grad_value = (weights * weight_error).transpose(-1, -2) @ grad_out.abs()
    grad_value = grad_value + u * (terms + 1) * (weights.transpose(-1, -2) @ grad_out.abs())
    return [grad_query, *(bound.unflatten(1, (kv_heads, -1)).sum(2) for bound in (grad_key, grad_value))]


def test_strict_shift_equals_dense_strict_mask_forward_and_grads():
    """The shifted causal attention in float32 against the dense strict mask in float64 (inputs upcast), output and
    gradients each within its float32 error bound; row 0 (no visible key) exactly zero."""
    module, inputs = strict_attention_inputs(17)
    inputs = [x.requires_grad_() for x in inputs]
    grad_out = torch.randn(2, 17, *inputs[0].shape[1:2], inputs[0].shape[-1])
    shift = strict_causal_attention(sdpa_causal_attention, module, *inputs, 0.0, module.scaling)
    shift_grads = torch.autograd.grad(shift, inputs, grad_out)
    exact_inputs = [x.detach().double().requires_grad_() for x in inputs]
    dense = dense_strict_attention(module, *exact_inputs)
    dense_grads = torch.autograd.grad(dense, exact_inputs, grad_out.double())
    assert torch.equal(shift[:, 0], torch.zeros_like(shift[:, 0]))
    strict = torch.ones(17, 17, dtype=torch.bool).tril(-1)
    attention = float64_attention(*(x.detach() for x in inputs), strict, SDPA_RESCALES)
    bounds = [attention.bound.transpose(1, 2), *attention_grad_bounds(attention, grad_out, inputs[1].shape[1])]
    results = zip((shift, *shift_grads), (dense, *dense_grads), bounds, strict=True)
    for what, (got, want, bound) in zip(("output", "query grad", "key grad", "value grad"), results, strict=True):
        assert_within_bound(got, want, bound, what)


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
    """LCKV_FLASH_ATTN's SDPA path (used on GPUs without flash-attn), forced on CPU, in float32: the loss, logits and
    each parameter's gradient of the dense path in float64, each within its float32 error bound."""
    config = tiny_config()

    def dense_float64():
        loss, logits, grads = train_step(config, ALL_OFF, dtype=torch.float64)
        return [loss, logits, *grads.values()]

    exact, bounds = dense_float64(), float32_error_bounds(dense_float64)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []
    original = kernels.attention.strict_causal_attention
    monkeypatch.setattr(kernels.attention, "strict_causal_attention", lambda *a: calls.append(1) or original(*a))
    loss_fast, logits_fast, grads_fast = train_step(config, {FLASH_ATTN: "1"})
    assert calls, "the strict layers did not take the shifted path"
    fast = {"loss": loss_fast, "logits": logits_fast, **grads_fast}
    for (name, got), want, bound in zip(fast.items(), exact, bounds, strict=True):
        assert got.dtype == torch.float32 and max_difference(got, want) <= bound, (name, bound)


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
    # the shifted path in float32 against the dense one in float64 (the same weights), within float32's error bound
    exact = tiny_model(config, dtype=torch.float64, kernel_selection=KernelSelection())
    with torch.no_grad():
        bound = float32_error_bound(lambda: exact(ids).logits)
        assert max_difference(logits["after"], exact(ids).logits) <= bound


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_packed_decode_attention_equals_expanded_gqa(mask_kind):
    """Decoding with grouped KV heads, read once: within its float32 bound of transformers' eager attention on
    repeat_kv-expanded KV in float64."""
    from models.kernels.attention import configured_attention, packed_decode_attention

    module, (query, key, value) = strict_attention_inputs(9)
    query = query[:, :, :1]
    visible = torch.rand(2, 1, 1, 9) > 0.3
    visible[..., 0] = True
    additive = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    mask = {"none": None, "bool": visible, "float": additive}[mask_kind]
    reference_mask = None if mask is None else additive
    exact_inputs = [x.double() for x in (query, key, value)]  # the reference in float64
    expanded, _ = configured_attention("eager")(
        module, *exact_inputs, reference_mask, dropout=0.0, scaling=module.scaling
    )
    packed = packed_decode_attention(query, key, value, mask, 0.0, module.scaling)
    assert packed.shape == expanded.shape == (2, 1, query.shape[1], query.shape[-1])
    bound = attention_bound(query, key, value, None if mask is None else visible, SDPA_RESCALES)
    assert_within_bound(packed, expanded, bound)


def test_model_decoding_on_packed_path_equals_plain(monkeypatch, no_fast_packages):
    """LCKV_FLASH_ATTN's decode path, forced on CPU: cached greedy generation in float32 gives the tokens of the plain
    path in float64, and its scores within their float32 error bound."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(num_encoders=3)
    ids = torch.randint(3, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    calls = []
    original = kernels.attention.packed_decode_attention
    monkeypatch.setattr(kernels.attention, "packed_decode_attention", lambda *a: calls.append(1) or original(*a))

    def generate(model):
        """Greedy tokens and each step's next-token logits in the model's dtype (generate's scores are float32)."""
        steps = []
        hook = model.register_forward_hook(lambda module, args, out: steps.append(out.logits[:, -1]))
        try:
            with torch.no_grad():
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0
                )
        finally:
            hook.remove()
        return out, torch.stack(steps)

    outputs = []
    for environ in (ALL_OFF, {FLASH_ATTN: "1"}):
        cuda = environ is not ALL_OFF  # the fast path needs CUDA; faked on, the flag selects it on the CPU
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        selection = KernelSelection.from_environ(environ)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", kernel_selection=selection).eval()
        if not cuda:
            model = model.double()  # the plain path in float64 (the float32 model's weights): the reference
            bound = float32_error_bound(lambda model=model: generate(model)[1])
        calls.clear()
        outputs.append((*generate(model), len(calls)))
    (plain_ids, plain_scores, plain_calls), (packed_ids, packed_scores, packed_calls) = outputs
    assert plain_calls == 0 and packed_calls == 5 * config.num_hidden_layers  # every layer of each decoding step
    assert torch.equal(packed_ids, plain_ids) and packed_scores.shape == (6, *ids.shape[:1], config.vocab_size)
    assert packed_scores.dtype == torch.float32 and max_difference(packed_scores, plain_scores) <= bound


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
    assert relative_error(shift.cpu(), dense) < 2e-2  # bf16 inputs and output (2**-8 relative each), a few roundings


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
    # bf16 weights and activations: two kernel sets' losses differ by a few bf16 roundings (2**-8 relative each)
    torch.testing.assert_close(torch.tensor(losses["on"]), torch.tensor(losses["off"]), rtol=2e-2, atol=0)


# CUDA's float32 exp, in units of u: expf within 2 ulps (CUDA's programming guide), the PTX ex2.approx of Triton's
# exp2 within 2**-22.5 relative
CUDA_EXP_ERROR = 4


def causal_lm_loss_bounds(hidden, weight, labels, num_items_in_batch) -> tuple[list, list]:
    """transformers' ``ForCausalLMLoss`` of ``hidden @ weight.T`` (labels shifted, -100 ignored, the mean, or the sum
    over ``num_items_in_batch``) in float64 with its gradients (ForCausalLMLoss itself casts the logits to float32),
    and bounds on the errors of a float32 computation of them, first order in u; counts of roundings in units of u."""
    u = FLOAT32_UNIT_ROUNDOFF
    tokens = hidden.detach().double().flatten(0, 1).requires_grad_()  # (N, H)
    matrix = weight.detach().double().requires_grad_()  # (V, H)
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:].flatten()
    kept = targets != -100
    count = kept.sum() if num_items_in_batch is None else num_items_in_batch
    logits = tokens @ matrix.T
    loss = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / count
    grads = torch.autograd.grad(loss, (tokens, matrix))
    tokens, matrix, logits = tokens.detach(), matrix.detach(), logits.detach()
    vocab, width = matrix.shape
    # A logit: a float32 dot product of H terms, H roundings, each of at most sum_k |h_k w_k|.
    logit_error = u * width * (tokens.abs() @ matrix.abs().T)
    # exp(z - max), relative: the logit's error; the subtraction and (liger) the product by log2(e), at most max - z
    # each; the exp.
    top = logits.amax(-1, keepdim=True)
    exp_error = logit_error + u * (2 * (top - logits) + CUDA_EXP_ERROR)
    # logsumexp = max + log(sum of the exps): the exps' errors (weighted by the softmax), the sum's V - 1 additions,
    # the log of a sum in [1, V] (within 2 ulps, or 2**-22 absolute near 1: 4 log V + 4) and the addition.
    probs = logits.softmax(-1)
    log_sum_exp = logits.logsumexp(-1, keepdim=True)
    lse_error = (probs * exp_error).sum(-1, keepdim=True) + u * (vocab + 4 * math.log(vocab) + 4 + log_sum_exp.abs())
    # The loss: each kept token's logsumexp - z_target (and the subtraction), summed (N additions) and divided.
    token_losses = (log_sum_exp - logits.gather(1, targets.clamp_min(0)[:, None])).squeeze(1)
    token_errors = lse_error.squeeze(1) + logit_error.gather(1, targets.clamp_min(0)[:, None]).squeeze(1)
    token_errors = token_errors + u * token_losses.abs()
    loss_bound = (kept * (token_errors + u * (kept.sum() + 2) * token_losses.abs())).sum() / count
    # The logits' gradient (softmax - one-hot) / count on kept tokens: the softmax's relative error (the exp's, the
    # normaliser's, and exp(z - logsumexp)'s subtraction where it is computed that way), then the subtraction of the
    # one-hot, the division and a scaling by the incoming gradient.
    softmax_error = exp_error + lse_error + u * ((logits - log_sum_exp).abs() + CUDA_EXP_ERROR + 2)
    one_hot = F.one_hot(targets.clamp_min(0), vocab) * kept[:, None]
    grad_logits = (probs - one_hot) * kept[:, None] / count
    grad_logits_error = (probs * softmax_error + 3 * u * (probs - one_hot).abs()) * kept[:, None] / count
    # dh = dZ w: V terms; dW = dZ^T h: N terms (over the chunks liger accumulates).
    hidden_bound = grad_logits_error @ matrix.abs() + u * (vocab + 2) * (grad_logits.abs() @ matrix.abs())
    weight_bound = grad_logits_error.T @ tokens.abs() + u * (len(targets) + 2) * (grad_logits.abs().T @ tokens.abs())
    expected = [loss.detach(), grads[0].unflatten(0, hidden.shape[:2]), grads[1]]
    return expected, [loss_bound, hidden_bound.unflatten(0, hidden.shape[:2]), weight_bound]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_items_in_batch", [None, 100])
def test_gpu_fused_cross_entropy_matches_transformers_loss(num_items_in_batch):
    """Same shift, ignore_index and num_items_in_batch semantics as transformers' ForCausalLMLoss: the fused loss and
    ForCausalLMLoss, both fp32 (TF32 off), against the loss and gradients in float64, each within its fp32 bound."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from models.kernels.cross_entropy import fused_linear_cross_entropy

    hidden = torch.randn(2, 64, 128, device="cuda", requires_grad=True)
    weight = torch.randn(1000, 128, device="cuda", requires_grad=True)
    labels = torch.randint(0, 1000, (2, 64), device="cuda").index_fill(1, torch.arange(5, device="cuda"), -100)
    fused = fused_linear_cross_entropy(hidden, weight, labels, num_items_in_batch=num_items_in_batch)
    plain = ForCausalLMLoss(hidden @ weight.T, labels, 1000, num_items_in_batch=num_items_in_batch)
    expected, bounds = causal_lm_loss_bounds(hidden, weight, labels, num_items_in_batch)
    for name, loss in (("fused", fused), ("transformers", plain)):
        results = zip((loss, *torch.autograd.grad(loss, (hidden, weight))), expected, bounds, strict=True)
        for what, (got, want, bound) in zip(("loss", "hidden grad", "weight grad"), results, strict=True):
            assert_within_bound(got, want, bound, f"{name} {what}")
