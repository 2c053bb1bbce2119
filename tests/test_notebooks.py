"""The notebooks in examples/ are part of the docs site, listed in its nav and linked from the README.

They are executed where their outputs are shown: tests/test_docs_site.py builds the site, which runs
every notebook against the current code (a cell that raises fails the build) and checks that each
page shows its figures. So they run once per test session, not twice.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.ipynb"))
IDS = [p.name for p in EXAMPLES]


def test_there_are_notebooks() -> None:
    assert EXAMPLES, "examples/ holds no notebook"


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_notebook_is_in_the_site_nav(path: Path) -> None:
    assert f"examples/{path.name}" in (ROOT / "mkdocs.yml").read_text(encoding="utf-8")


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_readme_links_the_rendered_page(path: Path) -> None:
    assert f"examples/{path.stem}/" in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_committed_without_outputs(path: Path) -> None:
    # The site shows outputs the current code produced; stored ones would only go stale in git.
    nb = nbformat.read(path, as_version=4)
    stored = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.outputs or c.execution_count)
    ]
    assert not stored, (
        f"{path.name}: cells {stored} have stored outputs; clear them "
        f"(jupyter nbconvert --clear-output --inplace {path.relative_to(ROOT)})"
    )
