"""The docs site builds strictly and reads as a person sees it: math rendered, API reference in
Markdown, examples as code, notebooks with their figures, every internal link alive, and nothing
fetched from the network.

One test builds the site with `mkdocs build --strict`, executing the example notebooks (so it is
also what runs them; tests/test_notebooks.py checks the rest), then runs every check as a subtest.
One test item, not one per check, so that under pytest-xdist a single worker builds the site while
the other runs the rest of the suite. The browser checks serve the built site on 127.0.0.1 to
headless Chromium with every other host unresolvable. Where KaTeX (npm), node or Chromium is missing
the checks that need it are skipped with the fix, except under CI (CI=true), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest

from _scripts import load_script

bs4 = pytest.importorskip("bs4")
pytest.importorskip("mkdocs")
docs_browser = load_script("docs_browser")

ROOT = Path(__file__).resolve().parent.parent
KATEX = ROOT / "node_modules" / "katex"
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
# Pages that must hold rendered math (so the math checks cannot pass on a site without any).
MATH_PAGES = ["theory/", "defense/", "api/theory/", "api/core/", "examples/theory_and_calibration/"]
# Pages opened in Chromium: a Markdown page, two API pages and a notebook.
BROWSER_PAGES = ["theory/", "api/theory/", "api/core/", "examples/theory_and_calibration/"]
SPHINX = re.compile(r":(?:math|class|mod|func|meth|attr|data|exc|obj):|\.\. math::")
UNRESOLVED_REF = re.compile(r"\]\[[\w.]+\]")
# $$...$$ and $...$ in a notebook's Markdown cells, as KaTeX's auto-render finds them.
NB_MATH = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$", re.S)
# An absolute path under a home, root, work or temporary folder names one machine's files: a reader
# cannot run a command that holds one. Relative paths, `~/...` and fixed system locations (Debian's
# /usr/share/datasets/...) are fine. Not after a word character, `.`, `~` or `-`: `docs/tmp/`,
# `../tmp/`, `~/work/` and URL paths such as `example.org/tmp/` are not absolute paths.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:home|root|work|tmp|var/tmp)/")
# pymdownx.snippets' include line (`--8<-- "CHANGELOG.md"`): the included file is part of the page.
SNIPPET = re.compile(r'^-{1,3}8<-{1,3}\s+"([^"]+)"', re.M)


def _page_sources() -> list[Path]:
    """What the site's pages and the README are made of: the Markdown under docs/ (with the files
    its snippets include), README.md and the example notebooks."""
    pages = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md", *NOTEBOOKS]
    included = [
        ROOT / m.group(1)
        for page in pages
        if page.suffix == ".md"
        for m in SNIPPET.finditer(page.read_text(encoding="utf-8"))
    ]
    return pages + included


def test_no_page_names_a_machines_paths() -> None:
    """A plain text check, no build: commands in the docs must run on a reader's machine."""
    sources = _page_sources()
    assert ROOT / "CHANGELOG.md" in sources  # the snippet include is followed
    bad = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()[:160]}"
        for path in sources
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if MACHINE_PATH.search(line)
    ]
    assert not bad, (
        "absolute paths of one machine in the docs (write a relative path, `~/...`, "
        "`$(mktemp -d)` or a placeholder such as OUT):\n" + "\n".join(bad)
    )


