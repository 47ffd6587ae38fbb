"""``LCKV_*`` environment flags: parsing, and the one-line warning when a requested kernel cannot run."""

import logging
import os
from collections.abc import Mapping

import torch
from transformers.utils.import_utils import is_triton_available

FLASH_ATTN = "LCKV_FLASH_ATTN"
FUSED_RMSNORM = "LCKV_FUSED_RMSNORM"
FUSED_ROTARY = "LCKV_FUSED_ROTARY"
FUSED_SWIGLU = "LCKV_FUSED_SWIGLU"
FUSED_CROSSENTROPY = "LCKV_FUSED_CROSSENTROPY"
FLAGS = (FLASH_ATTN, FUSED_RMSNORM, FUSED_ROTARY, FUSED_SWIGLU, FUSED_CROSSENTROPY)
ON, OFF = "1", "0"

logger = logging.getLogger(__name__)


def flag_enabled(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """True for ``name=1``, False for ``0`` or unset; any other value is a ValueError naming the flag."""
    value = (os.environ if environ is None else environ).get(name, OFF)
    if value not in (ON, OFF):
        raise ValueError(f"{name}={value!r}: allowed values are 1 (on) and 0 or unset (off)")
    return value == ON


def warn_fallback(name: str, reason: str, fallback: str) -> None:
    """One warning line: which flag, why it cannot take effect, what runs instead."""
    logger.warning("%s=1 falls back: %s; using %s", name, reason, fallback)


def triton_devices(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The device types this repository's Triton kernels run on here: CUDA when there is a GPU, the CPU when
    ``TRITON_INTERPRET=1`` in ``environ`` (default ``os.environ``; Triton's interpreter); none without Triton (the
    check the kernel modules guard their Triton import with)."""
    environ = os.environ if environ is None else environ
    devices = {"cuda"} if torch.cuda.is_available() else set()
    if environ.get("TRITON_INTERPRET") == "1":
        devices.add("cpu")
    return frozenset(devices) if is_triton_available() else frozenset()
