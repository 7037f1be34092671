"""Layering: no import cycles between the modules or the sub-packages of `metaapo_nemo`, and the
library never imports what lives beside it (tasks/, recipes/, benchmarks/, tests/).

Every import statement counts, function-level (lazy) ones too: a lazy import hides a cycle
from Python at import time, not from the design. ``from pkg import name`` points at
``pkg/name.py`` when that module exists, else at the module that ``pkg/__init__.py``
re-exports ``name`` from; a name defined in an ``__init__.py`` itself is no edge (the
``__init__`` files are re-export hubs, not nodes).
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "metaapo_nemo"
BESIDE = ("tasks", "recipes", "benchmarks", "tests")  # the library reaches these by name only


@dataclass
class ImportGraph:
    """Modules (dotted name -> file, ``__init__`` files excluded) and their import edges."""

    root: Path  # the directory that holds the package
    modules: dict[str, Path]
    edges: dict[str, dict[str, int]] = field(default_factory=dict)  # module -> {target: line}

    def cycles(self) -> list[list[str]]:
        """One cycle ``[a, b, ..., a]`` per strongly connected component of > 1 node."""
        return [_cycle_through(scc, self.edges) for scc in _sccs(self.edges)]

    def folded(self, depth: int) -> ImportGraph:
        """Each module folded into its first `depth` name components (``pkg.sub``)."""
        def fold(m: str) -> str:
            return ".".join(m.split(".")[:depth])

        out = ImportGraph(self.root, {fold(m): f for m, f in self.modules.items()})
        for m, targets in self.edges.items():
            for t, line in targets.items():
                if fold(t) != fold(m):
                    out.edges.setdefault(fold(m), {}).setdefault(fold(t), line)
        return out

    def witness(self, a: str, b: str) -> str:
        """The first import statement from `a` (a module or a folded name) into `b`."""
        for m, targets in sorted(self.edges.items()):
            for t, line in sorted(targets.items()):
                if _within(m, a) and _within(t, b):
                    return f"{m} -> {t} ({self.modules[m].relative_to(self.root)}:{line})"
        return f"{a} -> {b}"

    def explain(self, cycle: list[str]) -> str:
        return " -> ".join(cycle) + "".join(
            f"\n      {self.witness(a, b)}" for a, b in zip(cycle, cycle[1:]))


def _within(module: str, name: str) -> bool:
    return module == name or module.startswith(name + ".")


def _targets(node: ast.AST, pkg: str) -> list[str]:
    """Absolute dotted names an import statement in package `pkg` asks for."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        module = node.module or ""
        if node.level:
            parts = pkg.split(".")
            parts = parts[: len(parts) - (node.level - 1)]
            module = ".".join(parts + ([module] if module else []))
        return [f"{module}.{a.name}" for a in node.names]
    return []


def _imports(name: str, path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line, targets) for every import statement of a module, nested ones too."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if targets := _targets(node, pkg):
            yield node.lineno, targets


def _reexports(pkg: str, init: Path) -> dict[str, list[str]]:
    """name -> the dotted names a package's ``__init__`` imports it as (top-level statements)."""
    out: dict[str, list[str]] = {}
    for node in ast.parse(init.read_text(), str(init)).body:
        if isinstance(node, ast.ImportFrom):
            for alias, t in zip(node.names, _targets(node, pkg)):
                out.setdefault(alias.asname or alias.name, []).append(t)
    return out


def _dotted(path: Path, root: Path) -> str:
    name = ".".join(path.relative_to(root).with_suffix("").parts)
    return name.removesuffix(".__init__")


