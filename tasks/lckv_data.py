"""Data of the local lm-eval tasks, built from the embedded corpus's held-out test split.

Two tasks, both on plays the model never saw in training (the corpus splits by play):

- ``lckv_heldout_ppl``: documents of consecutive speeches (at most ``DOC_CHARS`` characters), scored with
  ``loglikelihood_rolling`` (word / byte perplexity, bits per byte).
- ``lckv_next_line``: a few lines of a speech, then four candidate lines: the true next line and three
  lines drawn from elsewhere in the test split (seeded, so the task is fixed).

The YAML files load them through ``custom_dataset: !function lckv_data....``; the JSONL files are written
once into the corpus cache directory and read with the ``json`` builder of ``datasets``.
Run ``python -m tasks.lckv_data`` to build them and print their paths.
"""

import json
import random
from pathlib import Path

import datasets

from corpus import prepare_corpus

DOC_CHARS = 1500  # keeps a document well under 1024 tokens of the corpus tokenizer
CONTEXT_LINES = 4
NUM_CHOICES = 4
MIN_LINE_CHARS = 20
MAX_MC_DOCS = 1000
SEED = 1234


def speeches(text: str) -> list[list[str]]:
    """Blank-line separated blocks of the play text, each a list of stripped non-empty lines."""
    blocks = [[line.strip() for line in block.splitlines() if line.strip()] for block in text.split("\n\n")]
    return [block for block in blocks if block]


def perplexity_docs(blocks: list[list[str]], max_chars: int = DOC_CHARS) -> list[dict]:
    """Greedily pack consecutive blocks into ``{"text": ...}`` documents of at most ``max_chars`` characters."""
    docs, current = [], []
    for block in blocks:
        text = "\n".join(block)[:max_chars]
        if current and len("\n\n".join(current)) + 2 + len(text) > max_chars:
            docs.append({"text": "\n\n".join(current)})
            current = []
        current.append(text)
    if current:
        docs.append({"text": "\n\n".join(current)})
    return docs


def next_line_docs(blocks: list[list[str]], seed: int = SEED, max_docs: int = MAX_MC_DOCS) -> list[dict]:
    """``{"context", "choices", "gold"}`` docs: the speaker and up to ``CONTEXT_LINES`` lines, then four candidates."""
    rng = random.Random(seed)
    pool = [line for block in blocks for line in block[1:] if len(line) >= MIN_LINE_CHARS]
    docs = []
    for block in blocks:
        speaker, lines = block[0], block[1:]
        for i in range(1, len(lines)):
            answer = lines[i]
            if len(answer) < MIN_LINE_CHARS:
                continue
            context = "\n".join([speaker, *lines[max(0, i - CONTEXT_LINES) : i]])
            distractors = rng.sample([line for line in rng.sample(pool, 10) if line != answer], NUM_CHOICES - 1)
            gold = rng.randrange(NUM_CHOICES)
            choices = distractors[:gold] + [answer] + distractors[gold:]
            docs.append({"context": context, "choices": choices, "gold": gold})
    rng.shuffle(docs)
    return docs[:max_docs]


def build_task_data(cache_dir: str | Path | None = None) -> dict[str, Path]:
    """Write both tasks' JSONL files next to the prepared corpus (once) and return ``{task name: path}``."""
    paths = prepare_corpus(cache_dir)
    blocks = speeches(paths.test.read_text(encoding="utf-8"))
    out_dir = paths.root / "lm_eval_tasks"
    files = {"lckv_heldout_ppl": out_dir / "heldout_ppl.jsonl", "lckv_next_line": out_dir / "next_line.jsonl"}
    if all(f.exists() for f in files.values()):
        return files
    out_dir.mkdir(exist_ok=True)
    for path, docs in zip(files.values(), (perplexity_docs(blocks), next_line_docs(blocks)), strict=True):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(doc) + "\n" for doc in docs), encoding="utf-8")
        tmp.rename(path)  # atomic: a reader sees the whole file or none
    return files


def _load(name: str) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={"test": str(build_task_data()[name])})


def heldout_ppl(**kwargs) -> datasets.DatasetDict:
    """lm-eval ``custom_dataset`` of ``lckv_heldout_ppl`` (kwargs: the task's metadata, unused)."""
    return _load("lckv_heldout_ppl")


def next_line(**kwargs) -> datasets.DatasetDict:
    """lm-eval ``custom_dataset`` of ``lckv_next_line`` (kwargs: the task's metadata, unused)."""
    return _load("lckv_next_line")


if __name__ == "__main__":
    for task, path in build_task_data().items():
        print(f"{task}={path}")
