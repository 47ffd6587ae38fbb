"""Exact batched prefill of an LCKV model: the prompt goes through the model one token at a time.

The iterative prefill runs the cyclic block ``num_encoders + 1`` times over the whole prompt (about 8x a Llama's
work) and is exact only for the first ``num_encoders + 1`` tokens. Feeding the prompt token by token through the
decoding step is the exact semantics and costs a Llama's work; it pays with ``T`` sequential steps, which at a
large batch are full GPU steps. With a static cache on CUDA every step is the same compiled, CUDA-graph-captured
function (masks and positions are built outside and passed in as tensors, the cache's fill position is a tensor),
so the loop replays one graph instead of launching eager layers.

``config.prefill`` picks the path of evaluation-mode (``model.eval()``) multi-token forwards that fill a cache:
``"iterative"`` (default), ``"sequential"`` or ``"auto"`` (``choose_prefill``). ``config.sequential_forward`` forces
this path for every evaluation-mode multi-token forward, cache or not. Training mode (``model.train()``) always runs
the iterations.

Shapes: ``B`` batch, ``T`` prompt tokens, ``P`` tokens already cached, ``S`` key slots (static cache length),
``H`` hidden size.
"""

from collections.abc import Callable, Iterator
from functools import cache as memoize

import torch
from transformers.cache_utils import Cache, DynamicCache, StaticLayer

from .masks import lckv_masks, reads_window_cache
from .prefill_modes import PREFILL_MODES, choose_prefill
from .roofline import device_hardware
from .tensor_parallel import config_tp_size

MASK_CHUNK = 64  # prompt tokens whose one-step masks are cut from one mask build (static caches)


def uses_sequential_prefill(config, inputs_embeds: torch.Tensor, cache: Cache | None) -> bool:
    """Whether an evaluation-mode forward of ``inputs_embeds`` ``(B, T, H)``, ``T > 1``, runs token by token: under
    ``"auto"`` priced for its batch, length, dtype and device (``choose_prefill``)."""
    if config.sequential_forward:
        return True
    if cache is None:
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
    if not getattr(cache, "is_compileable", False) or getattr(cache, "offloading", False) or windowed:
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
    **kwargs,
) -> tuple[torch.Tensor, list | None]:
    """One token through every layer: ``(B, 1, H)`` -> final hidden state ``(B, 1, H)``; commits its KVs to ``cache``.
    With ``reporting`` also the layer outputs the model reports (``output_hidden_states``): per layer
    ``(input (B, 1, H), output (B, 1, H), None)``; else None."""
    output = model.forward_layers(inputs_embeds, masks, position_ids, cache, reporting, **kwargs)
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


