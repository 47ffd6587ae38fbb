"""Tensor-parallel inference helpers: the process layout ``torchrun`` gives, and models sharded with transformers'
``tp_plan="auto"`` (DTensor; gloo on the CPU, NCCL on GPUs).

The plan is the config's ``base_model_tp_plan`` (Llama's, inherited: q/k/v/o and the MLP split by heads and
features) and the causal LM's ``_tp_plan`` (the vocabulary split, logits gathered). Each process computes its share
of the query and KV heads; a condensed layer has no k/v projection and reads its source layer's share, which holds
the KV heads its own query heads use (query head ``h`` reads KV head ``h // G`` and both are split in contiguous
blocks), so the shared KV needs no communication. The cache of each process holds its share of the KV heads of the
KV layers only.
"""

import os

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.distributed import DistributedConfig
from transformers.distributed.tensor_parallel import get_kv_heads_per_rank
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING


def world_size() -> int:
    """Processes ``torchrun`` started (1 outside ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 under ``torchrun``, or the only process: the one that writes results."""
    return os.environ.get("RANK", "0") == "0"


def end_process_group() -> None:
    """Leave the process group that sharded loading joined (transformers initialises it under ``torchrun``), so
    NCCL shuts down cleanly at exit; nothing outside ``torchrun``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def build_sharded(config: PretrainedConfig, dtype: torch.dtype, **kwargs) -> PreTrainedModel:
    """A causal LM of ``config`` with random weights, sharded over the ``torchrun`` processes (``tp_plan="auto"``).

    Each process initialises only its own shards, on its own device (``cuda:LOCAL_RANK``, or the CPU), which is what
    lets a model larger than one GPU be built: transformers' loading path with an empty state dict.
    """
    check_heads_split(config, world_size())
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return model_class.from_pretrained(
        None, config=config, state_dict={}, distributed_config=DistributedConfig(tp_plan="auto"), dtype=dtype, **kwargs
    ).eval()


def config_tp_size(config: PretrainedConfig) -> int:
    """Tensor-parallel processes a model of ``config`` is split over: ``from_pretrained`` records its
    ``DistributedConfig`` in the config (FSDP leaves ``tp_size`` at 1: its shards are gathered before a layer runs)."""
    return getattr(getattr(config, "distributed_config", None), "tp_size", None) or 1


def kv_heads_per_process(model: PreTrainedModel) -> int:
    """KV heads of one layer that this process computes and caches: all of them, or its share when tensor parallelism
    splits the KV projections (``tp_plan``). Works on the causal LM and on its base model: they share the config, in
    which ``from_pretrained`` records the ``DistributedConfig`` (``config_tp_size``)."""
    heads = model.config.num_key_value_heads
    tp_size = config_tp_size(model.config)
    if tp_size == 1:
        return heads
    per_process = get_kv_heads_per_rank(model.tp_plan, heads, tp_size)
    if per_process is None:  # transformers' answer for heads that do not split evenly
        check_heads_split(model.config, tp_size)
    return per_process


def check_heads_split(config: PretrainedConfig, processes: int) -> None:
    """ValueError naming the field unless every attention's query and KV heads split evenly over ``processes``
    tensor-parallel processes (each takes whole heads)."""
    for field in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, field)
        if heads % processes:
            raise ValueError(
                f"{field}: {heads} heads do not split over {processes} tensor-parallel processes; allowed are "
                f"multiples of {processes} (or fewer processes)"
            )
