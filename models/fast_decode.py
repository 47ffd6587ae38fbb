"""``generate`` at the cost of the captured decode step: greedy search and sampling without a host sync per token.

transformers' ``_sample`` loop, per token: ``prepare_inputs_for_generation`` builds the masks for a static cache in
Python (``create_masks_for_generate``), the compiled forward runs, then logits processing, sampling and the stopping
criteria run as eager kernels, and ``StopCheck`` reads ``unfinished_sequences.max() == 0`` on the host, so the device
idles while the host prepares the next step. (``DeferredStopCheck`` reads that flag one step late, but
``DeferredStopCheck.is_supported`` enables it on ``"mps"`` only; and ``torch.multinomial`` checks its input on the
host as well.)

Here a token is two captured steps and no host read:

1. the forward as ``generate`` compiles it (``model.get_compiled_call(generation_config.compile_config)``, whenever
   ``model._valid_auto_compile_criteria`` says so, i.e. a static cache on CUDA), fed from device-resident inputs:
   the last token, its position, and the 2D padding mask spanning every slot of the static cache, from which the
   model builds its masks inside the graph (the cache's fill level is a tensor);
2. ``select_tokens``, compiled with the same configuration: the logits processors, sampling, EOS padding, the
   stopping state, and the next position, all written in place into ``DecodeState``.

From the second interval on (and after at least ``CHECKED_STEPS`` calls) the two calls skip dynamo's guard checks
(``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``): at every step they get the same state tensors, updated in
place, the same cache, and logits of the same shape, which the first interval's checked calls matched.
``generation_config.skip_guard_checks = False`` checks every call; a stance the caller set is left as it is.

The host reads a small status every ``stop_check_interval`` tokens (``generation_config.stop_check_interval``,
default ``DEFAULT_STOP_CHECK_INTERVAL``), through an asynchronous copy it waits on one interval later, so the device
never waits for the host. When every sequence has finished early, up to two intervals ran past the end: they are
undone exactly as plain ``generate`` would have ended (sequences trimmed, the cache cropped, the random generator
rewound to where sampling stopped, the streamer fed only the kept tokens). A streamer therefore gets its tokens in
bursts of ``stop_check_interval`` (the first one as soon as the prompt is processed).

Sampling draws what ``torch.multinomial(probs, 1)`` draws: one exponential variate per vocabulary entry from the
same generator, then ``argmax(probs / noise)`` (multinomial's own single-sample path), so seeded sampling gives
plain ``generate``'s tokens on the CPU. On CUDA the step is compiled with inductor's ``fallback_random`` so it draws
from the same generator too; the compiled processors may round differently from eager ones, so there the tokens
are the same up to such rounding.

What it does not capture runs plain ``generate`` (``GenerationMixin._sample``), with a warning naming the reason
when a static cache was requested: see ``unsupported_reason``. Entry points: ``FastDecodeMixin`` (the LCKV models
use it), ``enable_fast_decode(model)`` (any causal LM, e.g. a Llama), and ``fast_sample`` as
``model.generate(..., custom_generate=fast_sample)``. Off for a model: ``model.generation_config.fast_decode = False``.

Shapes: ``B`` batch, ``S`` slots of the static cache, ``V`` vocabulary.
"""

import contextlib
import copy
import logging
import math
from collections import deque
from dataclasses import dataclass, fields
from functools import cache as memoize

import torch
from transformers import GenerationMixin
from transformers.cache_utils import DummyLayer, StaticLayer
from transformers.generation import (
    EosTokenCriteria,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    MaxLengthCriteria,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .cache_staging import offloaded

logger = logging.getLogger(__name__)

DEFAULT_STOP_CHECK_INTERVAL = 16
CHECKED_STEPS = 2  # compiled calls of the loop that always run dynamo's guard checks, however short the interval
# Processors that never read the tokens generated so far: the captured step calls them as they are.
LENGTH_FREE_PROCESSORS = (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    MinPLogitsWarper,
    TypicalLogitsWarper,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
)
# Processors that read only the sequence length: the captured step runs them as an ``EosBlock``.
MIN_LENGTH_PROCESSORS = (MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor)
STOPPING_CRITERIA = (MaxLengthCriteria, EosTokenCriteria)
# generate's model inputs the loop feeds itself (inputs_embeds only reaches the prefill).
MODEL_INPUTS = {"attention_mask", "position_ids", "cache", "use_cache", "logits_to_keep", "inputs_embeds"}
DECODING_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)


