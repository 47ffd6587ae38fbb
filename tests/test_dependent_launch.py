"""Programmatic dependent launch (models/kernels/dependent_launch.py) and its command-line switch: when kernels launch
as dependents, and the one-line error where the switch cannot apply. The launches themselves need a Hopper GPU
(tests/test_dependent_launch_gpu.py): Triton's interpreter has no grid dependency control."""

import argparse

import pytest
import torch
from torch import nn
from torch._inductor import config as inductor_config

from models.kernels import dependent_launch as pdl
from tools.cli import UsageError, add_decode_kernel_options, set_decode_kernel_options


@pytest.mark.parametrize("capability, expected", [(8, False), (9, True), (10, True)])
def test_cuda_devices_from_hopper_on_support_it(monkeypatch, capability, expected):
    monkeypatch.setattr(pdl, "compute_capability", lambda index: capability)  # no GPU here
    assert pdl.supports_dependent_launch(torch.device("cuda", 0)) is expected
    with inductor_config.patch({"triton.enable_pdl": True}):
        assert pdl.dependent_launch(torch.device("cuda", 0)) is expected
    with inductor_config.patch({"triton.enable_pdl": False}):
        assert not pdl.dependent_launch(torch.device("cuda", 0))


def test_never_on_the_cpu():
    with inductor_config.patch({"triton.enable_pdl": True}):
        assert not pdl.supports_dependent_launch(torch.device("cpu"))
        assert not pdl.dependent_launch(torch.device("cpu"))


def test_enable_sets_inductors_switch():
    with inductor_config.patch({"triton.enable_pdl": False}):
        pdl.enable_dependent_launch()
        assert inductor_config.triton.enable_pdl


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_decode_kernel_options(parser)
    return parser.parse_args(flags)


def test_flag_where_it_cannot_apply_is_a_usage_error():
    with inductor_config.patch({"triton.enable_pdl": False}):
        with pytest.raises(UsageError, match=r"--dependent_launch: not supported for a model on cpu; allowed on"):
            set_decode_kernel_options(nn.Linear(4, 4), parse("--dependent_launch"))
        assert not inductor_config.triton.enable_pdl  # nothing half set


def test_without_the_flag_the_switch_stays_as_it_was():
    with inductor_config.patch({"triton.enable_pdl": False}):
        set_decode_kernel_options(nn.Linear(4, 4), parse())
        assert not inductor_config.triton.enable_pdl
