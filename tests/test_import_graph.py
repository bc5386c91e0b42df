"""The static import graph of ``megabyte/`` and ``megabyte_kernels/``: no cycles, one direction.

DESIGN.md §1: one folder, one job; ``megabyte/`` imports ``megabyte_kernels``, never the other way
round. Inside each package the modules are layered too: a cycle means two modules are one job
split in two files (or one job spread over two rooms), and it makes import order matter.

The graph is read with ``ast`` from every ``import`` / ``from ... import`` statement of every
module, function-level imports included: a lazy import only hides a cycle until run time.
An edge goes to the module imported (``from .x import y`` -> ``x``; ``from . import x`` -> ``x``
when ``x`` is a module, else the package); imports of other distributions are ignored.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("megabyte", "megabyte_kernels")


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Absolute dotted names an import statement may refer to (``base.name`` and ``base``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: climb from the importing module's package
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    return [f"{base}.{alias.name}" for alias in node.names]


def _resolve(name: str, modules: set[str]) -> str | None:
    """The longest prefix of ``name`` that is one of ``modules`` (``pkg.mod.Class`` -> ``pkg.mod``)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports anywhere in its source."""
    files = {_module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            for name in _imported_names(node, module, path.name == "__init__.py"):
                target = _resolve(name, modules)
                if target is not None and target != module:
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]], package: str) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module,
    among the modules of ``package`` (Tarjan's algorithm, then a shortest way round)."""
    nodes = sorted(m for m in graph if m.split(".")[0] == package)
    inside = set(nodes)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v] & inside):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in nodes:
        if v not in index:
            visit(v)
    return [_way_round(graph, comp) for comp in components]


def _way_round(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component (BFS)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is not strongly connected")  # pragma: no cover


def _show(found: list[list[str]]) -> str:
    return "; ".join(" -> ".join(c) for c in found)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT, PACKAGES)


def test_the_graph_sees_the_imports_it_must(graph):
    """Known edges, so that a reader that finds nothing cannot pass the cycle tests."""
    assert "megabyte_kernels" in graph["megabyte.model"]  # import megabyte_kernels as mk
    assert "megabyte.config" in graph["megabyte.model"]  # from .config import MegabyteConfig
    assert "megabyte.generation" in graph["megabyte.model"]  # from . import generation
    assert "megabyte.train" in graph["megabyte.cli"]  # function-level: from .train import run_train
    assert "megabyte_kernels.native" in graph["megabyte_kernels.patch_embed"]  # from .native import ...
    assert "megabyte_kernels.native" in graph["megabyte_kernels.backends"]  # function-level: from . import native


def test_megabyte_has_no_import_cycle(graph):
    found = cycles(graph, "megabyte")
    assert not found, f"import cycles in megabyte/: {_show(found)}"


def test_megabyte_kernels_has_no_import_cycle(graph):
    found = cycles(graph, "megabyte_kernels")
    assert not found, f"import cycles in megabyte_kernels/: {_show(found)}"


def test_kernels_never_import_the_model_package(graph):
    wrong = sorted(f"{m} -> {t}" for m, ts in graph.items() if m.split(".")[0] == "megabyte_kernels"
                   for t in ts if t.split(".")[0] == "megabyte")
    assert not wrong, f"megabyte_kernels imports megabyte (DESIGN.md §1): {wrong}"


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .. import a  # noqa\n")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.c import g\n    return g\n")
    (pkg / "c.py").write_text("import os\nfrom . import a\n")
    (pkg / "d.py").write_text("from .a import f\nfrom .sub import a\n")
    g = import_graph(tmp_path, ("pkg",))
    assert g["pkg.sub"] == {"pkg.a"} and g["pkg.d"] == {"pkg.a", "pkg.sub"} and g["pkg.c"] == {"pkg.a"}
    assert cycles(g, "pkg") == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    (pkg / "c.py").write_text("import os\n")  # the function-level import no longer closes a loop
    assert cycles(import_graph(tmp_path, ("pkg",)), "pkg") == []