def unsupported_reason(
    model,
    input_ids: torch.Tensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool,
    model_kwargs: dict,
) -> str | None:
    """Why this ``generate`` call cannot run the captured loop (it then runs plain ``generate``), or None."""
    if not getattr(generation_config, "fast_decode", True):
        return "generation_config.fast_decode is False"
    if model.device.type not in ("cuda", "cpu"):
        return f"device {model.device.type} (allowed: cuda, cpu)"
    if input_ids.device != model.device:
        return f"input_ids on {input_ids.device}, the model on {model.device}"
    if synced_gpus:
        return "synced_gpus"
    reason = model_hooks_reason(model)
    if reason:
        return reason
    if generation_config.is_assistant:
        return "assistant model"
    if generation_config.return_dict_in_generate:
        requested = [
            name
            for name in ("scores", "logits", "attentions", "hidden_states")
            if getattr(generation_config, f"output_{name}")
        ]
        if requested:
            return f"output_{requested[0]}"
    extra = sorted(key for key, value in model_kwargs.items() if key not in MODEL_INPUTS and value is not None)
    if extra:
        return f"model input {extra[0]}"
    if model_kwargs.get("position_ids") is None:
        return "no position_ids"
    reason = cache_reason(model_kwargs.get("cache"), stopping_criteria.max_length)
    if reason:
        return reason
    for processor in logits_processor:  # exact types: a subclass may read what its base does not
        if type(processor) not in LENGTH_FREE_PROCESSORS + MIN_LENGTH_PROCESSORS:
            return f"logits processor {type(processor).__name__}"
    for criterion in stopping_criteria:
        if type(criterion) not in STOPPING_CRITERIA:
            return f"stopping criterion {type(criterion).__name__}"
    eos_criteria = sum(type(c) is EosTokenCriteria for c in stopping_criteria)
    if eos_criteria > 1:
        return f"{eos_criteria} EOS criteria"
    if eos_criteria and generation_config._pad_token_tensor is None:
        return "an EOS criterion without pad_token_id"
    if stopping_criteria.max_length is None or stopping_criteria.max_length <= input_ids.shape[1]:
        return f"max_length {stopping_criteria.max_length} for a prompt of {input_ids.shape[1]} tokens"
    return None


def model_hooks_reason(model) -> str | None:
    """The loop feeds the forward itself, as ``GenerationMixin``'s own input preparation would: a model that prepares
    its inputs its own way, or builds generate's masks otherwise than its forward builds them from a 2D padding mask
    (``forward_builds_generate_masks``: the LCKV models, whose two paths call the same function), runs plain
    generate."""
    for hook in ("prepare_inputs_for_generation", "_update_model_kwargs_for_generation"):
        if getattr(type(model), hook) is not getattr(GenerationMixin, hook):
            return f"the model's own {hook}"
    if hasattr(model, "create_masks_for_generate") and not getattr(model, "forward_builds_generate_masks", False):
        return "the model's own create_masks_for_generate"
    return None


def cache_reason(cache, max_length: int | None) -> str | None:
    """Why ``cache`` cannot back the captured loop: it must be a resident static cache (``StaticLayer``s, and
    ``DummyLayer``s for layers that share another's KVs) with room for ``max_length - 1`` tokens; None if it can."""
    if cache is None:
        return "no cache (use_cache=False)"
    if offloaded(cache):
        return "an offloaded cache"
    layers = [layer for layer in getattr(cache, "layers", ()) if not isinstance(layer, DummyLayer)]
    kinds = sorted({type(layer).__name__ for layer in layers if type(layer) is not StaticLayer})
    if not layers or kinds:
        return (
            f"{type(cache).__name__} with {', '.join(kinds) or 'no'} layers "
            "(allowed: a static cache without sliding layers)"
        )
    if max_length is not None and layers[0].max_cache_len < max_length - 1:
        return f"a static cache of {layers[0].max_cache_len} slots for max_length {max_length}"
    return None


