"""Programmatic dependent launch (PDL, Hopper and later) for this repository's Triton kernels.

A decode step at batch 1 is some 300 short kernels in a row (docs/fast_decode.md); each pays a ramp-up before its
first bytes arrive and a tail while its last programs finish. Under PDL a kernel is launched while the one before it
in the stream is still running: it reads what does not depend on its predecessor (a GEMV's weights) and then waits
(``gdc_wait``) for the predecessor to complete; once every program of a kernel is past its wait, the next kernel may
launch (``gdc_launch_dependents``), so its start overlaps this one's tail. torch's inductor generates the same for
the compiled step's own kernels under ``torch._inductor.config.triton.enable_pdl`` (``TORCHINDUCTOR_ENABLE_PDL=1``);
this repository's kernels follow that one switch, so a step is either PDL throughout or not at all.
"""

import torch
from torch._inductor import config as inductor_config

from .device_properties import compute_capability, cuda_index

PDL_CAPABILITY = 9  # Hopper: griddepcontrol


def supports_dependent_launch(device: torch.device) -> bool:
    """Whether kernels on ``device`` can launch as programmatic dependents: a CUDA device of compute capability 9 or
    more, with a torch whose inductor has the switch (``enable_pdl``). Never the CPU (Triton's interpreter)."""
    if device.type != "cuda" or not hasattr(inductor_config.triton, "enable_pdl"):
        return False
    return compute_capability(cuda_index(device)) >= PDL_CAPABILITY


def dependent_launch(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch as programmatic dependents now: inductor's switch is on and the device
    supports it."""
    return getattr(inductor_config.triton, "enable_pdl", False) and supports_dependent_launch(device)


def enable_dependent_launch() -> None:
    """Programmatic dependent launch for the compiled steps (inductor's switch, read when a step is compiled) and this
    repository's Triton kernels (which read it at each launch, so also in eager forwards), of the calling thread: torch
    2.13 keeps inductor's config per thread (2.11 for the process); the tools compile and generate in their main
    thread."""
    inductor_config.triton.enable_pdl = True
