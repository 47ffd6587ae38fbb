"""Facts of a CUDA device that stay fixed for a process (its multiprocessor count, its compute capability), read by
code that runs both eagerly and inside a compiled decode step.

Each is looked up when first asked (not at import, which would create a CUDA context before a process picks its GPU;
torch keeps the device's properties once read) and is a constant to TorchDynamo (``assume_constant_result``): a trace
bakes the value in and guards on nothing. A lookup cached in a module-level dict instead made dynamo guard on that
dict's contents: the step traced before the first lookup was compiled again right after it, and the recompiled
step's CUDA graph was recorded inside the first timed window of a benchmark.
"""

import torch


def cuda_index(device: torch.device) -> int:
    """The CUDA device index of ``device`` (the current device for a bare ``"cuda"``)."""
    return device.index if device.index is not None else torch.cuda.current_device()


@torch.compiler.assume_constant_result
def multiprocessor_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index``."""
    return torch.cuda.get_device_properties(index).multi_processor_count


@torch.compiler.assume_constant_result
def compute_capability(index: int) -> int:
    """The major compute capability of CUDA device ``index`` (9: Hopper)."""
    return torch.cuda.get_device_capability(index)[0]