def mask_row(mask, t: int):
    """Step ``t``'s one-query slice of a prompt mask: 4D ``(B, 1, T, S)`` -> ``(B, 1, 1, S)``, ``visible``
    ``(B, T, 1)`` -> ``(B, 1, 1)``; a ``step_input``, so every step hands the compiled step the same layout."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"prefill: a sequential prefill cannot split a precomputed {type(mask).__name__} mask per token; "
            "allowed are tensor masks (eager, sdpa, sdpa_packed_gqa attention)"
        )
    return step_input(mask[:, :, t : t + 1] if mask.dim() == 4 else mask[:, t : t + 1])


def step_masks(model, inputs_embeds, attention_mask, position_ids, cache, past_length: int) -> Iterator[dict]:
    """The masks of each one-token step, as the decoding step gets them.

    A dict is ``generate``'s precomputed prompt masks for a static cache (row ``t`` is step ``t``'s mask; rebuilt per
    step where a layer reads a window-only cache); a 2D
    padding mask ``(B, P + T)`` (or None: no padding) is cut to the keys up to each token and built per step,
    exactly as ``generate`` builds a decoding step's masks. A dict with a mask left out (SDPA's ``is_causal``
    shortcut, taken only without padding) has no one-token row, so it is rebuilt as unpadded.
    """
    batch_size, query_length = inputs_embeds.shape[:2]
    # A window-only cache layer's mask has as many keys as the queries it was built for need: built per step.
    per_step = not getattr(cache, "is_compileable", False) or any(
        reads_window_cache(kind) for kind in model.mask_sizing
    )
    if isinstance(attention_mask, dict) and not per_step and all(mask is not None for mask in attention_mask.values()):
        for t in range(query_length):
            yield {name: mask_row(mask, t) for name, mask in attention_mask.items()}
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
        if stop - start == 1:
            yield masks
        else:
            for row in range(stop - start):
                yield {name: mask_row(mask, row) for name, mask in masks.items()}


def run_tokens(
    model,
    token_embeds: Callable[[int], torch.Tensor],
    query_length: int,
    attention_mask,
    position_ids: torch.Tensor,
    cache: Cache,
    keep_hidden: bool,
    reporting: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, list | None]:
    """Run ``query_length`` tokens one at a time through ``model`` (``OptLlamaModel``), committing to ``cache``.

    Args:
        token_embeds: ``t`` -> the ``(B, 1, H)`` input embedding of token ``t``.
        attention_mask: see ``step_masks``. position_ids: ``(B, T)``.
        keep_hidden: return every token's final hidden state ``(B, T, H)``; otherwise only the last ``(B, 1, H)``
            (a large batch then never holds ``B x T x H`` activations).
        reporting: also return, per reported layer output (``output_hidden_states``), every token's ``(B, T, H)``
            side by side; these steps run uncompiled.

    Returns:
        the hidden states, and the reported outputs (None unless ``reporting``).
    """
    past_length = int(cache.get_seq_length())
    first = token_embeds(0)
    hidden = first.new_empty(first.shape[0], query_length if keep_hidden else 1, first.shape[-1])
    # The compiled, graph-captured step is built for inference (traced without autograd, CUDA graphs replaying in-place
    # cache writes): a forward that records gradients (evaluation without no_grad) runs its steps eagerly.
    options = None if reporting or torch.is_grad_enabled() else compile_options(first.device, cache)
    compiled = compiled_token_step(tuple(sorted(options.items()))) if options is not None else None
    masks_iter = step_masks(model, first.expand(-1, query_length, -1), attention_mask, position_ids, cache, past_length)
    steps_reported = []
    for t, masks in enumerate(masks_iter):
        embeds = step_input(first if t == 0 else token_embeds(t))
        positions = step_input(position_ids[:, t : t + 1])
        # After the first step every static layer holds its buffers (allocated outside the compiled region).
        if compiled is not None and (t > 0 or statically_allocated(cache)):
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's output was already copied out
            out, reported = compiled(model, embeds, masks, positions, cache, **kwargs)
        else:  # CPU, a dynamic cache, reported outputs, or the step that allocates the static buffers
            out, reported = token_step(model, embeds, masks, positions, cache, reporting, **kwargs)
        steps_reported.append(reported)
        hidden[:, t if keep_hidden else 0] = out[:, 0]
    if not reporting:
        return hidden, None
    return hidden, [
        (
            torch.cat([step[i][0] for step in steps_reported], dim=1),
            torch.cat([step[i][1] for step in steps_reported], dim=1),
            None,
        )
        for i in range(len(steps_reported[0]))
    ]


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
    The tokens' KVs go to ``cache`` (to a scratch cache when it is None)."""
    step_cache = cache if cache is not None else DynamicCache(config=model.config)
    return run_tokens(
        model,
        lambda t: inputs_embeds[:, t : t + 1],
        inputs_embeds.shape[1],
        attention_mask,
        position_ids,
        step_cache,
        keep_hidden=True,
        reporting=reporting,
        **kwargs,
    )


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
        lambda t: model.embed_tokens(input_ids[:, t : t + 1]),
        query_length,
        attention_mask,
        position_ids,
        cache,
        keep_hidden=False,
    )
    return causal_lm.lm_head(hidden)


__all__ = ["PREFILL_MODES", "choose_prefill", "prefill_cache", "sequential_prefill", "uses_sequential_prefill"]
