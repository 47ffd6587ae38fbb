"""Evaluate an LCKV (or any causal LM) checkpoint with LM-Evaluation-Harness.

The model is loaded here (``import models`` registers opt-llama) and handed to lm-eval as an object, so
``--sequential`` (or ``LCKV_EVAL_SEQUENTIAL=1``) can switch it to the exact token-by-token semantics first; a checkpoint
saved with ``prefill: "sequential"`` runs that way by itself (the model's rule, so the ``lm_eval`` command line gets
the same numbers), and the results' ``config.sequential_forward`` says which computation the metrics are of.
Offline, the default task list falls back from the paper's commonsense suite to the local tasks in ``tasks/``
(held-out perplexity and next-line choice on the embedded corpus).

    python test_harness.py --model outputs/tiny --tasks lckv_heldout_ppl --limit 20 --output_path out/eval.json
"""

import argparse
import math
import sys
import urllib.request
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.export import write_json
from tools import cli as shared  # its import of models registers opt-llama with the Auto classes
from tools.cli import (
    DTYPE_CHOICES,
    ArgumentParser,
    UsageError,
    check_choices,
    check_range,
    env_flag,
    is_sequential,
    run_cli,
    set_sequential,
)
from tools.generation import instantiate
from tools.task_names import check_task_names, local_task_names

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
COMMONSENSE_TASKS = ["hellaswag", "openbookqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "piqa"]
LOCAL_TASKS = ["lckv_heldout_ppl", "lckv_next_line"]
TASK_NAMES_CACHE = TASKS_DIR.parent / ".cache" / "lm_eval_task_names.json"  # lm-eval's task names, see tools.task_names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", required=True, help="checkpoint directory (from_pretrained) or a config .json (random weights)"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer name or path (default: the checkpoint's own, else the corpus tokenizer)",
    )
    p.add_argument(
        "--tasks",
        default=None,
        help="comma-separated lm-eval task names (default: commonsense suite, or local tasks offline)",
    )
    p.add_argument(
        "--num_fewshot", type=int, default=None, help="few-shot examples per task (default: each task's own)"
    )
    p.add_argument("--batch_size", default="1", help="lm-eval batch size: an integer or 'auto'")
    p.add_argument(
        "--limit",
        type=float,
        default=None,
        help="documents per task: a whole number, or a fraction if < 1; quick checks",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="weights dtype (auto: bfloat16 on cuda, float32 otherwise)",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="exact token-by-token forward (config.sequential_forward=True), as the paper evaluates; also "
        "LCKV_EVAL_SEQUENTIAL=1, and on where the checkpoint's prefill is 'sequential'",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for random weights (config .json) and lm-eval: 0..2**32-1")
    p.add_argument("--output_path", default=None, help="write lm-eval's results JSON to this file")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """One-line errors for flags out of range, before anything is loaded; ``args.batch_size`` becomes an int or
    'auto'."""
    if args.batch_size != "auto":
        try:
            args.batch_size = int(args.batch_size)
        except ValueError:
            raise UsageError(f"--batch_size: {args.batch_size!r}; allowed is an integer >= 1 or 'auto'") from None
        check_range("--batch_size", args.batch_size, minimum=1)
    check_range("--num_fewshot", args.num_fewshot, minimum=0)
    check_range("--limit", args.limit, minimum=0, exclusive_min=True)
    if args.limit is not None and (not math.isfinite(args.limit) or (args.limit >= 1 and args.limit % 1)):
        raise UsageError(f"--limit: {args.limit}; allowed is a fraction below 1 or a whole number of documents")
    check_range("--seed", args.seed, minimum=0, maximum=2**32 - 1)  # numpy's range, which lm-eval seeds
    # The flag that asked for the exact forward (named in its errors), or None; LCKV_EVAL_SEQUENTIAL=1 as run_clm.py.
    args.sequential = (
        "--sequential" if args.sequential else "LCKV_EVAL_SEQUENTIAL=1" if env_flag("LCKV_EVAL_SEQUENTIAL") else None
    )
    args.device = shared.resolve_device(args.device)
    if args.output_path:
        shared.check_output_file("--output_path", args.output_path)
    if args.tasks:
        check_task_names("--tasks", task_list(args.tasks), TASKS_DIR, TASK_NAMES_CACHE)


def task_list(text: str) -> list[str]:
    """``--tasks "a, b"`` -> ``["a", "b"]``."""
    return [t.strip() for t in text.split(",")]


def load_model(path: str, dtype: torch.dtype, device: str, sequential: str | None, seed: int) -> PreTrainedModel:
    """A checkpoint directory, or a config ``.json`` instantiated with seeded random weights, in eval mode; exact
    (``sequential_forward``) where the flag ``sequential`` names asked for it (the model runs a checkpoint whose
    prefill is "sequential" token by token by itself)."""
    config = shared.load_config("--model", path)
    if sequential:
        set_sequential(config, sequential)
    return instantiate(config, None if path.endswith(".json") else path, device, seed, dtype=dtype)


def load_tokenizer(name: str | None, model_path: str) -> PreTrainedTokenizerBase:
    """``name``, else the checkpoint's tokenizer, else the embedded corpus tokenizer."""
    if name is None and not model_path.endswith(".json") and (Path(model_path) / "tokenizer_config.json").exists():
        name = model_path
    if name is None:
        from corpus import prepare_corpus

        name = str(prepare_corpus().tokenizer)
    return shared.load_tokenizer("--tokenizer", name)


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub endpoint does not answer within ``timeout`` seconds."""
    if hub_constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(hub_constants.ENDPOINT, method="HEAD"), timeout=timeout)
    except OSError:
        return False
    return True


def default_tasks() -> list[str]:
    if hub_reachable():
        return COMMONSENSE_TASKS
    print(
        f"hub unreachable: running the local tasks {', '.join(LOCAL_TASKS)} instead of {', '.join(COMMONSENSE_TASKS)}"
    )
    return LOCAL_TASKS


def evaluate(args: argparse.Namespace) -> dict:
    """Run lm-eval on the loaded model; returns ``simple_evaluate``'s results dict."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    sys.path.insert(0, str(TASKS_DIR.parent))  # the task data builders import the corpus package
    # Cheap checks first (the task names were checked with the flags): the config and tokenizer, then the model.
    config = shared.load_config("--model", args.model)
    shared.check_weights("--model", args.model)
    if args.sequential:
        set_sequential(config, args.sequential)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    if len(tokenizer) > config.vocab_size:
        raise UsageError(
            f"--tokenizer: {len(tokenizer)} tokens exceed the model's vocab_size={config.vocab_size}; "
            "allowed is a tokenizer of at most that many tokens"
        )
    tasks = task_list(args.tasks) if args.tasks else default_tasks()
    local_only = set(tasks) <= set(local_task_names(TASKS_DIR))  # then lm-eval's own index (seconds) is not needed
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not local_only)
    check_choices("--tasks", tasks, task_manager.all_tasks)
    model = load_model(
        args.model, shared.resolve_dtype(args.dtype, args.device), args.device, args.sequential, args.seed
    )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=args.batch_size)
    try:
        results = simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            task_manager=task_manager,
            random_seed=args.seed,
            numpy_random_seed=args.seed,
            torch_random_seed=args.seed,
            fewshot_random_seed=args.seed,
        )
    except ValueError as error:  # random.sample's, drawing the few-shot examples
        if args.num_fewshot and "Sample larger than population" in str(error):
            raise UsageError(
                f"--num_fewshot: {args.num_fewshot} is more than a task's documents to draw examples from; allowed "
                "is fewer"
            ) from None
        raise
    results["config"]["sequential_forward"] = is_sequential(model.config)  # which computation the metrics are of
    return results


def main(argv: list[str] | None = None) -> dict:
    """The command line; bad input ends the process with one line on stderr and exit status 2."""
    return run_cli(evaluate_and_report, argv, prog="test_harness.py")


def evaluate_and_report(argv: list[str] | None = None) -> dict:
    from lm_eval.utils import handle_non_serializable, make_table

    args = parse_args(argv)
    results = evaluate(args)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.output_path:
        out = Path(args.output_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, results, default=handle_non_serializable, ensure_ascii=False)
        print(f"results written to {out}")
    return results


if __name__ == "__main__":
    main()
