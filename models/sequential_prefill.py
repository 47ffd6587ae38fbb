"""Exact batched prefill of an LCKV model: the prompt goes through the model one token at a time.

The iterative prefill runs the cyclic block ``num_encoders + 1`` times over the whole prompt (about 8x a Llama's
work) and is exact only for the first ``num_encoders + 1`` tokens. Feeding the prompt token by token through the
decoding step is the exact semantics and costs a Llama's work; it pays with ``T`` sequential steps, which at a
large batch are full GPU steps. With a static cache on CUDA every step is the same compiled, CUDA-graph-captured
function (masks and positions are built outside and passed in as tensors, the cache's fill position is a tensor),
so the loop replays one graph instead of launching eager layers.

``config.prefill`` picks the path of evaluation-mode (``model.eval()``) multi-token forwards: ``"iterative"``
(default), ``"sequential"`` (every such forward, cache or not) or ``"auto"`` (``choose_prefill``, for forwards that
fill a cache; without one it stays iterative). ``config.sequential_forward`` forces this path for every
evaluation-mode multi-token forward, cache or not. Training mode (``model.train()``) always runs the iterations.

Shapes: ``B`` batch, ``T`` prompt tokens, ``P`` tokens already cached, ``S`` key slots (static cache length),
``H`` hidden size.
"""

from collections import defaultdict
from collections.abc import Callable, Iterator
from functools import cache as memoize
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicCache, StaticLayer

from .cache_staging import offloaded
from .fast_decode import CHECKED_STEPS, guard_skipping
from .layer_plan import LayerPlan
from .masks import lckv_masks, reads_window_cache
from .prefill_modes import PREFILL_MODES, choose_prefill
from .roofline import device_hardware
from .scratch_cache import copy_committed, scratch_cache
from .tensor_parallel import config_tp_size

MASK_CHUNK = 64  # prompt tokens per segment: one mask build (static caches), one run of the layers outside the block
SEGMENT_ATTENTION_BYTES = 2**31  # the most one layer's attention over a segment may allocate (``runs_segments``)


def every_forward_sequential(config) -> bool:
    """Whether every evaluation-mode multi-token forward of an LCKV ``config``'s model runs token by token, with a
    cache or without: under ``sequential_forward`` or ``prefill="sequential"``."""
    # "sequential" holds without a cache too: whether a forward builds one follows ``use_cache``, which the Trainer
    # saves as False, and lm-eval calls ``model(ids)``: the checkpoint that asked for the exact prefill would score
    # by the iterations there (the cacheless forward runs into a scratch cache, models/scratch_cache.py).
    return config.sequential_forward or config.prefill == "sequential"


def uses_sequential_prefill(config, inputs_embeds: torch.Tensor, cache: Cache | None) -> bool:
    """Whether an evaluation-mode forward of ``inputs_embeds`` ``(B, T, H)``, ``T > 1``, runs token by token: always
    under ``sequential_forward`` or ``prefill="sequential"``, cache or not; under ``"auto"`` where it fills a cache,
    priced for its batch, length, dtype and device (``choose_prefill``)."""
    if every_forward_sequential(config):
        return True
    if cache is None or (config.prefill == "auto" and config._attn_implementation == "flex_attention"):
        # A flex mask generate made for a static cache cannot be cut per token: "auto" keeps the iterative prefill.
        return False
    batch_size, query_length = inputs_embeds.shape[:2]
    device = inputs_embeds.device
    path = choose_prefill(
        config.prefill,
        config,
        batch_size,
        query_length,
        device_hardware(device),
        inputs_embeds.element_size(),
        captured=compile_options(device, cache) is not None,
        tp=config_tp_size(config),
    )
    return path == "sequential"


# torch.compile backend of the token step on a CPU ("eager", "aot_eager" or a backend callable); None: the CPU runs
# the step eagerly. Tests and CPU smoke runs set it so that dynamo traces and guards the step as on a GPU, where any
# recompilation shows up.
CPU_COMPILE_BACKEND = None


