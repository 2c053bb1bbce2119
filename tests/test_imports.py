"""The package's import rules, checked on the source with `ast` (nothing is imported).

1. No module imports another module's private name: neither `from m import _x`, nor `m._x` on an
   imported module, nor a private module (`randfeat._x`) from outside it.
2. No two modules depend on each other, directly or through others: the graph of imports between
   modules of `randfeat` has no cycle. Imports inside functions (lazy) and under
   `if TYPE_CHECKING:` count like any other. An import of `a.b.c` is an edge to `a.b.c` only:
   Python runs the package `__init__`s on the way, but they only import downward, so a package's
   `__init__` may gather names from its modules as long as no module imports from its package's
   `__init__` (that edge is counted, and would close a cycle).
3. Packages point one way (`DIRECTIONS`): the core (every module outside `detect`, `serve`, `eval`
   and `cli`) imports none of them; `detect` imports the core; `serve` imports the core and
   `detect`; `eval` imports the core, `detect` and `serve.protocol` (the wire format its client
   speaks); `cli` imports anything. Lazy imports, type-only imports and a module named by a string
   (`importlib.import_module("randfeat.eval.grid.runner")`, a PEP 562 table) count.
4. No module of `randfeat` is longer than 450 lines.

`KNOWN` lists the violations in modules that other work is rewriting; the test fails when a new
violation appears, and also when a known one is gone (remove it from `KNOWN` then).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "randfeat"
MAX_LINES = 450

DIRECTIONS: dict[str, tuple[str, ...]] = {
    "core": ("core",),
    "detect": ("core", "detect"),
    "serve": ("core", "detect", "serve", "serve.protocol"),
    "eval": ("core", "detect", "serve.protocol", "eval"),
    "cli": ("core", "detect", "serve", "serve.protocol", "eval", "cli"),
}
"""Which packages each package may import (`serve.protocol` is the one module of `serve` open to
`eval`): the table of `docs/architecture.md`."""

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
        loggers = {
            id(node.args[0])
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and node.args
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "getLogger"
        }
        for node in ast.walk(tree):  # a module named by a string: import_module, a lazy table
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value in mods
                and id(node) not in loggers
            ):
                yield Import(mod, node.value, None, node.lineno)


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


def package_of(module: str) -> str:
    """The row of `DIRECTIONS` a module belongs to (`serve.protocol` is its own; `python -m
    randfeat` is the command line)."""
    parts = module.split(".")
    if module == "randfeat.__main__":
        return "cli"
    if parts[1:3] == ["serve", "protocol"]:
        return "serve.protocol"
    if len(parts) > 1 and parts[1] in ("detect", "serve", "eval", "cli"):
        return parts[1]
    return "core"


def wrong_directions(mods: dict[str, Path]) -> set[str]:
    """`"importer:line imports target (a -> b)"` for every import against `DIRECTIONS`."""
    out = set()
    for imp in _imports(mods):
        source = package_of(imp.importer)
        if source == "serve.protocol":
            source = "serve"
        target = package_of(imp.target)
        if target not in DIRECTIONS[source]:
            out.add(f"{imp.importer}:{imp.line} imports {imp.target} ({source} -> {target})")
    return out


def test_packages_point_one_way() -> None:
    assert sorted(wrong_directions(_modules())) == []


def test_no_private_name_is_imported_across_modules() -> None:
    found = private_imports(_modules())
    assert sorted(found - KNOWN) == [], "private names imported across modules"
    assert sorted(KNOWN - found) == [], "fixed: remove these from KNOWN"


def test_no_import_cycles() -> None:
    found = {" <-> ".join(c) for c in cycles(_modules())}
    assert sorted(found - KNOWN) == [], "modules that depend on each other"


def test_modules_are_short() -> None:
    long = {
        m: n for m, p in _modules().items() if (n := p.read_text("utf-8").count("\n")) > MAX_LINES
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


def test_the_direction_check_sees_each_kind_of_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wrong-way imports are found eagerly, lazily, type-only and by a string; allowed ones pass."""
    root = tmp_path / "src" / PACKAGE
    for sub in ("eval", "serve", "cli", "detect"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    files = {
        "__init__.py": "",
        "core.py": "def f():\n    import randfeat.eval.oracle\n",
        "eval/oracle.py": "import randfeat.serve.protocol\nimport randfeat.detect.index\n",
        "eval/lazy.py": "import importlib\nM = importlib.import_module('randfeat.serve.app')\n",
        "serve/protocol.py": "",
        "serve/app.py": (
            "import logging\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from randfeat.eval.oracle import Oracle\n"
            "log = logging.getLogger('randfeat.eval')\n"  # a logger's name is no import
        ),
        "detect/index.py": "from randfeat import core\n",
        "cli/main.py": "import randfeat.serve.app\nimport randfeat.eval.lazy\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    monkeypatch.setattr(f"{__name__}.SRC", tmp_path / "src")
    assert wrong_directions(_modules()) == {
        "randfeat.core:2 imports randfeat.eval.oracle (core -> eval)",
        "randfeat.eval.lazy:2 imports randfeat.serve.app (eval -> serve)",
        "randfeat.serve.app:4 imports randfeat.eval.oracle (serve -> eval)",
    }


def _loaded_after(statement: str) -> set[str]:
    """The `randfeat` modules a fresh interpreter holds after running `statement`."""
    code = f"{statement}\nimport sys\nprint(' '.join(m for m in sys.modules if m.startswith('randfeat')))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "statement",
    ["import randfeat.eval.data", "import randfeat.eval.data.idx", "import randfeat.eval.attacks"],
)
def test_light_parts_of_eval_load_no_grid_report_or_server(statement: str) -> None:
    heavy = ("randfeat.serve", "randfeat.eval.grid", "randfeat.eval.report", "randfeat.cli")
    loaded = _loaded_after(statement)
    assert sorted(m for m in loaded if m.startswith(heavy)) == []
    assert statement.split()[-1] in loaded  # the probe itself ran


def test_the_lazy_names_of_eval_are_the_modules_own() -> None:
    """Every public name of `randfeat.eval` loads on first use and is its home module's object."""
    import importlib

    import randfeat.eval as rf_eval

    homes = vars(rf_eval)["_HOMES"]  # the lazy table, read as data (not imported across modules)
    assert sorted(homes) == sorted(rf_eval.__all__)
    for name, home in homes.items():
        assert getattr(rf_eval, name) is getattr(importlib.import_module(home), name)
    with pytest.raises(AttributeError, match="no attribute 'run_evl'"):
        _ = rf_eval.run_evl  # type: ignore[attr-defined]
    assert "run_eval" in _loaded_after(
        "from randfeat.eval import run_eval\nprint(run_eval.__name__)"
    )
