"""Every exact switch of every tool reaches the model, for opt-llama (published and this project's layouts) and
lckv-llama, and is a one-line error where it cannot apply.

Each tool runs a saved checkpoint with two iterations (``num_encoders=1``) on inputs longer than that, so the
iterative computation differs from the exact one. What the tool reports with the switch must equal the same
quantity computed here token by token through a KV cache (the definition of the exact semantics, independent of
``sequential_forward`` and ``models.sequential_prefill``), and must differ from the iterative quantity.
"""

import functools
import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

import run_clm
import run_generation
import run_streaming
import test_harness
import test_latency
from models import LckvLlamaConfig, OptLlamaConfig
from tools.cli import UsageError

from .conftest import CONFIGS
from .numerics import float32_error_bound

SHAPE = json.loads((CONFIGS / "test_tiny_opt.json").read_text())
LCKV_FIELDS = (
    "layer_types",
    "target_layer",
    "num_encoders",
    "num_trained_encoders",
    "train_kv",
    "force_nodiag",
    "iteration_style",
)
# Large random weights (initializer_range 0.5): the iterative and the exact computation differ visibly, greedy texts
# too.
COMMON = {k: v for k, v in SHAPE.items() if k not in LCKV_FIELDS} | {
    "vocab_size": 4096,
    "max_position_embeddings": 1024,
    "initializer_range": 0.5,
}
# The config.json of each kind as its users write it: two iterations, six layers, a cyclic block of four.
KINDS = {
    # The published release: the layout string as layer_types, no semantics fields (so the published semantics:
    # force_nodiag, iteration_style previous).
    "opt-llama-published": COMMON
    | {
        "model_type": "opt-llama",
        "layer_types": "0_1_1_1_2_0",
        "target_layer": -2,
        "num_encoders": 1,
        "num_trained_encoders": 0,
    },
    # This project's general layout: a per-layer KV source list (layers 1-3 read the target 4 above them), read with
    # this project's semantics defaults (force_nodiag False, iteration_style "current").
    "opt-llama-kv-sources": COMMON
    | {"model_type": "opt-llama", "kv_sources": [0, 4, 4, 4, 4, 5], "num_encoders": 1, "num_trained_encoders": 0},
    # The later format of the original code: its to_dict has no sequential_forward (use_sequential instead).
    "lckv-llama": COMMON
    | {"model_type": "lckv-llama", "layer_types": "0_4_4_4_4_5", "forward_passes": 1, "backward_passes": 1},
}
PROMPT = "KING.\nWhat, ho!"  # 7 tokens, more than the 2 iterations
NEW_TOKENS = 6


pytestmark = pytest.mark.usefixtures("hub_offline")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, corpus) -> dict[str, Path]:
    """Per kind (and a Llama of the same shape): a checkpoint directory with seeded random weights and the corpus
    tokenizer, whose config.json holds the kind's fields as written above."""
    root = tmp_path_factory.mktemp("exact_switches")
    tokenizer = AutoTokenizer.from_pretrained(corpus.tokenizer)
    out = {}
    for kind, fields in {**KINDS, "llama": COMMON | {"model_type": "llama"}}.items():
        out[kind] = root / kind
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config_of(fields)).save_pretrained(out[kind])
        saved = json.loads((out[kind] / "config.json").read_text())
        (out[kind] / "config.json").write_text(json.dumps(fields | {"architectures": saved["architectures"]}))
        tokenizer.save_pretrained(out[kind])
    return out


def config_of(fields: dict):
    return AutoConfig.for_model(**fields)


def load(path: Path, dtype: torch.dtype = torch.float32):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if isinstance(model.config, OptLlamaConfig):
        assert not model.config.sequential_forward and model.config.prefill == "iterative"
    return model