def compile_options(device: torch.device, cache: Cache) -> dict | None:
    """``torch.compile`` arguments of the token step for a static, resident cache: CUDA graphs on CUDA,
    ``CPU_COMPILE_BACKEND`` on a CPU; None (eager) otherwise (a dynamic cache changes shape every step; an
    offloaded one moves between devices)."""
    # A static window-only layer branches on its fill level in Python: compiled, it would recompile every step.
    windowed = any(getattr(layer, "is_sliding", False) for layer in cache.layers)
    if not getattr(cache, "is_compileable", False) or offloaded(cache) or windowed:
        return None
    if device.type == "cuda":
        return {"mode": "reduce-overhead", "fullgraph": True, "dynamic": False}
    if device.type == "cpu" and CPU_COMPILE_BACKEND is not None:
        return {"backend": CPU_COMPILE_BACKEND, "fullgraph": True, "dynamic": False}
    return None


def token_step(
    model,
    inputs_embeds: torch.Tensor,
    masks: dict,
    position_ids: torch.Tensor,
    cache: Cache,
    reporting: bool = False,
    layers: range | None = None,
    **kwargs,
) -> tuple[torch.Tensor, list | None]:
    """One token through ``layers`` (default all): ``(B, 1, H)`` -> their output ``(B, 1, H)`` (normed where they end
    at the top); commits its KVs to ``cache``. With ``reporting`` also the layer outputs the model reports
    (``output_hidden_states``): per layer ``(input (B, 1, H), output (B, 1, H), None)``; else None."""
    output = model.forward_layers(inputs_embeds, masks, position_ids, cache, reporting, layers=layers, **kwargs)
    return output.last_hidden_state, output.reported


@memoize
def compiled_token_step(options: tuple) -> Callable:
    """The compiled ``token_step``, one per set of compile options. The model is an argument, so dynamo keeps one
    graph per model and batch size (guards), and the position never enters a guard: it lives in the cache's
    ``cumulative_length`` tensor and the mask tensors."""
    return torch.compile(token_step, **dict(options))


def statically_allocated(cache: Cache) -> bool:
    """All static layers hold their buffers (allocated outside a compiled region, where they get static addresses)."""
    return all(layer.is_initialized for layer in cache.layers if isinstance(layer, StaticLayer))


