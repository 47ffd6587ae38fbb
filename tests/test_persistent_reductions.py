"""One-pass row reductions in inductor's kernels (models/kernels/persistent_reductions.py) and their command-line
switch: which reductions it makes persistent, how it reaches inductor and its cache key, and the one-line error where
it cannot apply. Inductor writes Triton kernels only for a GPU (a CPU's are C++), so what it compiles with the choice
is checked on one (tests/test_persistent_reductions_gpu.py)."""

import argparse
from types import SimpleNamespace

import pytest
import sympy
import torch
from torch import nn
from torch._inductor import config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.sizevars import SizeVarAllocator
from torch._inductor.virtualized import V

from models.kernels.persistent_reductions import (
    WIDE_ROW_LIMIT,
    WidePersistentReductions,
    enable_wide_persistent_reductions,
    supports_wide_persistent_reductions,
)
from tools.cli import UsageError, add_decode_kernel_options, set_decode_kernel_options


class Features(SimpleNamespace):
    """What the heuristic reads of a kernel: its reduction's hint, the values along the reduction and the rows."""

    def get_reduction_hint(self) -> ReductionHint:
        return self.hint


@pytest.fixture
def compiling():
    """A graph being compiled, as inductor's heuristics see it (its symbolic sizes)."""
    with V.set_graph_handler(SimpleNamespace(sizevars=SizeVarAllocator())):
        yield


@pytest.fixture
def restored():
    """Inductor's choices as they were before the test: the config's class and this thread's handler."""
    handler = V.choices
    with inductor_config.patch({"inductor_choices_class": None}):
        yield
    V.set_choices_handler(handler)


def persistent(choices, hint: ReductionHint, values: int, cooperative: bool = False) -> bool:
    features = Features(hint=hint, reduction_numel=sympy.Integer(values), numel=sympy.Integer(1))
    return choices.should_use_persistent_reduction(features, cooperative)


@pytest.mark.parametrize("values", [2048, 4096, 6656, WIDE_ROW_LIMIT])
def test_inner_reductions_up_to_the_limit_are_persistent(compiling, values):
    assert not persistent(InductorChoices, ReductionHint.INNER, values)  # the premise: inductor loops over them
    assert persistent(WidePersistentReductions, ReductionHint.INNER, values)


def test_everything_else_is_inductors_choice(compiling):
    for hint, values, cooperative in [
        (ReductionHint.INNER, 512, False),  # persistent already
        (ReductionHint.INNER, WIDE_ROW_LIMIT + 1, False),
        (ReductionHint.INNER, 4 * WIDE_ROW_LIMIT, False),
        (ReductionHint.OUTER, 2048, False),  # along a strided dimension: rows are read across programs
        (ReductionHint.DEFAULT, 2048, False),
        (ReductionHint.INNER, 2048, True),  # one row split over programs
    ]:
        expected = persistent(InductorChoices, hint, values, cooperative)
        assert persistent(WidePersistentReductions, hint, values, cooperative) == expected, (hint, values, cooperative)
    with inductor_config.patch({"triton.persistent_reductions": False}):
        assert not persistent(WidePersistentReductions, ReductionHint.INNER, 2048)


def test_enable_reaches_inductor_and_its_cache_key(restored):
    assert supports_wide_persistent_reductions()
    default_key = inductor_config.save_config_portable()
    enable_wide_persistent_reductions()
    assert inductor_config.inductor_choices_class is WidePersistentReductions
    assert isinstance(V.choices, WidePersistentReductions)  # this thread's, kept by inductor from its first use
    key = inductor_config.save_config_portable()
    assert key != default_key
    if hasattr(inductor_config, "_cache_config_factory_keys"):  # torch 2.13: the uuid (2.11 pickles the class)
        uuid = f"{WidePersistentReductions.__module__}.WidePersistentReductions:{WIDE_ROW_LIMIT}"
        assert key["inductor_choices_class"] == uuid
    assert supports_wide_persistent_reductions()  # enabling twice is fine


def test_another_librarys_choices_are_not_replaced(restored):
    inductor_config.inductor_choices_class = InductorChoices
    assert not supports_wide_persistent_reductions()


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_decode_kernel_options(parser)
    return parser.parse_args(flags)


def test_flag_where_it_cannot_apply_is_a_usage_error(restored):
    with pytest.raises(UsageError, match=r"^--persistent_reductions: does not apply to a model on cpu; allowed on"):
        set_decode_kernel_options(nn.Linear(4, 4), parse("--persistent_reductions"))
    assert inductor_config.inductor_choices_class is None  # nothing half set


def test_flag_on_a_cuda_model(restored, monkeypatch):
    """The flag's path on a CUDA model, without a GPU: a model whose parameters report a CUDA device."""
    model = nn.Linear(4, 4)
    monkeypatch.setattr(nn.Linear, "parameters", lambda self: iter([SimpleNamespace(device=torch.device("cuda"))]))
    set_decode_kernel_options(model, parse("--persistent_reductions"))
    assert inductor_config.inductor_choices_class is WidePersistentReductions
    inductor_config.inductor_choices_class = InductorChoices
    with pytest.raises(UsageError, match="none set by another library"):
        set_decode_kernel_options(model, parse("--persistent_reductions"))


def test_without_the_flag_inductor_keeps_its_choices(restored):
    set_decode_kernel_options(nn.Linear(4, 4), parse())
    assert inductor_config.inductor_choices_class is None
