"""The batch-1 GEMV takes in the RMSNorm before it and the residual add after it: a pass over a compiled step's graph.

At one row a decoder layer is a chain of short kernels, and each costs a fixed few microseconds besides its bytes
(docs/fast_decode.md, "Where the batch-1 step's time goes"). Two of every layer's kernels are inductor's residual add +
RMSNorm, each feeding one GEMV (the fused Q/K/V or Q projection, the fused gate/up projection). This pass rewrites, in
the graph inductor compiles (after its own passes: ``post_grad_custom_post_pass``),

- ``residual + gemv(x)`` (the attention's output projection, the MLP's down projection) into one GEMV whose programs
  add the residual to their outputs, and
- ``gemv(RMSNorm(hidden))`` (Llama's RMSNorm as transformers and ``PlainRMSNorm`` write it; the SiLU-gated GEMV too)
  into one GEMV whose programs compute the row's statistics and normalise the input as they read it; and
  ``gemv(RMSNorm(hidden)[:, s])``, the LM head reading the final norm's last positions (``logits_to_keep``), into the
  same GEMV of ``hidden[:, s]`` (the norm is per row, so it commutes with a slice of rows),

so a layer's two add + norm kernels, and the final norm's, are gone (``triton_gemv.small_batch_gemv_fused``). It
applies to whatever model runs the GEMV (``small_batch_linear.py``): an LCKV model and a transformers Llama alike, no
module changed.

Rounding is Llama's: the product rounded to the model's dtype before the residual is added, the normalised row
rounded before the norm's weight multiplies it and again after. The statistics' float32 sum runs in another order than
inductor's (each program sums the whole row): results equal to rounding.

``enable_gemv_fusion()`` installs the pass for what the calling thread compiles from then on (the tools compile in
their main thread); the pass is part of the compiled-graph cache key (``uuid``), so a graph compiled without it is not
reused, and the other way round.
"""

import functools
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import (
    CallFunction,
    Ignored,
    KeywordArg,
    Match,
    PatternExpr,
    PatternMatcherPass,
    register_graph_pattern,
)

from .small_batch_linear import unit_stride_rows

aten, prims = torch.ops.aten, torch.ops.prims
RESHAPES = (aten.reshape.default, aten.view.default)
# The dtypes whose RMSNorm computes its statistics in float32 between two casts (float32: no casts)
CAST_DTYPES = (torch.bfloat16, torch.float16)
COUNTER = "lckv_gemv_fusion"  # torch._dynamo.utils.counters[COUNTER]: rewrites by kind, for tests and benchmarks


def rms_norm_pattern(casts: bool) -> PatternExpr:
    """Llama's RMSNorm of ``hidden`` as the graph holds it: ``norm_weight * to(dtype)(h * rsqrt(mean(h^2, -1) +
    eps))`` with ``h = hidden`` in float32 (``casts``: cast from and back to ``dtype``; else a float32 model's, no
    casts)."""
    hidden = KeywordArg("hidden")
    upcast = CallFunction(prims.convert_element_type.default, hidden, torch.float32, _users=2) if casts else hidden
    variance = CallFunction(aten.mean.dim, CallFunction(aten.pow.Tensor_Scalar, upcast, 2), [-1], True)
    inverse_rms = CallFunction(aten.rsqrt.default, CallFunction(aten.add.Tensor, variance, KeywordArg("eps")))
    normalised = CallFunction(aten.mul.Tensor, upcast, inverse_rms)
    if casts:
        normalised = CallFunction(prims.convert_element_type.default, normalised, KeywordArg("dtype"))
    return CallFunction(aten.mul.Tensor, KeywordArg("norm_weight"), normalised)


def gemv_call(op, x: PatternExpr) -> PatternExpr:
    """``op(x, weight, block_n, block_k, num_warps)``: a GEMV as ``SmallBatchLinear`` puts it in the graph."""
    launch = (KeywordArg("block_n"), KeywordArg("block_k"), KeywordArg("num_warps"))
    return CallFunction(op, x, KeywordArg("weight"), *launch)


def value(node) -> torch.Tensor | None:
    """The fake tensor the graph records for ``node`` (None for a constant)."""
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def keyword_free(match: Match, target) -> bool:
    """Whether every node of ``match`` calling ``target`` has no keyword arguments (the matcher ignores keywords a
    pattern does not name: an add's ``alpha``, a mean's ``dtype``)."""
    return all(not node.kwargs for node in match.nodes if node.target == target)


def normed_input_is_llamas(match: Match) -> bool:
    """Whether the matched norm is what the fused kernel computes: a 1-D weight over the last dim, the row, the norm's
    weight and the GEMV's weight in one dtype, which is the dtype cast back to (or float32 without casts), a Python
    number for ``eps``, and the mean square in the row's float32 (no ``dtype`` for the mean)."""
    hidden, norm_weight, weight = (value(match.kwargs[name]) for name in ("hidden", "norm_weight", "weight"))
    if hidden is None or norm_weight is None or weight is None or not isinstance(match.kwargs["eps"], float | int):
        return False
    if not (keyword_free(match, aten.mean.dim) and keyword_free(match, aten.add.Tensor)):
        return False
    dtype = match.kwargs.get("dtype", torch.float32)  # no casts: a float32 model's norm
    return (
        ("dtype" not in match.kwargs or dtype in CAST_DTYPES)
        and hidden.dtype == norm_weight.dtype == weight.dtype == dtype
        and norm_weight.shape == (hidden.shape[-1],)
        and weight.shape[-1] == hidden.shape[-1]
    )