def step_input(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` with the strides of a fresh tensor of its shape.

    The compiled step guards on every input's strides, those of size-1 dimensions included, and ``.contiguous()``
    keeps a slice that is already contiguous as it is: at batch 1 a row of a ``(1, 1, 64, S)`` mask keeps the stride
    ``64 * S`` on dim 0, the last, shorter window's row another, and each new stride recompiled the step."""
    return tensor.clone(memory_format=torch.contiguous_format)


def mask_rows(mask, start: int, stop: int):
    """The queries ``start:stop`` of a prompt mask: 4D ``(B, 1, T, S)`` -> ``(B, 1, stop - start, S)``, ``visible``
    ``(B, T, 1)`` -> ``(B, stop - start, 1)`` (views)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"prefill: a sequential prefill cannot split a precomputed {type(mask).__name__} mask per token; "
            "allowed are tensor masks (eager, sdpa, sdpa_packed_gqa attention)"
        )
    return mask[:, :, start:stop] if mask.dim() == 4 else mask[:, start:stop]


def mask_row(mask, t: int):
    """Step ``t``'s one-query slice of a prompt mask (``mask_rows``), a ``step_input``, so every step hands the
    compiled step the same layout."""
    return step_input(mask_rows(mask, t, t + 1))


class MaskSegment(NamedTuple):
    """The masks of a run of consecutive prompt tokens: their indices (within the prompt), the masks of all of them
    at once (``lckv_masks``' kinds over ``tokens`` queries) and, lazily, each token's one-step masks."""

    tokens: range
    masks: dict
    rows: Iterator[dict]


def mask_segments(model, inputs_embeds, attention_mask, position_ids, cache, past_length: int) -> Iterator[MaskSegment]:
    """The prompt's masks, a segment at a time: ``MASK_CHUNK`` tokens, or one where the masks are built per step.

    A dict is ``generate``'s precomputed prompt masks for a static cache (row ``t`` is step ``t``'s mask); a 2D
    padding mask ``(B, P + T)`` (or None: no padding) is cut to the keys up to each token and built per step,
    exactly as ``generate`` builds a decoding step's masks. A dict with a mask left out (SDPA's ``is_causal``
    shortcut, taken only without padding) has no one-token row, so it is rebuilt as unpadded. Where a layer reads a
    window-only cache the masks are built per step, which needs the padding mask (``create_masks_for_generate``
    passes it then): a dict is a ValueError.
    """
    batch_size, query_length = inputs_embeds.shape[:2]
    per_step = builds_masks_per_step(model, cache)
    if isinstance(attention_mask, dict) and per_step:
        raise ValueError(
            "attention_mask: a dict of prepared masks; the sequential prefill over a window-only cache layer builds "
            "each step's masks, so it takes the 2D padding mask (B, past + T) or None"
        )
    if isinstance(attention_mask, dict) and all(mask is not None for mask in attention_mask.values()):
        for start in range(0, query_length, MASK_CHUNK):
            stop = min(start + MASK_CHUNK, query_length)
            masks = {name: mask_rows(mask, start, stop) for name, mask in attention_mask.items()}
            yield MaskSegment(range(start, stop), masks, split_rows(masks, stop - start))
        return
    if isinstance(attention_mask, dict):
        attention_mask = None
    if attention_mask is None:  # a static cache must mask its empty slots, so the mask is never left out
        attention_mask = torch.ones(
            batch_size, past_length + query_length, dtype=torch.long, device=inputs_embeds.device
        )
    # A static cache's masks span all its slots, so the rows of MASK_CHUNK tokens come from one build (the per-step
    # Python cost of building masks would otherwise dominate small batches); a dynamic cache grows each step.
    chunk = 1 if per_step else MASK_CHUNK
    for start in range(0, query_length, chunk):
        stop = min(start + chunk, query_length)
        masks = lckv_masks(
            model.config,
            inputs_embeds[:, start:stop],
            attention_mask[:, : past_length + stop],
            cache,
            position_ids[:, start:stop],
            past_length + start,
            model.mask_sizing,
            allow_is_causal_skip=chunk == 1,
            strict_as_causal=model.kernel_selection.strict_as_causal,
        )
        rows = iter([masks]) if stop - start == 1 else split_rows(masks, stop - start)
        yield MaskSegment(range(start, stop), masks, rows)


def split_rows(masks: dict, count: int) -> Iterator[dict]:
    """The one-step masks of each of the ``count`` queries of ``masks``."""
    return ({name: mask_row(mask, row) for name, mask in masks.items()} for row in range(count))


def builds_masks_per_step(model, cache: Cache) -> bool:
    """A dynamic cache grows each step, and a window-only cache layer's mask has as many keys as the queries it was
    built for need: then each step's masks are built for it. A static cache's span all its slots."""
    return not getattr(cache, "is_compileable", False) or any(reads_window_cache(kind) for kind in model.mask_sizing)


class StackSplit(NamedTuple):
    """Which layers the sequential prefill runs token by token (``step``) and which over a whole segment of tokens
    before (``below``) and after (``above``) the token steps. Consecutive ranges covering the stack."""

    below: range
    step: range
    above: range


def stack_split(plan: LayerPlan, num_layers: int, segments: bool) -> StackSplit:
    """Only the cyclic block depends on earlier tokens through a layer above (the targets' KVs): with ``segments``
    the layers below it and above it run over segments and the block token by token; else every layer per token.

    >>> from models.layer_plan import layer_plan
    >>> stack_split(layer_plan([0, 3, 3, 3, 4]), 5, segments=True)
    StackSplit(below=range(0, 1), step=range(1, 4), above=range(4, 5))
    >>> stack_split(layer_plan([0, 3, 3, 3, 4]), 5, segments=False)
    StackSplit(below=range(0, 0), step=range(0, 5), above=range(5, 5))
    """
    if segments:
        return StackSplit(plan.below, plan.block, plan.above)
    return StackSplit(range(0), range(num_layers), range(num_layers, num_layers))


def segment_attention_bytes(config, batch: int, slots: int, value_bytes: int) -> int:
    """What one layer's attention over a segment (``MASK_CHUNK`` queries, ``slots`` keys) may allocate on SDPA's
    general path: the keys and values expanded to every query head (``repeat_kv``) and float32 scores."""
    heads, head_dim = config.num_attention_heads, config.head_dim
    return batch * heads * slots * (2 * head_dim * value_bytes + 4 * MASK_CHUNK)


def runs_segments(model, cache: Cache, batch: int, value_bytes: int) -> bool:
    """Whether the layers outside the cyclic block run over segments: where the masks span a static cache's slots
    (one build per segment) and one layer's attention over a segment stays within ``SEGMENT_ATTENTION_BYTES``
    (a small batch; at a large batch each token step's layers are long kernels already)."""
    # An offloaded cache prefetches the next KV-holding layer in each layer's update, in the order of a whole-stack
    # step; the segments would write in another order.
    if builds_masks_per_step(model, cache) or offloaded(cache):
        return False
    slots = cache.get_max_length()
    return segment_attention_bytes(model.config, batch, slots, value_bytes) <= SEGMENT_ATTENTION_BYTES


def collect_reported(reports: dict[int, list] | None, layers: range, reported: list | None) -> None:
    """File the ``(input, output, weights)`` each of ``layers`` reported under its index (``reports`` None: nothing
    was asked)."""
    if reports is not None:
        for layer_idx, entry in zip(layers, reported, strict=True):
            reports[layer_idx].append(entry)


def joined_reports(reports: dict[int, list]) -> list:
    """Per layer, in order, its reported inputs and outputs of all tokens side by side: ``(B, T, H)`` each."""
    return [
        (torch.cat([e[0] for e in entries], dim=1), torch.cat([e[1] for e in entries], dim=1), None)
        for _, entries in sorted(reports.items())
    ]


def run_segment(
    model,
    layers: range,
    inputs: torch.Tensor,
    segment: MaskSegment,
    position_ids: torch.Tensor,
    cache: Cache,
    reports: dict[int, list] | None,
    **kwargs,
) -> torch.Tensor:
    """``layers`` over all the segment's tokens at once, eagerly: ``inputs`` ``(B, C, H)`` -> ``(B, C, H)``; their
    reported outputs filed in ``reports`` (None: not asked)."""
    tokens = segment.tokens
    output = model.forward_layers(
        inputs,
        segment.masks,
        position_ids[:, tokens.start : tokens.stop],
        cache,
        reports is not None,
        layers=layers,
        **kwargs,
    )
    collect_reported(reports, layers, output.reported)
    return output.last_hidden_state


def run_tokens(
    model,
    token_embeds: Callable[[int, int], torch.Tensor],
    query_length: int,
    attention_mask,
    position_ids: torch.Tensor,
    cache: Cache,
    keep_hidden: bool,
    reporting: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, list | None]:
    """Run ``query_length`` tokens through ``model`` (``OptLlamaModel``) with the exact semantics of one token at a
    time, committing to ``cache``.

    The cyclic block runs token by token (a compiled, captured step where the cache allows); where
    ``runs_segments`` allows, the layers below and above it run over a segment of ``MASK_CHUNK`` tokens at a time
    (they read no KVs of a later layer, so a segment at once is the same computation), else inside the token step.

    Args:
        token_embeds: ``(start, stop)`` -> the ``(B, stop - start, H)`` input embeddings of those tokens.
        attention_mask: see ``mask_segments``. position_ids: ``(B, T)``.
        keep_hidden: return every token's final hidden state ``(B, T, H)``; otherwise only the last ``(B, 1, H)``
            (a large batch then never holds ``B x T x H`` activations).
        reporting: also return, per reported layer output (``output_hidden_states``), every token's ``(B, T, H)``
            side by side; these steps run uncompiled.

    Returns:
        the hidden states, and the reported outputs (None unless ``reporting``).
    """
    past_length = int(cache.get_seq_length())
    first = token_embeds(0, 1)
    batch_size, hidden_size = first.shape[0], first.shape[-1]
    hidden = first.new_empty(batch_size, query_length if keep_hidden else 1, hidden_size)
    # The compiled, graph-captured step is built for inference (traced without autograd, CUDA graphs replaying in-place
    # cache writes): a forward that records gradients (evaluation without no_grad) runs its steps eagerly.
    options = None if reporting or torch.is_grad_enabled() else compile_options(first.device, cache)
    compiled = compiled_token_step(tuple(sorted(options.items()))) if options is not None else None
    split = stack_split(model.plan, len(model.layers), runs_segments(model, cache, batch_size, first.element_size()))
    reports = defaultdict(list) if reporting else None
    compiled_calls = 0
    masks_input = first.expand(-1, query_length, -1)
    for segment in mask_segments(model, masks_input, attention_mask, position_ids, cache, past_length):
        tokens = segment.tokens
        entering = None
        if split.below:
            inputs = token_embeds(tokens.start, tokens.stop)
            entering = run_segment(model, split.below, inputs, segment, position_ids, cache, reports, **kwargs)
        # The token steps write where their output goes next: the segment's buffer for the layers above, else the
        # result (all of it, or the last token's).
        stepped = first.new_empty(batch_size, len(tokens), hidden_size) if split.above else hidden
        steps = zip(tokens, segment.rows, strict=True) if split.step else ()
        for index, (t, masks) in enumerate(steps):
            if entering is not None:
                step_embeds = entering[:, index : index + 1]
            else:  # token 0's embedding is ``first`` already
                step_embeds = token_embeds(t, t + 1) if t else first
            embeds, positions = step_input(step_embeds), step_input(position_ids[:, t : t + 1])
            # After the first step every static layer holds its buffers (allocated outside the compiled region).
            if compiled is not None and (t > 0 or statically_allocated(cache)):
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's output was already copied out
                # Every call hands the step the same model, cache and masks of one layout: once CHECKED_STEPS calls
                # passed dynamo's guard checks, the rest skip them (host time that a batch-1 step is short of).
                compiled_calls += 1
                with guard_skipping(compiled_calls > CHECKED_STEPS):
                    out, reported = compiled(model, embeds, masks, positions, cache, layers=split.step, **kwargs)
            else:  # CPU, a dynamic cache, reported outputs, or the step that allocates the static buffers
                out, reported = token_step(model, embeds, masks, positions, cache, reporting, split.step, **kwargs)
            collect_reported(reports, split.step, reported)
            stepped[:, index if split.above else (t if keep_hidden else 0)] = out[:, 0]
        if split.above:
            leaving = run_segment(
                model, split.above, stepped if split.step else entering, segment, position_ids, cache, reports, **kwargs
            )
        elif not split.step:  # no cyclic block: the layers below were the whole stack
            leaving = entering
        else:
            continue  # the token steps wrote the result
        if keep_hidden:
            hidden[:, tokens.start : tokens.stop] = leaving
        else:
            hidden[:, 0] = leaving[:, -1]
    return hidden, None if reports is None else joined_reports(reports)


def sequential_prefill(
    model,
    inputs_embeds: torch.Tensor,
    attention_mask,
    position_ids: torch.Tensor,
    cache: Cache | None,
    reporting: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, list | None]:
    """``model.forward_layers`` token by token: ``inputs_embeds`` ``(B, T, H)`` -> the last hidden states ``(B, T, H)``,
    equal to decoding the tokens one by one (the exact semantics), and the reported layer outputs (see ``run_tokens``).
    The tokens' KVs go to ``cache``, through the model's scratch cache where it starts empty (``models.scratch_cache``).
    """
    scratch = scratch_cache(model, inputs_embeds, cache)
    step_cache = scratch if scratch is not None else cache if cache is not None else DynamicCache(config=model.config)
    hidden, reported = run_tokens(
        model,
        lambda start, stop: inputs_embeds[:, start:stop],
        inputs_embeds.shape[1],
        attention_mask,
        position_ids,
        step_cache,
        keep_hidden=True,
        reporting=reporting,
        **kwargs,
    )
    if scratch is not None and cache is not None:
        copy_committed(scratch, cache)
    return hidden, reported


@torch.no_grad()
def prefill_cache(
    causal_lm, input_ids: torch.Tensor, cache: Cache, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Fill ``cache`` with ``input_ids`` ``(B, T)`` token by token, embedding one token per step and keeping only the
    last token's logits ``(B, 1, vocab)``: the prefill of a batch whose ``B x T x H`` prompt activations would not fit.

    Afterwards ``generate`` continues from the cache exactly as after ``causal_lm(input_ids, cache=cache)`` under
    ``prefill="sequential"``. ``attention_mask`` is the 2D padding mask ``(B, P + T)`` (None: no padding).
    """
    model = causal_lm.model
    batch_size, query_length = input_ids.shape
    past_length = int(cache.get_seq_length())
    if attention_mask is None:
        attention_mask = torch.ones(batch_size, past_length + query_length, dtype=torch.long, device=input_ids.device)
    # As generate numbers them: real tokens count from 0, padding gets 1 (its keys are masked anyway).
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)[:, past_length:]
    model.check_positions(past_length + query_length)
    hidden, _ = run_tokens(
        model,
        lambda start, stop: model.embed_tokens(input_ids[:, start:stop]),
        query_length,
        attention_mask,
        position_ids,
        cache,
        keep_hidden=False,
    )
    return causal_lm.lm_head(hidden)


__all__ = [
    "PREFILL_MODES",
    "choose_prefill",
    "every_forward_sequential",
    "prefill_cache",
    "sequential_prefill",
    "uses_sequential_prefill",
]