def _require(ok: object, why: str) -> None:
    if not ok:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{why} (required under CI)")
        pytest.skip(why)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built with `mkdocs build --strict` into a temporary folder, notebooks executed."""
    _require((KATEX / "dist" / "katex.min.js").is_file(), "KaTeX is not installed: run `npm ci`")
    tmp = tmp_path_factory.mktemp("docs")
    env = dict(os.environ)
    env.update(
        RANDFEAT_DOCS_NOTEBOOK_CACHE="false",  # execute the notebooks against the current code
        RANDFEAT_CACHE=str(tmp / "cache"),  # hermetic: never the user's cached digits CNN
        NO_MKDOCS_2_WARNING="1",
    )
    env.pop("MPLBACKEND", None)  # the kernel's inline backend makes the figures
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp / "site")]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False
    )
    assert proc.returncode == 0, (
        f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    )
    return tmp / "site"


def _html_pages(site: Path) -> list[Path]:
    return sorted(site.rglob("*.html"))


@cache
def _soup(path: Path) -> bs4.BeautifulSoup:
    return bs4.BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")


@cache
def _page_prose(path: Path) -> str:
    return _prose(_soup(path))


def _prose(el: bs4.Tag) -> str:
    """The visible text of `el` outside code, scripts and styles (a copy; `el` is left intact)."""
    el = bs4.BeautifulSoup(str(el), "html.parser")
    for code in el.select("pre, code, script, style, .clipboard-copy-txt"):
        code.decompose()
    return el.get_text(" ")


def _article(path: Path) -> bs4.Tag:
    article = _soup(path).select_one("article")
    assert article is not None, f"{path}: no <article>"
    return article


def _page(site: Path, page: str) -> Path:
    path = site / page / "index.html"
    assert path.is_file(), f"the site has no page {page}"
    return path


def _rel(site: Path, path: Path) -> str:
    return path.relative_to(site).as_posix()


def _check_no_sphinx_roles_or_unresolved_references(site: Path) -> None:
    bad = []
    for path in _html_pages(site):
        text = _page_prose(path)
        bad += [
            f"{_rel(site, path)}: ...{text[max(0, m.start() - 50) : m.end() + 50]!r}"
            for m in SPHINX.finditer(text)
        ]
        bad += [
            f"{_rel(site, path)}: unresolved {m.group(0)}" for m in UNRESOLVED_REF.finditer(text)
        ]
    assert not bad, "reStructuredText left in the site:\n" + "\n".join(bad)


def _check_examples_render_as_code(site: Path) -> None:
    loose = [
        f"{_rel(site, path)}: {line.strip()[:100]!r}"
        for path in _html_pages(site)
        for line in _page_prose(path).splitlines()
        if ">>>" in line
    ]
    assert not loose, "doctest lines rendered as prose, not code:\n" + "\n".join(loose)
    core = _article(_page(site, "api/core"))
    assert any(">>>" in pre.get_text() for pre in core.select("pre")), (
        "api/core shows no example code"
    )


def _math_sources(path: Path) -> list[tuple[str, bool]]:
    """The TeX of every formula on a page, with whether it is display math."""
    soup = _soup(path)
    out = []
    for el in soup.select(".arithmatex"):
        tex = el.get_text().strip()
        if tex[:2] in ("\\(", "\\[") and tex[-2:] in ("\\)", "\\]"):
            tex = tex[2:-2]
        out.append((tex, el.name == "div"))
    for cell in soup.select(".jupyter-wrapper .jp-RenderedMarkdown"):
        for m in NB_MATH.finditer(_prose(cell)):
            out.append((m.group(1) or m.group(2), m.group(1) is not None))
    return out


def _check_math_pages_load_the_shipped_katex(site: Path) -> None:
    with_math = {path for path in _html_pages(site) if _math_sources(path)}
    missing = [p for p in MATH_PAGES if _page(site, p) not in with_math]
    assert not missing, f"pages without math markup: {missing}"
    for path in with_math:
        soup = _soup(path)
        scripts = [Path(urlsplit(s["src"]).path).name for s in soup.select("script[src]")]
        styles = [Path(urlsplit(s["href"]).path).name for s in soup.select("link[rel=stylesheet]")]
        assert {"katex.min.js", "katex-init.js"} <= set(scripts), f"{_rel(site, path)}: {scripts}"
        assert "katex.min.css" in styles, f"{_rel(site, path)}: {styles}"
        # math outside the renderer's markup stays raw TeX: the page shows "\(" or "\frac" as text
        article = bs4.BeautifulSoup(str(_article(path)), "html.parser")
        for el in article.select(".arithmatex"):
            el.decompose()
        for cell in article.select(".jp-RenderedMarkdown"):
            cell.replace_with(NB_MATH.sub(" ", _prose(cell)))
        raw = [m.group(0) for m in docs_browser.RAW_TEX.finditer(_prose(article))]
        assert not raw, f"{_rel(site, path)}: raw TeX outside the math markup: {raw}"


def _check_every_formula_parses_with_katex(site: Path) -> None:
    node = shutil.which("node")
    _require(node, "node is not installed (it runs KaTeX on every formula of the site)")
    formulas = [
        {"page": _rel(site, path), "tex": tex, "display": display}
        for path in _html_pages(site)
        for tex, display in _math_sources(path)
    ]
    assert len(formulas) > 50, f"only {len(formulas)} formulas found in the site"
    script = (
        "const katex = require(process.argv[1]);"
        "const items = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
        "const bad = [];"
        "for (const it of items) { try { katex.renderToString(it.tex, {displayMode: it.display,"
        " throwOnError: true}); } catch (e) { bad.push(it.page + ': ' + e.message); } }"
        "console.log(JSON.stringify(bad));"
    )
    proc = subprocess.run(
        [node, "-e", script, str(KATEX)],
        input=json.dumps(formulas),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    bad = json.loads(proc.stdout)
    assert not bad, "KaTeX cannot typeset:\n" + "\n".join(bad)


def _check_notebook_page_shows_its_outputs(site: Path, notebook: Path) -> None:
    path = _page(site, f"examples/{notebook.stem}")
    outputs = _soup(path).select(".jp-OutputArea-output")
    mimes = [o.get("data-mime-type") for o in outputs]
    images = [o for o in outputs if o.select_one('img[src^="data:image/png;base64,"]')]
    assert images, f"{notebook.name}: no figure among the outputs ({mimes})"
    stderr = [
        o.get_text()[:300]
        for o in outputs
        if o.get("data-mime-type") == "application/vnd.jupyter.stderr"
    ]
    assert not stderr, f"{notebook.name} writes to stderr (warnings or errors):\n" + "\n".join(
        stderr
    )
    index = _soup(site / "index.html")
    assert index.select_one(f'a[href$="examples/{notebook.stem}/"]'), (
        f"{notebook.name} is not in the nav"
    )


def _targets(soup: bs4.BeautifulSoup) -> Iterator[tuple[str, str]]:
    for tag, attr in (
        ("a", "href"),
        ("link", "href"),
        ("script", "src"),
        ("img", "src"),
        ("iframe", "src"),
    ):
        for el in soup.find_all(tag):
            if el.get(attr):
                yield tag, el[attr]


@cache
def _ids(path: Path) -> frozenset[str]:
    soup = _soup(path)
    return frozenset(el["id"] for el in soup.find_all(id=True)) | frozenset(
        el["name"] for el in soup.find_all("a", attrs={"name": True})
    )


def _check_internal_links_resolve_and_nothing_comes_from_the_network(site: Path) -> None:
    broken, remote = [], []
    for path in _html_pages(site):
        page_url = "/" + _rel(site, path)
        for script in _soup(path).find_all("script"):
            if script.has_attr("src") and not script["src"].strip():
                broken.append(f'{_rel(site, path)}: <script src=""> (loads the page itself)')
            if not script.has_attr("src") and (
                url := re.search(r"https?://[^\s\"')]+", script.get_text())
            ):
                remote.append(f"{_rel(site, path)}: inline <script> loads {url.group(0)}")
        for tag, target in _targets(_soup(path)):
            parts = urlsplit(target)
            if parts.scheme in ("mailto", "data", "javascript"):
                continue
            if parts.scheme or target.startswith("//"):
                if tag != "a":  # a hyperlink to the web is fine; loading a resource from it is not
                    remote.append(f"{_rel(site, path)}: <{tag}> {target}")
                continue
            resolved = urlsplit(urljoin(page_url, target))
            dest = site / unquote(resolved.path).lstrip("/")
            if dest.is_dir() or resolved.path.endswith("/"):
                dest = dest / "index.html"
            if not dest.is_file():
                broken.append(
                    f"{_rel(site, path)}: {target} -> {_rel(site, dest) if dest.is_relative_to(site) else dest}"
                )
            elif (
                resolved.fragment
                and dest.suffix == ".html"
                and unquote(resolved.fragment) not in _ids(dest)
            ):
                broken.append(f"{_rel(site, path)}: {target} (no #{resolved.fragment} there)")
    assert not broken and not remote, (
        "broken internal links:\n"
        + "\n".join(sorted(set(broken)))
        + "\nresources fetched from the network when a page is viewed:\n"
        + "\n".join(sorted(set(remote)))
    )


def _check_math_renders_in_chromium(site: Path, page: str) -> None:
    chromium = docs_browser.find_chromium()
    _require(
        chromium, "Chromium is not installed: apt-get install chromium (or set RANDFEAT_CHROMIUM)"
    )
    with docs_browser.serve(site) as base:
        problems = docs_browser.math_problems(docs_browser.dump_dom(chromium, base + page))
    assert not problems, f"{page} in Chromium:\n" + "\n".join(problems)


def test_the_site_reads_as_a_person_sees_it(site: Path, subtests: pytest.Subtests) -> None:
    checks = [
        _check_no_sphinx_roles_or_unresolved_references,
        _check_examples_render_as_code,
        _check_math_pages_load_the_shipped_katex,
        _check_every_formula_parses_with_katex,
        _check_internal_links_resolve_and_nothing_comes_from_the_network,
    ]
    for check in checks:
        with subtests.test(msg=check.__name__.removeprefix("_check_")):
            check(site)
    for notebook in NOTEBOOKS:
        with subtests.test(msg="notebook_page_shows_its_outputs", notebook=notebook.name):
            _check_notebook_page_shows_its_outputs(site, notebook)
    for page in BROWSER_PAGES:
        with subtests.test(msg="math_renders_in_chromium", page=page):
            _check_math_renders_in_chromium(site, page)