def scan(package_dir: Path) -> ImportGraph:
    """The import graph of the package at `package_dir` (every ``import`` statement in it)."""
    root = package_dir.parent
    files = sorted(package_dir.rglob("*.py"))
    modules = {_dotted(f, root): f for f in files if f.name != "__init__.py"}
    hubs = {_dotted(f, root): _reexports(_dotted(f, root), f) for f in files if f.name == "__init__.py"}

    def resolve(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        if name in modules:
            return {name}
        parent, _, attr = name.rpartition(".")
        if attr in hubs.get(parent, {}) and name not in seen:
            found: set[str] = set()
            for t in hubs[parent][attr]:
                found |= resolve(t, seen | {name}) or resolve(t.rpartition(".")[0], seen | {name})
            return found
        return set()  # a package itself, a name an __init__ defines, or outside the package

    graph = ImportGraph(root, modules)
    for name, path in modules.items():
        out = graph.edges.setdefault(name, {})
        for line, targets in _imports(name, path):
            for t in targets:
                for hit in resolve(t) or resolve(t.rpartition(".")[0]):
                    if hit != name:
                        out.setdefault(hit, line)
    return graph


def _sccs(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one member, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, {})):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on_stack.discard(comp[-1])
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return found


def _cycle_through(scc: list[str], edges: dict[str, dict[str, int]]) -> list[str]:
    """A shortest cycle through the component's first member (breadth-first inside it)."""
    start, members = scc[0], set(scc)
    prev: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(edges.get(v, {})):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if w in members and w not in prev:
                prev[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start} in the component {scc}")


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return scan(PACKAGE)


def test_the_scan_sees_the_whole_package(graph):
    # guards against passing vacuously (a wrong path, a parser that sees no imports)
    assert len(graph.modules) >= 50, sorted(graph.modules)
    assert sum(map(len, graph.edges.values())) >= 150
    assert len(graph.folded(depth=2).modules) >= 12
    seen = {
        ("metaapo_nemo.reward.registry", "metaapo_nemo.reward.rule"),  # inside a function
        ("metaapo_nemo.run", "metaapo_nemo.losses.base"),  # through losses/__init__.py
        ("metaapo_nemo.run", "metaapo_nemo.parallel.state"),  # `from pkg import module`
        ("metaapo_nemo.run", "metaapo_nemo.evals"),
    }
    assert {(a, b) for a, b in seen if b in graph.edges.get(a, {})} == seen


def test_no_module_cycles(graph):
    cycles = graph.cycles()
    assert not cycles, "import cycles between modules of metaapo_nemo:\n" + "\n".join(
        "  " + graph.explain(c) for c in cycles)


def test_no_subpackage_cycles(graph):
    folded = graph.folded(depth=2)  # metaapo_nemo.<sub-package or top-level module>
    cycles = folded.cycles()
    assert not cycles, "import cycles between sub-packages of metaapo_nemo:\n" + "\n".join(
        "  " + graph.explain(c) for c in cycles)


def test_the_library_never_imports_what_lives_beside_it():
    found = [
        f"{path.relative_to(REPO)}:{line} imports {t}"
        for path in sorted(PACKAGE.rglob("*.py"))  # __init__ files too
        for line, targets in _imports(_dotted(path, REPO), path)
        for t in targets
        if t.partition(".")[0] in BESIDE
    ]
    assert not found, (
        "the library reaches tasks/, recipes/, benchmarks/ and tests/ by name only "
        "(reward.callable, eval.task):\n" + "\n".join(found))


def test_tasks_have_no_cycles_either():
    tasks = scan(REPO / "tasks")
    assert len(tasks.modules) >= 5
    assert not tasks.cycles(), "\n".join(tasks.explain(c) for c in tasks.cycles())


def test_a_cycle_is_found_and_named(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.c import helper\n\nVALUE = 1\n")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.sub import VALUE, helper  # lazy, re-exported\n")
    (pkg / "sub" / "c.py").write_text("from . import d\n\n\ndef helper():\n    import pkg.a\n")
    (pkg / "sub" / "d.py").write_text("")
    g = scan(pkg)
    assert g.edges == {"pkg.a": {"pkg.b": 1}, "pkg.b": {"pkg.sub.c": 2},
                       "pkg.sub.c": {"pkg.sub.d": 1, "pkg.a": 5}, "pkg.sub.d": {}}
    (cycle,) = g.cycles()
    assert cycle == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    assert "pkg.b -> pkg.sub.c (pkg/b.py:2)" in g.explain(cycle)
    (folded,) = g.folded(depth=2).cycles()
    assert folded == ["pkg.a", "pkg.b", "pkg.sub", "pkg.a"]
    assert "pkg.sub.c -> pkg.a (pkg/sub/c.py:5)" in g.explain(folded)
