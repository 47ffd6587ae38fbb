"""LCKV models for transformers. ``import models`` registers model_types ``opt-llama`` and ``lckv-llama`` (the two
formats of the original LCKV code, one model) with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_opt_llama import LckvLlamaConfig, OptLlamaConfig
from .kernels.attention import PACKED_SDPA, register_packed_sdpa
from .kernels.decode_attention import SPLIT_KV, register_split_kv
from .modeling_opt_llama import LckvLlamaForCausalLM, LckvLlamaModel, OptLlamaForCausalLM, OptLlamaModel

# exist_ok: importing twice (or reloading) is fine.
AutoConfig.register(OptLlamaConfig.model_type, OptLlamaConfig, exist_ok=True)
AutoModel.register(OptLlamaConfig, OptLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(OptLlamaConfig, OptLlamaForCausalLM, exist_ok=True)
AutoConfig.register(LckvLlamaConfig.model_type, LckvLlamaConfig, exist_ok=True)
AutoModel.register(LckvLlamaConfig, LckvLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(LckvLlamaConfig, LckvLlamaForCausalLM, exist_ok=True)
register_packed_sdpa()  # attn_implementation="sdpa_packed_gqa", for opt-llama and Llama alike
register_split_kv()  # attn_implementation="sdpa_split_kv": decoding reads only the filled cache (Triton)

__all__ = [
    "PACKED_SDPA",
    "SPLIT_KV",
    "LckvLlamaConfig",
    "LckvLlamaForCausalLM",
    "LckvLlamaModel",
    "OptLlamaConfig",
    "OptLlamaForCausalLM",
    "OptLlamaModel",
]