@dataclass
class DecodeState:
    """What one decode step reads and writes, on the device, at fixed addresses (a captured step updates it in place).

    ``tokens`` ``(B, 1)``: the last chosen token, the next forward's input; ``positions`` ``(B, 1)`` (``(1, 1)`` when
    ``generate`` made them so): its position id once it is fed; ``padding`` ``(B, S)`` bool: the prompt's padding mask
    over the cache slots, every later slot real (causality hides the ones not filled yet), or None without padding
    (as ``generate`` drops an all-ones mask); ``sequence`` ``(B, S + 1)`` int32: each chosen token at its column of
    ``generate``'s ``input_ids``; ``length`` ``()``: that column, i.e. ``input_ids.shape[1]`` before the next token;
    ``unfinished`` ``(B,)``; ``status`` ``(2,)``: the steps plain ``generate`` would have taken so far, and whether any
    sequence is still unfinished.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    padding: torch.Tensor | None
    sequence: torch.Tensor
    length: torch.Tensor
    unfinished: torch.Tensor
    status: torch.Tensor

    @classmethod
    def allocate(
        cls, batch_size: int, slots: int, positions_shape: tuple, padded: bool, device: torch.device
    ) -> "DecodeState":
        state = cls(
            tokens=torch.zeros(batch_size, 1, dtype=torch.long, device=device),
            positions=torch.zeros(positions_shape, dtype=torch.long, device=device),
            padding=torch.ones(batch_size, slots, dtype=torch.bool, device=device) if padded else None,
            sequence=torch.zeros(batch_size, slots + 1, dtype=torch.int32, device=device),
            length=torch.zeros((), dtype=torch.long, device=device),
            unfinished=torch.ones(batch_size, dtype=torch.long, device=device),
            status=torch.zeros(2, dtype=torch.long, device=device),
        )
        for f in fields(state):  # a captured step reads and writes these in place: static addresses, no copies
            if getattr(state, f.name) is not None:
                torch._dynamo.mark_static_address(getattr(state, f.name))
        return state

    def shape(self) -> tuple:
        """The arguments of ``allocate`` that made it."""
        batch_size, slots = self.tokens.shape[0], self.sequence.shape[1] - 1
        return batch_size, slots, tuple(self.positions.shape), self.padding is not None, self.tokens.device

    def restart(self, prompt_length: int, attention_mask: torch.Tensor | None, position_ids: torch.Tensor) -> None:
        """Set to the state after the prefill. ``attention_mask`` ``(B, F + 1)`` and ``position_ids`` as ``generate``
        holds them after its first update (``F`` cached tokens, the first new token's column appended)."""
        self.positions.copy_(position_ids[..., -1:] - 1)  # select_tokens advances it to the first new token's position
        if self.padding is not None:
            self.padding.fill_(True)
            self.padding[:, : attention_mask.shape[1]] = attention_mask.bool()
        self.length.fill_(prompt_length)
        self.unfinished.fill_(1)
        self.status.fill_(1)
        self.status[0] = 0


def decode_state(
    model,
    prompt_length: int,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    slots: int,
    batch_size: int,
) -> DecodeState:
    """The model's ``DecodeState`` for this call, restarted. The buffers of the previous call are kept and reused when
    the shapes match (as ``generate`` reuses a static cache): captured graphs read them at the same addresses, so
    a new call replays them instead of recording them anew."""
    shape = (batch_size, slots, tuple(position_ids[..., -1:].shape), attention_mask is not None, position_ids.device)
    state = getattr(model, "_fast_decode_state", None)
    if state is None or state.shape() != shape:
        state = model._fast_decode_state = DecodeState.allocate(*shape)
    state.restart(prompt_length, attention_mask, position_ids)
    return state


class EosBlock:
    """``MinLengthLogitsProcessor`` / ``MinNewTokensLengthLogitsProcessor`` against a length held on the device: EOS
    scores are ``-inf`` while the sequence is shorter than ``min_length`` (a 0-d tensor, so a new prompt or limit
    changes no compiled graph)."""

    def __init__(self, min_length: int, eos_token_id: torch.Tensor, device: torch.device):
        self.min_length = torch.tensor(min_length, device=device)
        self.eos_token_id = eos_token_id.to(device)

    @classmethod
    def of(cls, processor, device: torch.device) -> "EosBlock":
        if isinstance(processor, MinNewTokensLengthLogitsProcessor):
            return cls(processor.prompt_length_to_skip + processor.min_new_tokens, processor.eos_token_id, device)
        return cls(processor.min_length, processor.eos_token_id, device)

    def __call__(self, length: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` ``(B, V)`` with EOS blocked while ``length < min_length``."""
        is_eos = torch.isin(torch.arange(scores.shape[-1], device=scores.device), self.eos_token_id)
        return torch.where(is_eos & (length < self.min_length), -math.inf, scores)


def select_tokens(
    logits: torch.Tensor,
    state: DecodeState,
    plan: tuple,
    sampling: bool,
    pad_token_id: torch.Tensor | None,
    eos_token_id: torch.Tensor | None,
) -> None:
    """Choose the next token from ``logits`` ``(B, T, V)`` as one iteration of ``generate``'s loop does, and record it
    in ``state``. ``plan``: the logits processors in order (``EosBlock`` for the length-dependent ones);
    ``eos_token_id`` None when no EOS criterion ends sequences."""
    scores = logits[:, -1].to(torch.float32)
    for processor in plan:
        scores = processor(state.length, scores) if isinstance(processor, EosBlock) else processor(None, scores)
    if sampling:
        probs = torch.softmax(scores, dim=-1)
        # torch.multinomial(probs, 1)'s own draw: one exponential per entry, from the same generator, in the same order.
        chosen = (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)
    else:
        chosen = scores.argmax(-1)
    running = state.status[1]  # some sequence was unfinished before this token: plain generate takes this step
    if eos_token_id is not None:
        chosen = chosen * state.unfinished + pad_token_id * (1 - state.unfinished)
        state.unfinished.mul_(~torch.isin(chosen, eos_token_id))
        running_after = state.unfinished.amax()
    else:
        running_after = running
    state.status.copy_(torch.stack([state.status[0] + running, running_after]))
    state.sequence.index_copy_(1, state.length.view(1), chosen[:, None].to(state.sequence.dtype))
    state.tokens.copy_(chosen[:, None])
    state.positions.add_(1)
    state.length.add_(1)


def select_compile_options(compile_config) -> tuple[object, dict]:
    """The backend and options that compile ``select_tokens`` as ``compile_config`` compiles the forward. Under
    inductor its mode becomes options (``torch.compile`` takes one or the other), plus ``fallback_random``: sampling
    then draws from the generator plain ``generate`` draws from."""
    config = compile_config.to_dict()
    options = dict(config.get("options") or {})
    if config["backend"] == "inductor":
        mode = config.get("mode")
        options = (
            (torch._inductor.list_mode_options(mode, config.get("dynamic")) if mode else {})
            | options
            | {"fallback_random": True}
        )
    return config["backend"], options


@memoize
def _compiled_select(backend, options: tuple) -> callable:
    return torch.compile(select_tokens, backend=backend, fullgraph=True, dynamic=False, options=dict(options) or None)


def compiled_select(compile_config) -> callable:
    """``select_tokens`` compiled per ``select_compile_options``, one compiled function per configuration (its graphs
    are reused by later calls)."""
    backend, options = select_compile_options(compile_config)
    return _compiled_select(backend, tuple(sorted(options.items())))


class StatusReader:
    """Reads ``DecodeState.status`` (and, for a streamer, the new tokens) through asynchronous copies, each waited on
    only when the next one is queued, so the device never idles for the host."""

    def __init__(self, state: DecodeState, prompt_length: int, streamer=None):
        self.state, self.prompt_length, self.streamer = state, prompt_length, streamer
        self.cuda = state.status.device.type == "cuda"
        self.pending: deque = deque()
        self.copied = 0  # tokens covered by the snapshots queued so far
        self.taken = 0  # steps plain generate takes, as of the last snapshot read

    def snapshot(self, steps: int) -> None:
        """Queue a copy of the status after ``steps`` tokens (and of the tokens since the last snapshot)."""
        start, self.copied = self.copied, steps
        status = self._to_host(self.state.status)
        tokens = None
        if self.streamer is not None:
            tokens = self._to_host(self.state.sequence[:, self.prompt_length + start : self.prompt_length + steps])
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending.append((start, status, tokens, event))

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return tensor.clone()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)

    def read(self, keep: int) -> bool:
        """Read the oldest snapshots until ``keep`` remain queued; hand their kept tokens to the streamer. Returns
        whether a snapshot read showed every sequence finished."""
        finished = False
        while len(self.pending) > keep:
            start, status, tokens, event = self.pending.popleft()
            if event is not None:
                event.synchronize()
            self.taken, running = status.tolist()
            if tokens is not None:
                for column in range(max(0, min(tokens.shape[1], self.taken - start))):
                    self.streamer.put(tokens[:, column].clone())
            finished = finished or not running
        return finished


class RngRewind:
    """The sampling generator's state before each recent step, to rewind the steps that ran past the end."""

    def __init__(self, device: torch.device, keep: int, enabled: bool):
        self.enabled = enabled
        if enabled:
            self.generator = (
                torch.cuda.default_generators[device.index or 0] if device.type == "cuda" else torch.default_generator
            )
        self.states: deque = deque(maxlen=keep)

    def record(self, steps: int) -> None:
        """Remember the state before the token after ``steps`` tokens is sampled."""
        if self.enabled:
            self.states.append((steps, self.generator.get_state()))

    def rewind(self, steps: int) -> None:
        """Restore the state recorded after ``steps`` tokens (as if sampling had stopped there)."""
        if self.enabled:
            self.generator.set_state(dict(self.states)[steps])


def guard_skipping(enabled: bool) -> contextlib.AbstractContextManager:
    """``torch.compiler.set_stance(skip_guard_eval_unsafe=True)`` where ``enabled`` and the caller left dynamo's stance
    as it is by default; otherwise nothing, so a stance the caller set (``force_eager``, ``fail_on_recompile``, a
    forced backend) holds inside the loop too."""
    stance = torch._dynamo.eval_frame._stance  # no public getter (torch 2.13)
    if not enabled or stance != torch._dynamo.eval_frame.DynamoStance():
        return contextlib.nullcontext()
    return torch.compiler.set_stance(skip_guard_eval_unsafe=True)


def stop_check_interval(generation_config) -> int:
    """``generation_config.stop_check_interval``: tokens between two reads of the stop status (default 16)."""
    interval = getattr(generation_config, "stop_check_interval", None)
    if interval is None:
        return DEFAULT_STOP_CHECK_INTERVAL
    if type(interval) is not int or interval < 1:
        raise ValueError(f"stop_check_interval: {interval!r}; allowed are integers >= 1")
    return interval


def fast_sample(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    **model_kwargs,
):
    """``GenerationMixin._sample`` (greedy search and sampling) with the captured per-token loop; the same tokens.

    A ``custom_generate`` callable as well: ``model.generate(ids, custom_generate=fast_sample)``. transformers hands
    a callable no streamer, so with one use ``FastDecodeMixin`` / ``enable_fast_decode``. Returns what ``_sample``
    returns: ``(B, P + N)`` sequences, or a ``GenerateDecoderOnlyOutput`` of sequences and cache.
    """
    mode = generation_config.get_generation_mode()
    if mode not in DECODING_MODES:
        raise ValueError(
            f"custom_generate=fast_sample: generation mode {mode.value}; allowed are greedy search and sampling"
        )
    reason = unsupported_reason(
        model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, model_kwargs
    )
    if reason is not None:
        # A static cache asks for speed: say why it is not had (unless the fast loop was turned off).
        if getattr(model_kwargs.get("cache"), "is_compileable", False) and getattr(
            generation_config, "fast_decode", True
        ):
            logger.warning("fast decoding falls back to generate's own loop: %s", reason)
        if not isinstance(model, FastDecodeMixin) and keeps_offloaded_cache_uncompiled(
            model_kwargs.get("cache"), generation_config
        ):
            # A model without the mixin (custom_generate=fast_sample) would be compiled by transformers' own check.
            generation_config = copy.copy(generation_config)
            generation_config.disable_compile = True
        return GenerationMixin._sample(
            model,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            synced_gpus=synced_gpus,
            streamer=streamer,
            **model_kwargs,
        )
    return decode(model, input_ids, logits_processor, stopping_criteria, generation_config, streamer, model_kwargs)


def decode(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    streamer,
    model_kwargs: dict,
):
    """The captured loop of ``fast_sample`` (its checks passed)."""
    compiled = model._valid_auto_compile_criteria(model_kwargs, generation_config)
    forward = model.get_compiled_call(generation_config.compile_config) if compiled else model.__call__
    select = (
        compiled_select(generation_config.compile_config or model._default_compile_config())
        if compiled
        else select_tokens
    )
    interval = stop_check_interval(generation_config)
    skip_guards = compiled and getattr(generation_config, "skip_guard_checks", True)
    batch_size, prompt_length = input_ids.shape
    total = stopping_criteria.max_length - prompt_length  # tokens to generate unless every sequence ends early
    device = model.device
    eos = next((c.eos_token_id.to(device) for c in stopping_criteria if isinstance(c, EosTokenCriteria)), None)
    pad = generation_config._pad_token_tensor.to(device) if eos is not None else None
    plan = tuple(EosBlock.of(p, device) if type(p) in MIN_LENGTH_PROCESSORS else p for p in logits_processor)
    sampling = generation_config.do_sample

    outputs = model._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=True)
    model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
    cache = model_kwargs["cache"]
    slots = next(layer.max_cache_len for layer in cache.layers if isinstance(layer, StaticLayer))
    state = decode_state(
        model, prompt_length, model_kwargs.get("attention_mask"), model_kwargs["position_ids"], slots, batch_size
    )
    inputs = dict(
        input_ids=state.tokens,
        position_ids=state.positions,
        attention_mask=state.padding,
        cache=cache,
        use_cache=True,
        return_dict=True,
    )
    if "logits_to_keep" in model_kwargs:
        inputs["logits_to_keep"] = model_kwargs["logits_to_keep"]
    reader = StatusReader(state, prompt_length, streamer)
    rng = RngRewind(device, keep=2 * interval + 1, enabled=sampling)

    with model._optimize_model_for_decode():
        select(outputs.logits, state, plan, sampling, pad, eos)
        del outputs
        steps = 1
        reader.snapshot(steps)
        finished = reader.read(keep=0) if streamer is not None else False  # the first token as soon as it exists
        while not finished and steps < total:
            # After the first interval (and at least CHECKED_STEPS calls) the compiled calls skip dynamo's guard
            # checks (about a third of the host's time per step at batch 1): every step passes them the same state
            # tensors, updated in place, the same cache and plan, and logits of the same shape, which the checked
            # calls have already matched.
            with guard_skipping(skip_guards and steps > CHECKED_STEPS):
                for _ in range(min(interval, total - steps)):
                    rng.record(steps)
                    if compiled:
                        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
                    select(forward(**inputs).logits, state, plan, sampling, pad, eos)
                    steps += 1
            reader.snapshot(steps)
            finished = reader.read(keep=1)  # the previous interval's status: the device is one interval ahead
        reader.read(keep=0)
    taken = reader.taken
    if steps > taken:  # the steps past the end: plain generate never ran them
        cache.crop(-(steps - taken))
        rng.rewind(taken)
    sequences = torch.cat(
        [input_ids, state.sequence[:, prompt_length : prompt_length + taken].to(input_ids.dtype)], dim=-1
    )
    if streamer is not None:
        streamer.end()
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=sequences, cache=cache)
    return sequences


@memoize
def warn_compile_config_ignored() -> None:
    """Said once per process: an offloaded cache was asked to compile."""
    logger.warning("an offloaded cache decodes without compiling the forward (compile_config is ignored)")


def keeps_offloaded_cache_uncompiled(cache, generation_config) -> bool:
    """Whether ``generate`` must not compile the forward over ``cache`` though compiling is not turned off: an
    offloaded cache (``cache_staging.offloaded``: transformers' compilation over an offloaded static cache crashed
    dynamo on an H200 with torch 2.11, for its own Llama as for LCKV, while eager decoding over it gave the resident
    cache's tokens and logits exactly; docs/performance.md, "KV cache offloading"). Says once where a
    ``compile_config`` asked for compiling."""
    if not offloaded(cache) or generation_config.disable_compile:
        return False
    if generation_config.compile_config is not None:
        warn_compile_config_ignored()
    return True


class FastDecodeMixin:
    """Put before ``GenerationMixin``: ``generate``'s greedy search and sampling run ``fast_sample``; an offloaded cache
    decodes eagerly (``_valid_auto_compile_criteria``)."""

    def _valid_auto_compile_criteria(self, model_kwargs: dict, generation_config) -> bool:
        if keeps_offloaded_cache_uncompiled(model_kwargs.get("cache"), generation_config):
            return False
        return super()._valid_auto_compile_criteria(model_kwargs, generation_config)

    def _sample(
        self,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus=False,
        streamer=None,
        **model_kwargs,
    ):
        return fast_sample(
            self,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            synced_gpus=synced_gpus,
            streamer=streamer,
            **model_kwargs,
        )


@memoize
def _fast_class(cls: type) -> type:
    # Same name, module and qualified name: saved configs name the original architecture, pickles load the original
    # class.
    return type(cls.__name__, (FastDecodeMixin, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


def enable_fast_decode(model):
    """Make ``model.generate`` (any ``GenerationMixin`` causal LM, e.g. a ``LlamaForCausalLM``) run ``fast_sample`` for
    greedy search and sampling, streamers included; returns ``model``. The model's class becomes a subclass with
    ``FastDecodeMixin`` first (``isinstance`` checks, ``save_pretrained`` and the forward are unchanged)."""
    if not isinstance(model, FastDecodeMixin):
        model.__class__ = _fast_class(type(model))
    return model


__all__ = ["DEFAULT_STOP_CHECK_INTERVAL", "FastDecodeMixin", "enable_fast_decode", "fast_sample", "unsupported_reason"]
