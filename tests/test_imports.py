"""The package's import rules, checked on the source with `ast` (nothing is imported).

1. No module imports another module's private name: neither `from m import _x`, nor `m._x` on an
   imported module, nor a private module (`randfeat._x`) from outside it.
2. No two modules depend on each other, directly or through others: the graph of imports between
   modules of `randfeat` has no cycle. Imports inside functions (lazy) and under
   `if TYPE_CHECKING:` count like any other. An import of `a.b.c` is an edge to `a.b.c` only:
   Python runs the package `__init__`s on the way, but they only import downward, so a package's
   `__init__` may gather names from its modules as long as no module imports from its package's
   `__init__` (that edge is counted, and would close a cycle).
3. No module of `randfeat.eval`, `randfeat.cli`, `randfeat.calibration` or `randfeat.theory` is longer
   than 450 lines.

`KNOWN` lists the violations in modules that other work is rewriting; the test fails when a new
violation appears, and also when a known one is gone (remove it from `KNOWN` then).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "randfeat"
MAX_LINES = 450

KNOWN: frozenset[str] = frozenset()
"""Violations awaiting their owners' rewrite (see the module docstring)."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


@dataclass(frozen=True)
class Import:
    """One use of another module: `name` read from `target` (None: the module itself)."""

    importer: str
    target: str
    name: str | None
    line: int


def _imports(mods: dict[str, Path]) -> Iterator[Import]:
    for mod, path in mods.items():
        tree = ast.parse(path.read_text("utf-8"), str(path))
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        aliases: dict[str, str] = {}  # local name -> module, for `module._x`
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == PACKAGE:
                        yield Import(mod, a.name, None, node.lineno)
                        aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                if base.split(".")[0] != PACKAGE:
                    continue
                for a in node.names:
                    full = f"{base}.{a.name}"
                    if full in mods:  # a module imported from its package
                        yield Import(mod, full, None, node.lineno)
                        aliases[a.asname or a.name] = full
                    else:
                        yield Import(mod, base, a.name, node.lineno)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                yield Import(mod, aliases[node.value.id], node.attr, node.lineno)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(mods: dict[str, Path]) -> set[str]:
    """`"importer:line imports target.name"` for every private name used across modules."""
    out = set()
    for imp in _imports(mods):
        if imp.target == imp.importer:
            continue
        private_module = any(_private(p) for p in imp.target.split(".")[1:])
        if private_module and not imp.importer.startswith(imp.target + "."):
            out.add(f"{imp.importer} imports private module {imp.target}")
        elif imp.name is not None and _private(imp.name):
            out.add(f"{imp.importer} imports {imp.target}.{imp.name}")
    return out


def cycles(mods: dict[str, Path]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for imp in _imports(mods):
        if imp.target in mods and imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_private_name_is_imported_across_modules() -> None:
    found = private_imports(_modules())
    assert sorted(found - KNOWN) == [], "private names imported across modules"
    assert sorted(KNOWN - found) == [], "fixed: remove these from KNOWN"


def test_no_import_cycles() -> None:
    found = {" <-> ".join(c) for c in cycles(_modules())}
    assert sorted(found - KNOWN) == [], "modules that depend on each other"


@pytest.mark.parametrize(
    "package", ["randfeat.eval", "randfeat.cli", "randfeat.calibration", "randfeat.theory"]
)
def test_modules_are_short(package: str) -> None:
    long = {
        m: n
        for m, p in _modules().items()
        if (m == package or m.startswith(package + "."))
        and (n := p.read_text("utf-8").count("\n")) > MAX_LINES
    }
    assert long == {}


def test_the_checks_see_what_they_look_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker finds each kind of violation in a small package written for it."""
    root = tmp_path / "src" / PACKAGE
    (root / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from randfeat.b import _hidden\nimport randfeat.c as c\nX = c._y\n",
        "b.py": "def f():\n    from randfeat.a import X\n    return X\n_hidden = 1\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from randfeat import b\n",
        "_priv.py": "",
        "sub/__init__.py": "from randfeat.sub.d import D as D\n",
        "sub/d.py": "from randfeat.sub import D\nfrom .. import _priv\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    monkeypatch.setattr(f"{__name__}.SRC", tmp_path / "src")
    mods = _modules()
    assert private_imports(mods) == {
        "randfeat.a imports randfeat.b._hidden",
        "randfeat.a imports randfeat.c._y",
        "randfeat.sub.d imports private module randfeat._priv",
    }
    assert sorted(cycles(mods)) == [
        ["randfeat.a", "randfeat.b", "randfeat.c"],  # a lazy and a type-only import count
        ["randfeat.sub", "randfeat.sub.d"],  # a module importing from its package's __init__
    ]
