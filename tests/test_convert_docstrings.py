"""scripts/convert_docstrings.py: reStructuredText docstrings become the Markdown mkdocstrings renders,
with the runtime text otherwise unchanged, and a second run changes nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from _scripts import load_script

ROOT = Path(__file__).resolve().parent.parent


convert = load_script("convert_docstrings")


class FakeResolver:
    """Resolves like the real one, from a fixed table: (name, innermost scope) -> anchor."""

    def __init__(self, table: dict[tuple[str, str], str]) -> None:
        self.table = table
        self.asked: list[tuple[str, list[str]]] = []

    def resolve(self, name: str, scopes: list[str]) -> str | None:
        self.asked.append((name, scopes))
        return next((self.table[(name, s)] for s in scopes if (name, s) in self.table), None)


RESOLVER = FakeResolver(
    {
        ("randfeat.eval.oracle.Oracle", "m"): "randfeat.eval.oracle.Oracle",
        ("Calibration", "m"): "randfeat.Calibration",
        ("run", "m.Attack"): "randfeat.eval.attacks.base.Attack.run",
    }
)


def _docs(source: str) -> list[str]:
    tree = ast.parse(source)
    return [
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]


def test_math_role_in_a_non_raw_docstring_becomes_raw_dollar_math() -> None:
    source = (
        'def f():\n    """Margin :math:`\\\\mathcal{L}(x) = f_y - \\\\max_{i \\\\ne y} f_i`."""\n'
    )
    assert _docs(source) == ["Margin :math:`\\mathcal{L}(x) = f_y - \\max_{i \\ne y} f_i`."]
    new, left = convert.convert_source(source, "m", RESOLVER)
    assert new == 'def f():\n    r"""Margin $\\mathcal{L}(x) = f_y - \\max_{i \\ne y} f_i$."""\n'
    assert _docs(new) == ["Margin $\\mathcal{L}(x) = f_y - \\max_{i \\ne y} f_i$."]
    assert not left


def test_math_directive_becomes_one_display_block_per_equation() -> None:
    source = (
        'class A:\n    r"""Two equations:\n\n    .. math::\n\n'
        "        a = b\n            + c\n\n        d = e\n\n    Then prose.\n\n    .. math::\n\n"
        '        z = 1\n    """\n'
    )
    new, _ = convert.convert_source(source, "m", RESOLVER)
    assert _docs(new)[0] == (
        "Two equations:\n\n    $$\n    a = b\n    + c\n    $$\n\n    $$\n    d = e\n    $$\n\n"
        "    Then prose.\n\n    $$\n    z = 1\n    $$\n    "
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":class:`~randfeat.eval.oracle.Oracle`", "[`Oracle`][randfeat.eval.oracle.Oracle]"),
        (
            ":class:`randfeat.eval.oracle.Oracle`",
            "[`randfeat.eval.oracle.Oracle`][randfeat.eval.oracle.Oracle]",
        ),
        (
            ":class:`the oracle <randfeat.eval.oracle.Oracle>`",
            "[`the oracle`][randfeat.eval.oracle.Oracle]",
        ),
        (":func:`Calibration`", "[`Calibration`][randfeat.Calibration]"),
        (":meth:`run`", "[`run`][randfeat.eval.attacks.base.Attack.run]"),
        (":func:`_private_helper`", "`_private_helper`"),  # not on the site: plain code
        (":class:`~pathlib.Path`", "`Path`"),
        (":mod:`randfeat.eval.report`", "`randfeat.eval.report`"),
        ("``x: [N, C, H, W]``", "`x: [N, C, H, W]`"),
    ],
)
def test_roles_become_links_to_documented_objects_else_code(text: str, expected: str) -> None:
    source = f'class Attack:\n    """See {text}."""\n'
    new, _ = convert.convert_source(source, "m", RESOLVER)
    assert _docs(new) == [f"See {expected}."]


def test_names_are_looked_up_from_the_innermost_scope() -> None:
    resolver = FakeResolver({})
    convert.convert_source(
        'class Attack:\n    def run(self):\n        """:meth:`run`."""\n', "m", resolver
    )
    assert resolver.asked == [("run", ["m.Attack", "m"])]


def test_example_with_prompts_becomes_examples_and_prompts_stay_verbatim() -> None:
    source = (
        'def f():\n    """Do it.\n\n    Example:\n        >>> f(``1``)  # :class:`X`\n        2\n    """\n\n'
        'def g():\n    """Prose.\n\n    Example:\n        a sentence, not code.\n    """\n'
    )
    new, _ = convert.convert_source(source, "m", RESOLVER)
    f_doc, g_doc = _docs(new)
    assert "    Examples:\n        >>> f(``1``)  # :class:`X`\n        2\n" in f_doc
    assert "    Example:\n        a sentence" in g_doc


def test_unchanged_docstrings_and_non_docstrings_are_left_byte_for_byte() -> None:
    source = (
        '"""Plain \\\\ text."""\n\nX = 1\n"""Attribute :data:`X`."""\n\n'
        'def f():\n    s = """:math:`a` in a string that is no docstring"""\n'
        '    return f"""{s}"""\n\n'
        'def g():\n    ("""Implicit :math:`a` """ """concatenation""")\n'
    )
    new, _ = convert.convert_source(source, "m", RESOLVER)
    assert new == source.replace('"""Attribute :data:`X`."""', '"""Attribute `X`."""')


def test_a_second_run_changes_nothing() -> None:
    source = (
        '"""Module :math:`\\\\nu` and :class:`Calibration`.\n\n.. math::\n\n    a = \\\\frac{1}{2}\n"""\n\n'
        "class Attack:\n"
        '    """Run :meth:`run`.\n\n    Example:\n        >>> 1\n        1\n    """\n'
    )
    once, _ = convert.convert_source(source, "m", RESOLVER)
    assert once != source
    twice, _ = convert.convert_source(once, "m", RESOLVER)
    assert twice == once


def test_unknown_restructuredtext_is_reported_with_its_line() -> None:
    source = 'def f():\n    """Title.\n\n    .. note::\n\n        careful\n    """\n'
    new, left = convert.convert_source(source, "m", RESOLVER)
    assert new == source
    assert left == [(4, ".. note::")]


RST_LEFT = re.compile(
    r":(?:py:)?(?:math|class|func|meth|mod|attr|data|exc|obj):`|^[ \t]*\.\. math::", re.M
)


def test_the_package_docstrings_hold_no_restructuredtext() -> None:
    """Every docstring under src/randfeat is in the Markdown style (the site test sees only the
    documented objects; this one sees private modules too)."""
    found = []
    for path in sorted((ROOT / "src" / "randfeat").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for doc in convert._docstrings(tree, "m"):
            text = doc.node.value
            lines = text.split("\n")
            found += [
                f"{path.relative_to(ROOT)}:{doc.node.lineno + text[: m.start()].count(chr(10))}: {m.group(0).strip()}"
                for m in RST_LEFT.finditer(text)
            ]
            found += [
                f"{path.relative_to(ROOT)}:{doc.node.lineno + i}: Example: (write Examples:)"
                for i, line in enumerate(lines)
                if convert._convert_examples([line, *lines[i + 1 :]])[0] != line
            ]
    assert not found, "run scripts/convert_docstrings.py:\n" + "\n".join(found)
