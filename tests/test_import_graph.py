"""The import graph (read from the sources with ``ast``, nothing imported): no two modules of ``models/`` import each
other, directly or through a longer cycle, none imports the tools' package ``tools/``, and no top-level tool script
imports another one."""

import ast
from pathlib import Path

from .conftest import REPO

PACKAGE = "models"
SCRIPTS = ("run_clm", "run_generation", "run_streaming", "test_harness", "test_latency", "quickstart")


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root / package`` (a package's ``__init__.py`` by its
    name)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(path: Path, name: str, modules: frozenset[str] = frozenset()) -> set[str]:
    """Every dotted name ``path`` (module ``name``) imports, anywhere in it (function bodies included): ``import a.b``
    gives ``a.b``; ``from .x import y`` gives ``<package>.x.y`` where that is one of ``modules`` (``y`` a submodule, as
    in ``from . import modeling`` + ``modeling.f()``), else ``<package>.x``."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            names.update(
                f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target for alias in node.names
            )
    return names


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (itself left out)."""
    modules = module_names(root, package)
    known = frozenset(modules)
    return {name: (imports_of(path, name, known) & known) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected group of modules that import each other (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in sorted(graph[node]):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group) + [sorted(group)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_sees_direct_and_indirect_cycles(tmp_path):
    """The checker itself: a pair tied by ``from . import x`` + attribute use, and a three-module ring, are found."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n\ndef f():\n    return b.g()\n")
    (package / "b.py").write_text("def g():\n    from .a import f\n    return f\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text("from ..d import x\n")
    (package / "d.py").write_text("from .sub.e import y\nx = 1\n")
    (package / "sub" / "e.py").write_text("from .c import z\ny = 1\n")
    (package / "leaf.py").write_text("import os\nfrom .a import f\n")
    assert cycles(import_graph(tmp_path, "pkg")) == [
        ["pkg.a", "pkg.b", "pkg.a"],
        ["pkg.d", "pkg.sub.c", "pkg.sub.e", "pkg.d"],
    ]


def test_no_modules_of_the_model_package_import_each_other():
    graph = import_graph(REPO, PACKAGE)
    assert {"models.modeling_opt_llama", "models.sequential_prefill", "models.masks", "models.kernels"} <= graph.keys()
    assert "models.sequential_prefill" in graph["models.modeling_opt_llama"]  # the graph sees the real imports
    assert cycles(graph) == []


def test_no_top_level_script_imports_another():
    for script in SCRIPTS:
        imported = {name.split(".")[0] for name in imports_of(REPO / f"{script}.py", script)}
        assert not imported & (set(SCRIPTS) - {script}), f"{script}.py imports {sorted(imported & set(SCRIPTS))}"


def test_the_model_package_does_not_import_the_tools():
    """``tools/`` builds on ``models/``, never the other way: the model (and the code a self-contained checkpoint
    bundles) stands without the command-line tools."""
    modules = module_names(REPO, PACKAGE)
    importing = {
        name: sorted(i for i in imports_of(path, name) if i.split(".")[0] == "tools") for name, path in modules.items()
    }
    assert {name: found for name, found in importing.items() if found} == {}