def residual_add_is_plain(match: Match) -> bool:
    """Whether the matched add is ``residual + product`` of one shape and dtype (no broadcasting, no promotion, no
    ``alpha``)."""
    residual, added = value(match.kwargs["residual"]), value(match.output_node())
    x, weight = value(match.kwargs["x"]), value(match.kwargs["weight"])
    return (
        residual is not None
        and keyword_free(match, aten.add.Tensor)
        and residual.shape == added.shape
        and added.numel() == x.shape[0] * weight.shape[0]
        and residual.dtype == added.dtype == x.dtype
    )


def fuse_norm(match: Match, silu_gated: bool, **kwargs) -> None:
    """Replace the matched ``gemv(RMSNorm(hidden))`` by one fused GEMV of ``hidden`` (``gemv(RMSNorm(hidden)[s])`` by
    one of ``hidden[s]``, where the pattern has the slice)."""
    eps, launch = float(kwargs["eps"]), (kwargs["block_n"], kwargs["block_k"], kwargs["num_warps"])
    row_slice = [kwargs[name] for name in ("slice_dim", "slice_start", "slice_end")] if "slice_dim" in kwargs else None

    def replacement(hidden, norm_weight, weight):
        if row_slice is not None:
            hidden = aten.slice.Tensor(hidden, *row_slice)
        flat = unit_stride_rows(hidden, hidden.numel() // hidden.shape[-1])
        scale = norm_weight.contiguous()  # the kernel reads it with unit stride
        return torch.ops.lckv.small_batch_gemv_fused(flat, weight, scale, eps, None, silu_gated, *launch)

    match.replace_by_example(replacement, [kwargs["hidden"], kwargs["norm_weight"], kwargs["weight"]])
    counters[COUNTER]["silu_gated_norm" if silu_gated else "norm"] += 1


def fuse_residual(match: Match, **kwargs) -> None:
    """Replace the matched ``residual + gemv(x)`` by one fused GEMV adding the residual."""
    launch = (kwargs["block_n"], kwargs["block_k"], kwargs["num_warps"])

    def replacement(x, weight, residual):
        flat = unit_stride_rows(residual, x.shape[0])
        return torch.ops.lckv.small_batch_gemv_fused(x, weight, None, 0.0, flat, False, *launch).view(residual.shape)

    match.replace_by_example(replacement, [kwargs["x"], kwargs["weight"], kwargs["residual"]])
    counters[COUNTER]["residual"] += 1


@functools.cache
def patterns() -> PatternMatcherPass:
    """The pass's patterns, registered once (the GEMV ops exist once ``triton_gemv`` is imported)."""
    from . import triton_gemv  # noqa: F401  (registers the lckv GEMV ops)

    lckv = torch.ops.lckv
    matcher = PatternMatcherPass(pass_name="lckv_gemv_fusion")
    row_slice = (KeywordArg("slice_dim"), KeywordArg("slice_start"), KeywordArg("slice_end"))
    for op, silu_gated in ((lckv.small_batch_gemv.default, False), (lckv.small_batch_silu_gated_gemv.default, True)):
        handler = functools.partial(fuse_norm, silu_gated=silu_gated)
        for casts in (True, False):
            normed = rms_norm_pattern(casts)
            pattern = gemv_call(op, CallFunction(RESHAPES, normed, Ignored()))
            register_graph_pattern(pattern, extra_check=normed_input_is_llamas, pass_dict=matcher)(handler)
            # Any slice the check lets through takes whole rows: the GEMV's columns are the norm's whole last dim
            sliced = CallFunction(aten.slice.Tensor, normed, *row_slice)
            pattern = gemv_call(op, CallFunction(RESHAPES, sliced, Ignored()))
            register_graph_pattern(pattern, extra_check=normed_input_is_llamas, pass_dict=matcher)(handler)
    product = CallFunction(RESHAPES, gemv_call(lckv.small_batch_gemv.default, KeywordArg("x")), Ignored())
    for operands in ((KeywordArg("residual"), product), (product, KeywordArg("residual"))):
        pattern = CallFunction(aten.add.Tensor, *operands)
        register_graph_pattern(pattern, extra_check=residual_add_is_plain, pass_dict=matcher)(fuse_residual)
    return matcher


class GemvFusion(CustomGraphPass):
    """The rewrites of this module's docstring, as inductor's post-grad custom pass."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        patterns().apply(graph)

    def uuid(self) -> bytes:
        """What the compiled-graph cache key records of this pass: its source and the fused kernel's."""
        here = Path(__file__).parent
        return get_hash_for_files((str(here / "gemv_fusion.py"), str(here / "triton_gemv.py")))


def supports_gemv_fusion() -> bool:
    """Whether inductor's post-grad custom pass is free for this one (not another library's)."""
    return isinstance(inductor_config.post_grad_custom_post_pass, GemvFusion | None)


def enable_gemv_fusion() -> None:
    """``GemvFusion`` for every step the calling thread compiles from now on (the whole process on a torch whose
    inductor config is not per thread)."""
    inductor_config.post_grad_custom_post_pass = GemvFusion()