@torch.no_grad()
def token_by_token_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` -> ``(B, T, V)``: one token per forward through a KV cache (every forward is one token: exact)."""
    cache = DynamicCache(config=model.config)
    return torch.cat([model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(ids.shape[1])], dim=1)


@torch.no_grad()
def iterative_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def mean_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of ``ids`` ``(B, T)`` under ``logits`` ``(B, T, V)``, a float64 scalar."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten())


def float64_oracle(path: Path, ids: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """``score`` (of ``(B, T, V)`` logits) of the checkpoint at ``path`` in float64: token by token (``exact``) and
    iterative, and ``bound`` / ``iterative_bound``, what float32 rounding can do to each (tests/numerics.py). A tool's
    float32 result is exact when within ``bound`` of ``exact``; the check can fail: the iterative value is more than
    twice the bound away, so an iterative float32 result would land outside it."""
    model = load(path, torch.float64)
    oracle = {
        "exact": score(token_by_token_logits(model, ids)).item(),
        "bound": float32_error_bound(lambda: score(token_by_token_logits(model, ids))),
        "iterative": score(iterative_logits(model, ids)).item(),
        "iterative_bound": float32_error_bound(lambda: score(iterative_logits(model, ids))),
    }
    assert abs(oracle["iterative"] - oracle["exact"]) > 2 * oracle["bound"], oracle
    return oracle


@torch.no_grad()
def greedy_token_by_token(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation of ``ids`` ``(1, T)``, every token (prompt included) fed alone; EOS suppressed
    (--ignore_eos)."""
    cache = DynamicCache(config=model.config)
    for t in range(ids.shape[1]):
        logits = model(ids[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1]
    out = []
    for _ in range(new_tokens):
        logits[:, model.config.eos_token_id] = -math.inf
        out.append(logits.argmax(-1, keepdim=True))
        logits = model(out[-1], cache=cache, use_cache=True).logits[:, -1]
    return torch.cat(out, dim=1)


def direct_text(path: Path, exact: bool) -> str:
    """The greedy text of ``PROMPT`` computed here: token by token (exact) or as the iterative cached generate."""
    model, tokenizer = load(path), AutoTokenizer.from_pretrained(path)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids.shape[1] > model.config.num_encoders + 1  # the iterative prefill is approximate on this prompt
    if exact:
        new = greedy_token_by_token(model, ids, NEW_TOKENS)
    else:
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        new = out[:, ids.shape[1] :]
    return tokenizer.batch_decode(new, skip_special_tokens=True)[0]


@pytest.fixture(scope="module")
def texts(checkpoints) -> dict[str, dict[str, str]]:
    """Per kind: the exact and the iterative greedy text; they differ (else the generation tests could not fail)."""
    out = {
        kind: {"exact": direct_text(checkpoints[kind], True), "iterative": direct_text(checkpoints[kind], False)}
        for kind in KINDS
    }
    for kind, pair in out.items():
        assert pair["exact"] != pair["iterative"], kind
    return out


def one_line_error(capsys, main, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err, err
    return err


# ----------------------------------------------------------------------------- run_clm.py --eval_sequential


@pytest.mark.parametrize("kind", KINDS)
def test_run_clm_eval_sequential_is_the_token_by_token_loss(kind, checkpoints, corpus, tmp_path, capsys):
    validation = tmp_path / "validation.txt"
    validation.write_text(corpus.validation.read_text()[:3000])
    args = [
        "--model_name_or_path",
        str(checkpoints[kind]),
        "--validation_file",
        str(validation),
        "--do_eval",
        "--block_size",
        "16",
        "--max_eval_samples",
        "4",
        "--per_device_eval_batch_size",
        "4",
        "--output_dir",
        str(tmp_path / "out"),
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--dataloader_pin_memory",
        "false",
    ]
    result = run_clm.main([*args, "--eval_sequential"])
    assert result["eval"]["eval_sequential"] is True
    reported = result["eval"]["eval_loss"]

    ids = torch.tensor(result["trainer"].eval_dataset["input_ids"])
    assert ids.shape == (4, 16)
    oracle = float64_oracle(checkpoints[kind], ids, lambda logits: mean_nll(logits, ids))
    print(f"{kind}: run_clm --eval_sequential loss {reported:.6f}; float64 {oracle}")
    assert abs(reported - oracle["exact"]) <= oracle["bound"]
    without = run_clm.main(args)["eval"]["eval_loss"]  # without the switch: iterative
    assert abs(without - oracle["iterative"]) <= oracle["iterative_bound"]
    # A checkpoint saved with the exact prefill (use_cache False, as the Trainer saves it) is evaluated exactly.
    args[args.index("--model_name_or_path") + 1] = str(saved_with_exact_prefill(checkpoints[kind], tmp_path))
    saved = run_clm.main(args)["eval"]
    assert saved["eval_sequential"] is True and abs(saved["eval_loss"] - oracle["exact"]) <= oracle["bound"]


# ----------------------------------------------------------------------------- test_harness.py --sequential


@pytest.fixture(scope="module")
def short_task(tmp_path_factory, corpus) -> tuple[Path, str]:
    """A task folder holding ``lckv_short_ppl``: the held-out perplexity task of ``tasks/`` with one short document
    (a few dozen tokens, so the token-by-token runs stay short); returns the folder and the document."""
    folder = tmp_path_factory.mktemp("tasks") / "tasks"
    folder.mkdir()
    text = corpus.validation.read_text()[:200].strip()
    task = (test_harness.TASKS_DIR / "lckv_heldout_ppl.yaml").read_text()
    task = task.replace("task: lckv_heldout_ppl", "task: lckv_short_ppl").replace(
        "lckv_data.heldout_ppl", "short_doc.dataset"
    )
    (folder / "lckv_short_ppl.yaml").write_text(task)
    (folder / "short_doc.py").write_text(
        "import datasets\n\n\ndef dataset(**kwargs):\n"
        f"    return datasets.DatasetDict({{'test': datasets.Dataset.from_list([{{'text': {text!r}}}])}})\n"
    )
    return folder, text


def saved_with_exact_prefill(checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of ``checkpoint`` whose config asks for the exact prefill and has ``use_cache`` False, as the Trainer
    saves it (so the model's forwards build no cache)."""
    copy = tmp_path / "exact_prefill"
    shutil.copytree(checkpoint, copy)
    fields = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(fields | {"prefill": "sequential", "use_cache": False}))
    return copy


HARNESS_EXACT = [(kind, "--sequential") for kind in KINDS] + [
    ("opt-llama-kv-sources", "LCKV_EVAL_SEQUENTIAL=1"),
    ("opt-llama-published", "checkpoint prefill"),
    ("lckv-llama", "checkpoint prefill"),
]


@pytest.mark.parametrize(("kind", "asked"), HARNESS_EXACT)
def test_harness_sequential_is_the_token_by_token_perplexity(
    kind, asked, checkpoints, short_task, tmp_path, monkeypatch
):
    """Asked by the flag, the env flag, or a checkpoint saved with the exact prefill (whose forwards build no cache:
    without the rule its metric was the iterative one), the harness reports the token-by-token perplexity, and says
    so in its results."""
    import lm_eval.tasks

    folder, text = short_task
    monkeypatch.setattr(test_harness, "TASKS_DIR", folder)
    # lm-eval's own task index (seconds to build) is of no use here: only the task folder is indexed.
    monkeypatch.setattr(
        lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager, include_defaults=False)
    )
    model, flags = str(checkpoints[kind]), []
    if asked == "--sequential":
        flags = ["--sequential"]
    elif asked == "LCKV_EVAL_SEQUENTIAL=1":
        monkeypatch.setenv("LCKV_EVAL_SEQUENTIAL", "1")
    else:
        model = str(saved_with_exact_prefill(checkpoints[kind], tmp_path))
    results = test_harness.main(["--model", model, "--tasks", "lckv_short_ppl", "--device", "cpu", *flags])
    assert results["config"]["sequential_forward"] is True
    reported = results["results"]["lckv_short_ppl"]["word_perplexity,none"]

    tokenizer = AutoTokenizer.from_pretrained(checkpoints[kind])
    ids = tokenizer(text, add_special_tokens=False).input_ids
    inputs = torch.tensor(
        [[tokenizer.bos_token_id, *ids]]
    )  # lm-eval scores the document after the BOS token, in one window
    words = len(re.split(r"\s+", text))
    # Compared as log word perplexities (NLL per word, ~40 nats with these large random weights); the harness ran in
    # float32 (its --dtype on the CPU).
    oracle = float64_oracle(checkpoints[kind], inputs, lambda logits: mean_nll(logits, inputs) * len(ids) / words)
    print(f"{kind}: test_harness --sequential log word perplexity {math.log(reported):.6f}; float64 {oracle}")
    assert abs(math.log(reported) - oracle["exact"]) <= oracle["bound"]


# ----------------------------------------------------------------------------- run_generation.py, run_streaming.py


def generation_args(path: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(path),
        "--prompt",
        PROMPT,
        "--max_new_tokens",
        str(NEW_TOKENS),
        "--ignore_eos",
        "--quiet",
        *extra,
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_run_generation_sequential_forward_is_the_token_by_token_text(kind, checkpoints, texts):
    results = run_generation.main(generation_args(checkpoints[kind], "--compare_cache", "--sequential_forward"))
    assert results["cache"]["text"] == results["no_cache"]["text"] == [texts[kind]["exact"]]
    assert run_generation.main(generation_args(checkpoints[kind]))["cache"]["text"] == [texts[kind]["iterative"]]


@pytest.mark.parametrize("cache_flag", [[], ["--static_cache"]], ids=["dynamic", "static"])
@pytest.mark.parametrize("kind", KINDS)
def test_run_generation_prefill_sequential_is_the_token_by_token_text(kind, cache_flag, checkpoints, texts):
    exact = run_generation.main(generation_args(checkpoints[kind], "--prefill", "sequential", *cache_flag))
    assert exact["cache"]["text"] == [texts[kind]["exact"]]
    iterative = run_generation.main(generation_args(checkpoints[kind], "--prefill", "iterative", *cache_flag))
    assert iterative["cache"]["text"] == [texts[kind]["iterative"]]


@pytest.mark.parametrize(
    "switch", [["--prefill", "sequential"], ["--sequential_forward"]], ids=["prefill", "sequential_forward"]
)
@pytest.mark.parametrize("kind", KINDS)
def test_run_streaming_generate_switches_are_the_token_by_token_text(kind, switch, checkpoints, texts):
    """A window holding the whole text (no eviction): streaming decodes as an ordinary cache."""
    args = generation_args(checkpoints[kind], "--window_size", "64", "--num_sink_tokens", "4")
    assert run_streaming.main([*args, *switch])["text"] == [texts[kind]["exact"]]
    assert run_streaming.main(args)["text"] == [texts[kind]["iterative"]]  # the checkpoint's own prefill: iterative


@pytest.mark.parametrize("kind", KINDS)
def test_run_streaming_perplexity_is_token_by_token(kind, checkpoints, corpus, tmp_path):
    """--mode perplexity feeds one token per forward: exact without a switch."""
    text = tmp_path / "text.txt"
    text.write_text(corpus.validation.read_text()[:2000])
    result = run_streaming.main(
        [
            "--model_name_or_path",
            str(checkpoints[kind]),
            "--mode",
            "perplexity",
            "--text_file",
            str(text),
            "--num_tokens",
            "40",
            "--window_size",
            "60",
            "--quiet",
        ]
    )
    ids = AutoTokenizer.from_pretrained(checkpoints[kind])(text.read_text(), return_tensors="pt").input_ids[:, :40]
    oracle = float64_oracle(checkpoints[kind], ids, lambda logits: mean_nll(logits, ids))
    assert abs(math.log(result["ppl"]) - oracle["exact"]) <= oracle["bound"]


# ----------------------------------------------------------------------------- test_latency.py --prefill


@pytest.mark.parametrize("kind", ["opt-llama-published", "lckv-llama"])
def test_latency_prefill_reaches_the_model(kind, checkpoints, tmp_path, monkeypatch):
    """The benchmark reports times, not outputs: what reaches the model is which prefill the model's forward ran."""
    import models.modeling_opt_llama as modeling

    calls = []
    original = modeling.sequential_prefill
    monkeypatch.setattr(
        modeling, "sequential_prefill", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    )
    base = [
        "--configs",
        str(checkpoints[kind] / "config.json"),
        "--prompt_len",
        "8",
        "--gen_len",
        "2",
        "--batches",
        "1",
        "--device",
        "cpu",
        "--output_dir",
        str(tmp_path),
    ]
    for mode, runs_sequential in (("iterative", False), ("sequential", True)):
        calls.clear()
        out = test_latency.main([*base, "--prefill", mode])
        assert [run["prefill_path"] for run in next(iter(out["models"].values()))["runs"]] == [mode]
        assert bool(calls) is runs_sequential, mode


# ----------------------------------------------------------------------------- where a switch cannot apply


def test_the_lckv_llama_config_keeps_the_switch_out_of_its_dict(checkpoints):
    """The bug class: lckv-llama saves ``use_sequential``; its dict has no ``sequential_forward`` the model reads."""
    config = LckvLlamaConfig.from_pretrained(checkpoints["lckv-llama"])
    config.sequential_forward = True
    assert "sequential_forward" not in config.to_dict() and config.to_dict()["use_sequential"] is True


def test_lckv_llama_format_fields_given_at_load_reach_the_model(checkpoints):
    """The later format's names given to ``from_pretrained`` (lm-eval's ``--model_args ...,use_sequential=True`` on
    an exported checkpoint), which transformers sets on the config it built, or set afterwards: the model reads them.
    They once stayed format fields the model never read, so lm-eval scored the iterative forward."""
    path = checkpoints["lckv-llama"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, use_sequential=True).eval()
    assert model.config.sequential_forward and model.config.use_sequential is None
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model(ids).logits
    torch.testing.assert_close(exact, token_by_token_logits(model, ids), rtol=0, atol=1e-9)
    model.config.sequential_forward = False
    assert (iterative_logits(model, ids) - exact).abs().max() > 1e-3  # the check above can tell the two apart

    config = AutoConfig.from_pretrained(path, forward_passes=3, backward_passes=2)
    assert (config.num_encoders, config.num_trained_encoders) == (4, 1)
    config.backward_passes = 3  # the forward passes stay 3
    assert (config.num_encoders, config.num_trained_encoders, config.backward_passes) == (5, 2, None)
    assert (config.to_dict()["forward_passes"], config.to_dict()["backward_passes"]) == (3, 3)
    with pytest.raises(ValueError, match="^forward_passes/backward_passes: 3/0; allowed"):
        config.backward_passes = 0
    assert (config.num_encoders, config.num_trained_encoders) == (5, 2)  # unchanged by the refused value


LLAMA_SWITCHES = {
    "run_clm --eval_sequential": (
        run_clm.main,
        lambda ckpt, tmp: [
            "--model_name_or_path",
            ckpt,
            "--validation_file",
            "VALIDATION",
            "--do_eval",
            "--output_dir",
            tmp,
            "--report_to",
            "none",
            "--eval_sequential",
        ],
        "--eval_sequential",
    ),
    "test_harness --sequential": (
        test_harness.main,
        lambda ckpt, tmp: ["--model", ckpt, "--tasks", "lckv_heldout_ppl", "--device", "cpu", "--sequential"],
        "--sequential",
    ),
    "run_generation --sequential_forward": (
        run_generation.main,
        lambda ckpt, tmp: generation_args(ckpt, "--sequential_forward"),
        "--sequential_forward",
    ),
    "run_generation --prefill": (
        run_generation.main,
        lambda ckpt, tmp: generation_args(ckpt, "--prefill", "sequential"),
        "--prefill",
    ),
    "run_streaming --prefill": (
        run_streaming.main,
        lambda ckpt, tmp: generation_args(ckpt, "--prefill", "sequential"),
        "--prefill",
    ),
    "run_streaming --sequential_forward": (
        run_streaming.main,
        lambda ckpt, tmp: generation_args(ckpt, "--sequential_forward"),
        "--sequential_forward",
    ),
    "test_latency --prefill": (
        test_latency.main,
        lambda ckpt, tmp: [
            "--configs",
            f"{ckpt}/config.json",
            "--prefill",
            "sequential",
            "--device",
            "cpu",
            "--output_dir",
            tmp,
        ],
        "--prefill",
    ),
}


@pytest.mark.parametrize("switch", LLAMA_SWITCHES)
def test_a_switch_on_a_llama_is_a_one_line_error(switch, checkpoints, corpus, tmp_path, capsys):
    main, argv, flag = LLAMA_SWITCHES[switch]
    args = [
        str(corpus.validation) if a == "VALIDATION" else a
        for a in argv(str(checkpoints["llama"]), str(tmp_path / "out"))
    ]
    err = one_line_error(capsys, main, args)
    assert err.endswith(
        f"error: {flag}: model_type 'llama' has no iterative computation to make exact; allowed only for "
        "opt-llama and lckv-llama"
    ), err
    assert not (tmp_path / "out").exists()


def test_switches_that_cannot_apply_are_one_line_errors(checkpoints, corpus, tmp_path, capsys, monkeypatch):
    lckv = checkpoints["lckv-llama"]
    flex = ("--static_cache", "--attn_implementation", "flex_attention")
    saved_exact = tmp_path / "saved_exact"  # the checkpoint's own config asks for the exact forward
    shutil.copytree(lckv, saved_exact)
    fields = json.loads((saved_exact / "config.json").read_text())
    (saved_exact / "config.json").write_text(json.dumps(fields | {"use_sequential": True}))
    for path, exact in ((lckv, ("--sequential_forward",)), (lckv, ("--prefill", "sequential")), (saved_exact, ())):
        # The model would refuse it mid-generate.
        err = one_line_error(capsys, run_generation.main, generation_args(path, *exact, *flex))
        assert "--attn_implementation: flex_attention's masks over a --static_cache cannot be cut per token" in err
    saved_prefill = tmp_path / "saved_prefill"  # the checkpoint's own config asks for the exact prefill
    shutil.copytree(checkpoints["opt-llama-kv-sources"], saved_prefill)
    fields = json.loads((saved_prefill / "config.json").read_text())
    (saved_prefill / "config.json").write_text(json.dumps(fields | {"prefill": "sequential"}))
    for no_cache in ("--no_cache", "--compare_cache"):  # --compare_cache's no-cache half has no cache to fill
        for mode in ("iterative", "auto"):
            err = one_line_error(capsys, run_generation.main, generation_args(lckv, "--prefill", mode, no_cache))
            assert f"--prefill: the prompt prefill fills the KV cache, and {no_cache} generates without one" in err
    for exact_everywhere in (  # the exact prefill makes the no-cache forwards exact too
        generation_args(saved_prefill, "--compare_cache"),
        generation_args(lckv, "--prefill", "sequential", "--compare_cache"),
        generation_args(lckv, "--prefill", "sequential", "--sequential_forward", "--compare_cache"),
    ):
        results = run_generation.main(exact_everywhere)  # every forward exact: no-cache is allowed
        assert results["cache"]["text"] == results["no_cache"]["text"]
    capsys.readouterr()
    err = one_line_error(
        capsys, run_generation.main, generation_args(lckv, "--sequential_forward", "--prefill", "iterative")
    )
    assert "--prefill: 'iterative' cannot apply: sequential_forward is on" in err
    perplexity = ["--model_name_or_path", str(lckv), "--mode", "perplexity", "--use_embedded_corpus"]
    err = one_line_error(capsys, run_streaming.main, [*perplexity, "--prefill", "sequential"])
    assert (
        "--prefill: --mode perplexity feeds one token per forward, exact already; allowed with --mode generate" in err
    )
    clm = [
        "--model_name_or_path",
        str(lckv),
        "--train_file",
        str(corpus.validation),
        "--do_train",
        "--output_dir",
        str(tmp_path / "out"),
        "--report_to",
        "none",
    ]
    err = one_line_error(capsys, run_clm.main, [*clm, "--eval_sequential"])
    assert err.endswith(
        "--eval_sequential: makes the final evaluation exact, and there is none; allowed with --do_eval"
    )
    monkeypatch.setenv("LCKV_EVAL_SEQUENTIAL", "1")
    err = one_line_error(capsys, run_clm.main, clm)
    assert err.endswith(
        "LCKV_EVAL_SEQUENTIAL=1: makes the final evaluation exact, and there is none; allowed with --do_eval"
    )
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="^--prefill: model_type 'llama' has no iterative computation"):
        test_latency.check_prefill_applies([config_of(COMMON | {"model_type": "llama"})], ["sequential"], given=True)
    test_latency.check_prefill_applies(
        [config_of(COMMON | {"model_type": "llama"})], ["auto"], given=False
    )  # the default: the Llama baseline alone
    exact_config = config_of(
        KINDS["opt-llama-kv-sources"] | {"sequential_forward": True}
    )  # saved exact: its default is exact
    test_latency.check_prefill_applies([exact_config], ["auto"], given=False)
    assert test_latency.prefill_modes_for(exact_config, ["auto"], given=False) == ["sequential"]


def test_a_renamed_lckv_llama_field_is_an_error_naming_its_format_name(checkpoints):
    """An override the format would silently drop (its own field wins in ``adopt_layout``) names the field to use."""
    from tools import cli

    with pytest.raises(
        UsageError,
        match=(
            r"unknown config field\(s\) \['sequential_forward'\] "
            r".*lckv-llama writes sequential_forward as use_sequential$"
        ),
    ):
        cli.load_config("--config", str(checkpoints["lckv-llama"]), {"sequential_forward": True})
    assert cli.load_config("--config", str(checkpoints["lckv-llama"]), {"use_sequential": True}).sequential_forward
