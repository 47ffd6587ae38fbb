"""`transformers serve --trust-remote-code` serves an exported LCKV checkpoint: a real OpenAI client gets the greedy
completion our `generate` gives, streamed and not, on /v1/completions and /v1/chat/completions, four requests at once;
a bad request is an HTTP error and the server goes on serving."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from bench.transformers_server import transformers_server
from models.export import export_checkpoint
from tests.conftest import tiny_config, tiny_model

NEW_TOKENS = 8
STARTUP_SECONDS = 180
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
WORDS = (
    "the quick brown fox jumps over a lazy dog while seven tired wizards quietly brew strong coffee near old bridges"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A ~150-token BPE over ASCII words with a chat template: every token decodes to whole characters, so streamed
    text (decoded token by token) and the full decode agree whatever tokens a random model picks."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False)
    tokenizer.train_from_iterator([WORDS] * 10, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, PreTrainedTokenizerFast]:
    """An exported opt-llama checkpoint (random weights, this project's LCKV layout) with the tiny tokenizer."""
    tokenizer = tiny_tokenizer()
    root = tmp_path_factory.mktemp("serving")
    config = tiny_config(vocab_size=len(tokenizer))
    tiny_model(config).save_pretrained(root / "repo_form")
    tokenizer.save_pretrained(root / "repo_form")
    export_checkpoint(root / "repo_form", root / "lckv-tiny")
    return root / "lckv-tiny", tokenizer


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """`transformers serve` in a fresh process that cannot import this repository; stopped at the end."""
    path, _ = checkpoint
    options = ["--device", "cpu"]
    with transformers_server(
        path, tmp_path_factory.mktemp("server"), options, STARTUP_SECONDS, {"HF_HUB_OFFLINE": "1"}
    ) as (process, url):
        yield url, process


def greedy_text(model, inputs: dict, tokenizer) -> tuple[str, int]:
    """What the server should answer: our greedy generate's new tokens, decoded as the server decodes them."""
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    new = tokens[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def ask(client, model_id: str, kind: str, text: str, stream: bool) -> tuple[str, int | None]:
    """One request; returns the generated text (streamed deltas joined) and, unstreamed, the completion token count."""
    options = dict(model=model_id, max_tokens=NEW_TOKENS, temperature=0, stream=stream)
    if kind == "completion":
        response = client.completions.create(prompt=text, **options)
        if stream:
            return "".join(chunk.choices[0].text for chunk in response if chunk.choices), None
        return response.choices[0].text, response.usage.completion_tokens
    response = client.chat.completions.create(messages=[{"role": "user", "content": text}], **options)
    if stream:
        return "".join(chunk.choices[0].delta.content or "" for chunk in response if chunk.choices), None
    return response.choices[0].message.content, response.usage.completion_tokens


def test_served_greedy_completions_equal_generate(checkpoint, server):
    path, tokenizer = checkpoint
    url, process = server
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # in-repo classes (`import models`)
    assert type(model).__module__ == "models.modeling_opt_llama"
    requests = [
        ("completion", "the quick brown fox jumps over", False),
        ("completion", "seven tired wizards quietly brew", True),
        ("chat", "a lazy dog near old bridges", False),
        ("chat", "strong coffee while the fox", True),
    ]
    expected = []
    for kind, text, _ in requests:
        if kind == "completion":
            inputs = tokenizer(text, return_tensors="pt")
        else:
            inputs = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        expected.append(greedy_text(model, dict(inputs), tokenizer))

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    with ThreadPoolExecutor(len(requests)) as pool:  # all four in flight at once
        answers = list(pool.map(lambda request: ask(client, str(path), *request), requests))
    for (kind, text, stream), (want_text, want_count), (got_text, got_count) in zip(
        requests, expected, answers, strict=True
    ):
        assert want_text and got_text == want_text, (kind, text, stream)
        assert stream or got_count == want_count

    for bad in (dict(prompt="fine", extra_body={"no_such_field": 1}), dict(prompt=[[1, 2, 3]])):
        with pytest.raises(openai.APIStatusError) as error:
            client.completions.create(model=str(path), max_tokens=2, **bad)
        assert 400 <= error.value.status_code < 500
    assert process.poll() is None
    assert ask(client, str(path), *requests[0]) == (expected[0][0], expected[0][1])  # still serving


def test_server_environment_drops_the_repository_only(tmp_path):
    """The server keeps carried packages on PYTHONPATH (a GPU machine's newer transformers) but never this
    repository, so it must load the checkpoint's bundled code."""
    from bench.transformers_server import REPO, environment_without_repo

    carried = str(tmp_path)
    env = environment_without_repo({"PYTHONPATH": f"{REPO}:{carried}::{REPO}/", "PYTHONSTARTUP": "x.py", "HOME": "/h"})
    assert env == {"PYTHONPATH": carried, "HOME": "/h"}
    assert environment_without_repo({"PYTHONPATH": str(REPO), "HOME": "/h"}) == {"HOME": "/h"}
