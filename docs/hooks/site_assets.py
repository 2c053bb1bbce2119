"""mkdocs hooks: ship the math renderer with the site and put the example notebooks in it.

- KaTeX, installed from npm by `npm ci` (scripts/setup.sh runs it; versions pinned in
  package-lock.json), is copied into `assets/katex/` of the built site, so the math of the pages and
  of the API reference renders in the reader's browser with no network at all.
- Every `examples/*.ipynb` becomes the page `examples/<name>/`; mkdocs-jupyter renders it, executing
  it at build time so the site shows current outputs (figures included).
- Notebook pages lose the scripts nbconvert links from a CDN (MathJax, Mermaid): the site's own KaTeX
  renders their math, and nothing is fetched when a page is viewed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

# What the site needs from the katex package's dist/ folder (the fonts are read by katex.min.css).
KATEX_FILES = ("katex.min.js", "katex.min.css", "contrib/auto-render.min.js", "fonts")
KATEX_DEST = "assets/katex"

_SCRIPT = re.compile(r"<script\b[^>]*>.*?</script>", re.I | re.S)
# A script that loads code from elsewhere: MathJax (nbconvert's <script src="...">, empty when no URL
# is configured) and Mermaid (an ES module that imports from a CDN when the page has a diagram).
_LOADS_REMOTE = re.compile(r"""src=["']\s*["']|https?://|MathJax""", re.I)


def _root(config: Any) -> Path:
    return Path(config.config_file_path).resolve().parent


def _katex_dist(config: Any) -> Path:
    dist = _root(config) / "node_modules" / "katex" / "dist"
    if not (dist / "katex.min.js").is_file():
        raise PluginError(
            f"KaTeX, which renders the site's math, is not installed: {dist} has no katex.min.js. "
            "Install it from npm with `npm ci` in the repository root (bash scripts/setup.sh does "
            "this when npm is on the PATH; Node.js >= 18)."
        )
    return dist


@event_priority(100)  # before mkdocs-jupyter's on_files, so that it picks the notebooks up
def on_files(files: Files, config: Any) -> Files:
    """Add KaTeX's files and the example notebooks to the site."""
    dist = _katex_dist(config)
    for name in KATEX_FILES:
        path = dist / name
        paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for p in paths:
            rel = p.relative_to(dist).as_posix()
            files.append(File.generated(config, f"{KATEX_DEST}/{rel}", abs_src_path=str(p)))
    root = _root(config)
    for nb in sorted((root / "examples").glob("*.ipynb")):
        files.append(
            File(
                f"examples/{nb.name}",
                src_dir=str(root),
                dest_dir=config.site_dir,
                use_directory_urls=config.use_directory_urls,
            )
        )
    return files


def on_page_content(html: str, page: Any, config: Any, files: Files) -> str:
    """Drop the CDN scripts (MathJax, Mermaid) that nbconvert puts in notebook pages."""
    if not page.file.src_uri.endswith(".ipynb"):
        return html
    return _SCRIPT.sub(lambda m: "" if _LOADS_REMOTE.search(m.group(0)) else m.group(0), html)
