"""Rewrite reStructuredText in docstrings as the Markdown that mkdocstrings renders.

    .venv/bin/python scripts/convert_docstrings.py                 # every module under src/randfeat
    .venv/bin/python scripts/convert_docstrings.py src/randfeat/theory.py --check

What changes, in module, class, function and attribute docstrings:

- ``:math:`a` `` becomes `$a$`; a `.. math::` block becomes a `$$ ... $$` block (one per equation);
- ``:class:`X` ``, `:func:`, `:meth:`, `:mod:`, `:attr:`, `:data:`, `:exc:`, `:obj:` (with `~` or
  an explicit title) become a mkdocstrings link ``[`X`][randfeat.mod.X]`` when the site documents
  the object they name (resolved like Python does from the docstring's scope, checked against the
  site's objects.inv), else plain code `` `X` ``;
- an `Example:` section whose first line is a `>>>` prompt becomes `Examples:`, which mkdocstrings
  renders as code;
- ``` ``code`` ``` becomes `` `code` ``.

The text is converted at its runtime value, then written back as a literal that evaluates to exactly
the converted text: a docstring whose new text holds backslashes (TeX) becomes a raw string, so
`"\\\\nabla"` reads `r"\\nabla"`. Docstrings with nothing to convert are left byte for byte, and a
second run changes nothing. Whatever reStructuredText is left (a directive this script does not
know) is reported with its line. --check only reports the files that would change (exit status 1).

The inventory comes from --inventory, else from a site built for the purpose (notebooks not
executed), so run it after the API pages (docs/api/*.md) list what the site documents.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import tokenize
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE = "randfeat"

ROLE = re.compile(
    r":(?:py:)?(?P<role>class|func|meth|mod|attr|data|exc|obj):`(?P<tilde>~?)(?P<body>[^`]+)`"
)
MATH_ROLE = re.compile(r":math:`(?P<tex>[^`]+)`")
MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<rest>.*)$")
EXAMPLE_HEADER = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$")
DOUBLE_BACKTICKS = re.compile(r"(?<!`)``(?P<code>[^`]+?)``(?!`)")
LEFTOVER = re.compile(r":[a-z:]+:`|^[ \t]*\.\. [a-z-]+::", re.M)


# --- the site's inventory -------------------------------------------------------------------------


def read_inventory(path: Path) -> dict[str, str]:
    """Map every object name in a Sphinx objects.inv (v2) to the id of the anchor it points at."""
    data = path.read_bytes()
    header_end = 0
    for _ in range(4):
        header_end = data.index(b"\n", header_end) + 1
    anchors = {}
    for line in zlib.decompress(data[header_end:]).decode().splitlines():
        m = re.match(r"(?x) (?P<name>\S+) \s+ \S+:\S+ \s+ -?\d+ \s+ (?P<uri>\S*) \s+ .*", line)
        if m:
            uri = m["uri"].replace("$", m["name"])
            anchors[m["name"]] = uri.partition("#")[2] or m["name"]
    return anchors


def build_inventory(tmp: Path) -> Path:
    """Build the site (notebooks not executed) to read what it documents."""
    env = dict(os.environ, RANDFEAT_DOCS_EXECUTE_NOTEBOOKS="false", NO_MKDOCS_2_WARNING="1")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--quiet", "--site-dir", str(tmp / "site")]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return tmp / "site" / "objects.inv"


# --- names ---------------------------------------------------------------------------------------


class Resolver:
    """Resolve a name written in a docstring to the path of an object the site documents."""

    def __init__(self, anchors: dict[str, str]) -> None:
        import griffe  # mkdocstrings' own loader: the same view of the package as the site's

        self.anchors = anchors
        self.package = griffe.load(PACKAGE, search_paths=[str(SRC)], resolve_aliases=False)

    def _member_path(self, scope: str, name: str) -> list[str]:
        try:
            obj = (
                self.package[scope.removeprefix(PACKAGE).lstrip(".")]
                if scope != PACKAGE
                else self.package
            )
        except KeyError:
            return []
        first, _, rest = name.partition(".")
        member = obj.members.get(first) if hasattr(obj, "members") else None
        if member is None:
            return []
        suffix = f".{rest}" if rest else ""
        paths = [member.path + suffix]
        if member.is_alias:
            paths.insert(0, member.target_path + suffix)
            with contextlib.suppress(Exception):  # an alias to outside the package (torch, stdlib)
                paths.insert(0, member.final_target.path + suffix)
        return paths

    def resolve(self, name: str, scopes: list[str]) -> str | None:
        """The anchor the site has for `name` seen from `scopes` (innermost first), or None."""
        candidates = [name] if "." in name else []  # a full path, or `Class.method` in scope below
        for scope in scopes:
            candidates += self._member_path(scope, name)
        for c in candidates:
            if c in self.anchors:
                return self.anchors[c]
        return None


# --- text ----------------------------------------------------------------------------------------


def _convert_math_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = MATH_DIRECTIVE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent = m["indent"]
        body = [m["rest"]] if m["rest"].strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or _width(lines[i]) > _width(indent)):
            body.append(lines[i])
            i += 1
        equations: list[list[str]] = [[]]
        for line in body:
            if line.strip():
                equations[-1].append(line.strip())
            elif equations[-1]:
                equations.append([])
        if out and out[-1].strip():
            out.append("")
        for k, eq in enumerate(e for e in equations if e):
            if k:
                out.append("")
            out += [f"{indent}$$", *(f"{indent}{line}" for line in eq), f"{indent}$$"]
        if i < len(lines):
            out.append("")
        elif body and not body[-1].strip():
            out.append(body[-1])  # the indentation before the docstring's closing quotes
    return out


def _width(prefix: str) -> int:
    return len(prefix) - len(prefix.lstrip())


def _convert_examples(lines: list[str]) -> list[str]:
    out = list(lines)
    for i, line in enumerate(lines):
        m = EXAMPLE_HEADER.match(line)
        following = next((x for x in lines[i + 1 :] if x.strip()), "")
        if m and following.lstrip().startswith(">>>"):
            out[i] = f"{m['indent']}Examples:"
    return out


def convert_text(text: str, scopes: list[str], resolver: Resolver) -> str:
    """The docstring `text` in Markdown; `scopes` are where its names are looked up, innermost first."""
    lines = _convert_examples(_convert_math_blocks(text.split("\n")))

    def role(m: re.Match[str]) -> str:
        body = m["body"].strip()
        title, target = body, body
        explicit = re.fullmatch(r"(?s)(?P<title>.*?)\s*<(?P<target>[^<>]+)>", body)
        if explicit:
            title, target = explicit["title"], explicit["target"]
        target = target.removeprefix("~").removesuffix("()")
        if not explicit and m["tilde"]:
            title = target.rsplit(".", 1)[-1]
        anchor = resolver.resolve(target, scopes)
        return f"[`{title}`][{anchor}]" if anchor else f"`{title}`"

    out = []
    for line in lines:
        if line.lstrip().startswith((">>>", "...")):
            out.append(line)
            continue
        line = MATH_ROLE.sub(lambda m: f"${m['tex']}$", line)
        line = ROLE.sub(role, line)
        line = DOUBLE_BACKTICKS.sub(lambda m: f"`{m['code']}`", line)
        out.append(line)
    return "\n".join(out)


# --- source --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Docstring:
    node: ast.Constant
    scopes: list[str]


def _docstrings(tree: ast.Module, module: str) -> Iterator[Docstring]:
    def body_strings(
        body: list[ast.stmt], scopes: list[str], everywhere: bool
    ) -> Iterator[Docstring]:
        for k, stmt in enumerate(body):
            if (
                isinstance(stmt, ast.Expr)
                and isinstance(stmt.value, ast.Constant)
                and isinstance(stmt.value.value, str)
            ):
                # the first statement, or an attribute docstring right after an assignment
                if k == 0 or (everywhere and isinstance(body[k - 1], ast.Assign | ast.AnnAssign)):
                    yield Docstring(stmt.value, scopes)
            elif isinstance(stmt, ast.ClassDef):
                yield from body_strings(stmt.body, [f"{scopes[0]}.{stmt.name}", *scopes], True)
            elif isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                yield from body_strings(stmt.body[:1], scopes, False)

    yield from body_strings(tree.body, [module], True)


def _literal(text: str, quote: str) -> str:
    if "\\" in text and quote not in text and not text.endswith("\\"):
        literal = f"r{quote}{text}{quote}"
    else:
        escaped = text.replace("\\", "\\\\").replace(quote, "\\" + quote[0] * 3)
        literal = f"{quote}{escaped}{quote}"
    if ast.literal_eval(literal) != text:  # never change what the docstring says at runtime
        raise ValueError(f"cannot write {text[:60]!r}... as a literal")
    return literal


def _offset(lines: list[str], line: int, col: int) -> int:
    """Character offset in the file of (1-based line, UTF-8 byte column)."""
    return sum(len(x) for x in lines[: line - 1]) + len(lines[line - 1].encode()[:col].decode())


def convert_source(
    source: str, module: str, resolver: Resolver
) -> tuple[str, list[tuple[int, str]]]:
    """(the source with its docstrings converted, leftover reStructuredText as (line, text))."""
    lines = source.splitlines(keepends=True)
    edits = []
    leftovers = []
    for doc in _docstrings(ast.parse(source), module):
        node = doc.node
        start = _offset(lines, node.lineno, node.col_offset)
        end = _offset(lines, node.end_lineno or node.lineno, node.end_col_offset or 0)
        segment = source[start:end]
        tokens = [
            t
            for t in tokenize.generate_tokens(io.StringIO(segment).readline)
            if t.type == tokenize.STRING
        ]
        prefix = re.match(r"[A-Za-z]*", segment)[0].lower()  # type: ignore[index]
        if len(tokens) != 1 or set(prefix) - {"r", "u"}:
            continue  # implicit concatenation or an f/b-string: not a docstring we rewrite
        new = convert_text(node.value, doc.scopes, resolver)
        leftovers += [
            (node.lineno + new[: m.start()].count("\n"), m.group(0).strip())
            for m in LEFTOVER.finditer(new)
        ]
        if new != node.value:
            quote = segment[len(prefix) : len(prefix) + 3]
            quote = quote if quote in ('"""', "'''") else '"""'
            edits.append((start, end, _literal(new, quote)))
    for start, end, literal in sorted(edits, reverse=True):
        source = source[:start] + literal + source[end:]
    return source, leftovers


def _module_name(path: Path) -> str:
    parts = path.resolve().relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="*", type=Path, default=[SRC / PACKAGE])
    parser.add_argument(
        "--inventory", type=Path, help="the site's objects.inv (default: build the site)"
    )
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a file would change"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        inventory = args.inventory or build_inventory(Path(tmp))
        resolver = Resolver(read_inventory(inventory))
    files = sorted(
        f.resolve() for p in args.paths for f in ([p] if p.is_file() else p.rglob("*.py"))
    )
    changed, leftovers = [], []
    for f in files:
        old = f.read_text(encoding="utf-8")
        new, left = convert_source(old, _module_name(f), resolver)
        leftovers += [f"{f.relative_to(ROOT)}:{line}: {text}" for line, text in left]
        if new != old:
            changed.append(f)
            if not args.check:
                f.write_text(new, encoding="utf-8")
    verb = "would change" if args.check else "changed"
    for f in changed:
        print(f"{verb}: {f.relative_to(ROOT)}")
    for left in leftovers:
        print(f"reStructuredText left: {left}", file=sys.stderr)
    print(f"{len(changed)} of {len(files)} files {verb}")
    return 1 if (args.check and changed) or leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
