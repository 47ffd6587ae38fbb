"""GPU checks (skipped without CUDA): offloaded vs resident caches in bf16 at TinyLlama shape."""

import pytest
import torch

from .conftest import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("name", ["tinyllama_opt.json", "tinyllama.json"])
@pytest.mark.parametrize("offload", ["offloaded", "offloaded_static"])
def test_offloaded_generation_equals_resident(name, offload):
    from transformers import AutoModelForCausalLM

    prompt_len, new_tokens = 4096, 256
    config = tiny_config(name, max_position_embeddings=prompt_len + new_tokens)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    ids = torch.randint(3, config.vocab_size, (1, prompt_len), device="cuda")
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    resident_impl = "static" if offload == "offloaded_static" else "dynamic"
    with torch.no_grad():
        resident = model.generate(ids, cache_implementation=resident_impl, **kwargs)
        offloaded = model.generate(ids, cache_implementation=offload, **kwargs)
    assert torch.equal(resident, offloaded), f"first differing position {(resident != offloaded).nonzero()[0].tolist()}"
