"""lm-eval task names without lm-eval's index: the cache is written once, read while its stamp holds, and a long list
of choices is answered with the closest names."""

import json

import lm_eval.tasks
import pytest

from tools import task_names
from tools.cli import UsageError, check_choices

from .conftest import REPO

TASKS_DIR = REPO / "tasks"


class CountingTaskManager:
    """Stands in for lm-eval's TaskManager (whose full index takes seconds) and counts the full indexings."""

    built = 0

    def __init__(self, include_path=None, include_defaults=True):
        assert include_path is None and include_defaults
        CountingTaskManager.built += 1
        self.all_tasks = ["arc_easy", "hellaswag", "hellaswag_de"]


def test_builtin_names_are_indexed_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", CountingTaskManager)
    CountingTaskManager.built = 0
    cache = tmp_path / "names.json"
    assert task_names.builtin_task_names(cache) == ["arc_easy", "hellaswag", "hellaswag_de"]
    assert task_names.builtin_task_names(cache) == ["arc_easy", "hellaswag", "hellaswag_de"]
    assert CountingTaskManager.built == 1
    assert json.loads(cache.read_text())["stamp"] == task_names.tasks_stamp(task_names.builtin_tasks_dir())

    stale = json.loads(cache.read_text())
    stale["stamp"][2] -= 1  # one task file fewer than lm-eval has now
    cache.write_text(json.dumps(stale | {"names": ["gone"]}))
    assert task_names.builtin_task_names(cache) == ["arc_easy", "hellaswag", "hellaswag_de"]
    assert CountingTaskManager.built == 2


def test_local_tasks_need_no_index_and_a_typo_lists_local_and_builtin_names(tmp_path, monkeypatch):
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", CountingTaskManager)
    CountingTaskManager.built = 0
    monkeypatch.setattr(task_names, "local_task_names", lambda tasks_dir: ["lckv_heldout_ppl", "lckv_next_line"])
    cache = tmp_path / "names.json"
    assert task_names.check_task_names("--tasks", ["lckv_next_line"], TASKS_DIR, cache) is True
    assert CountingTaskManager.built == 0
    assert task_names.check_task_names("--tasks", ["hellaswag", "lckv_next_line"], TASKS_DIR, cache) is False
    with pytest.raises(
        UsageError, match="^--tasks: unknown 'lckv_next_lin'; allowed are arc_easy, .*, lckv_next_line$"
    ):
        task_names.check_task_names("--tasks", ["lckv_next_lin"], TASKS_DIR, cache)


def test_long_choice_lists_are_summarised_by_the_closest_names():
    allowed = [f"task_{i}" for i in range(100)] + ["hellaswag", "hellaswag_ar"]
    with pytest.raises(UsageError) as error:
        check_choices("--tasks", ["hellaswg", "zzzz"], allowed)
    assert str(error.value) == (
        "--tasks: unknown 'hellaswg' (closest: hellaswag, hellaswag_ar), 'zzzz' (closest: none); "
        "allowed is one of 102 names"
    )
    with pytest.raises(UsageError, match="^--modes: unknown 'fast'; allowed are slow, static$"):
        check_choices("--modes", ["fast"], ["static", "slow"])
