import copy
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton kernels (sdpa_split_kv's decoding) run on CPU tensors through Triton's interpreter. Triton reads this
    # when it is imported (torch._dynamo imports it), so it is set before anything imports transformers.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import models  # noqa: E402,F401  (registers opt-llama)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def tiny_config(name: str = "test_tiny_opt.json", **overrides):
    """A config from configs/ with fields overridden, built through AutoConfig like a user would."""
    from transformers import AutoConfig

    fields = json.loads((CONFIGS / name).read_text())
    fields.update(overrides)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def tiny_lckv_llama_config(layer_types: str, **fields):
    """An lckv-llama config (the original code's later format) of test_tiny_opt.json's dimensions and 6 layers:
    ``layer_types`` and any other lckv-llama ``fields`` (iterations, sliding window)."""
    from models import LckvLlamaConfig

    dimensions = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
    shape = {k: v for k, v in tiny_config().to_dict().items() if k in (*dimensions, "max_position_embeddings")}
    return LckvLlamaConfig(**shape, num_hidden_layers=6, layer_types=layer_types, **fields)


def tiny_model(
    config, attn_implementation: str = "sdpa", seed: int = 0, dtype: torch.dtype = torch.float32, **model_kwargs
):
    """A randomly initialised model in eval mode; the weights are drawn in float32 whatever ``dtype`` (a float64 model
    holds the float32 model's values exactly). ``model_kwargs`` go to the model's constructor (``kernel_selection``).
    The model gets its own copy of ``config``: ``from_config`` writes the attention implementation into the config it
    is given, so two models built from one config object would otherwise both run the one built last."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        copy.deepcopy(config), attn_implementation=attn_implementation, dtype=torch.float32, **model_kwargs
    )
    return model.to(dtype).eval()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["1 thread", "3 threads"])
def num_threads(request):
    """Runs a test with ``torch.set_num_threads(1)`` and with 3: reductions split differently, so the rounding order
    changes; an oracle must hold both ways. A fixed 3, not the machine's cores: on a 1- or 2-core runner "all cores"
    would compare 1 thread with itself or with 2 only (more threads than cores is fine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1 if request.param == "1 thread" else 3)
    yield torch.get_num_threads()
    torch.set_num_threads(previous)


@pytest.fixture
def hub_offline(monkeypatch):
    """No hub for tools run in-process: the environment flag, and huggingface_hub's constant (read once at import)."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def corpus():
    """The embedded corpus (prepared once per run: text files and the local tokenizer)."""
    from corpus import prepare_corpus

    return prepare_corpus()


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A tokenizer and tiny opt-llama / llama configs (``tests/test_generation.py``'s ``make_tiny_files``), once per
    test module."""
    from .test_generation import make_tiny_files

    return make_tiny_files(tmp_path_factory.mktemp("generation"))


@pytest.fixture
def interpreted_split_kv():
    """The split-KV ops (decode, mask view) on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set at the
    top of this file)."""
    from models.kernels.decode_attention import load_split_kv_kernel

    return load_interpreted(load_split_kv_kernel, "tests/test_decode_attention_gpu.py")


@pytest.fixture
def interpreted_kernel(interpreted_split_kv):
    """The split-KV decode op on CPU tensors through Triton's interpreter."""
    return interpreted_split_kv.run


def load_interpreted(loader, gpu_tests: str):
    """``loader()``'s kernel for CPU tensors (Triton's interpreter); skips on a CUDA machine, where Triton compiles the
    kernel for the GPU and ``gpu_tests`` check it."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip(f"CUDA machine: Triton compiles the kernel for the GPU; {gpu_tests} checks it")
    kernel = loader()
    assert kernel is not None and "cpu" in kernel.devices
    return kernel
