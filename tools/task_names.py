"""lm-eval task names, checked in well under a second instead of the seconds lm-eval's task index takes.

lm-eval's ``TaskManager`` parses every task YAML it ships (about 14,000 files) to index the names: 4 s on a warm
disk, half a minute on a cold one. The names are a function of those files, so they are cached in a JSON file
stamped with lm-eval's version and the count and newest modification time of its YAML files (a ``stat`` of each,
tens of milliseconds); a changed, added or removed task file re-indexes. The project's own tasks (a directory of
a few YAML files) are indexed directly, which is instant.
"""

import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

from .cli import check_choices


def local_task_names(tasks_dir: str | os.PathLike) -> list[str]:
    """The task, group and tag names of the YAML tasks in ``tasks_dir`` (lm-eval's index of that directory alone)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir), include_defaults=False).all_tasks


def builtin_tasks_dir() -> Path:
    """Where lm-eval keeps its own task YAML files (found without importing lm-eval)."""
    return Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"


def tasks_stamp(root: Path) -> list:
    """What lm-eval's index of ``root`` depends on: its version, the path, the YAML count and newest mtime (ns)."""
    count, newest = 0, 0
    for directory, _, files in os.walk(root):
        for name in files:
            if name.endswith(".yaml"):
                count += 1
                newest = max(newest, os.stat(os.path.join(directory, name)).st_mtime_ns)
    return [importlib.metadata.version("lm_eval"), str(root), count, newest]


def builtin_task_names(cache_file: str | os.PathLike) -> list[str]:
    """lm-eval's own task, group and tag names: from ``cache_file`` when its stamp is current, else from lm-eval's
    index (seconds), then cached. A cache that cannot be written is skipped."""
    cache_file = Path(cache_file)
    stamp = tasks_stamp(builtin_tasks_dir())
    try:
        cached = json.loads(cache_file.read_text())
        if cached["stamp"] == stamp:
            return cached["names"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache yet, or an unreadable one: index again
    from lm_eval.tasks import TaskManager

    names = TaskManager().all_tasks
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        partial.write_text(json.dumps({"stamp": stamp, "names": names}))
        os.replace(partial, cache_file)  # readers see the old cache or the new one, never half of it
    except OSError:
        pass
    return names


def check_task_names(flag: str, names: list[str], tasks_dir: str | os.PathLike, cache_file: str | os.PathLike) -> bool:
    """Every one of ``names`` is a local task (in ``tasks_dir``) or one of lm-eval's; else a UsageError naming the
    closest. Returns whether they are all local (then lm-eval's own index is not needed to run them)."""
    local = set(local_task_names(tasks_dir))
    if set(names) <= local:
        return True
    check_choices(flag, names, local.union(builtin_task_names(cache_file)))
    return False
