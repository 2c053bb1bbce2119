"""Look at the built docs site in a real browser: headless Chromium, the site on localhost, no network.

    out=$(mktemp -d)
    .venv/bin/mkdocs build --site-dir "$out/site"
    .venv/bin/python scripts/docs_browser.py --site "$out/site" theory/ api/core/ \\
        --screenshots "$out/shots"

serves the built site on 127.0.0.1, opens each page in headless Chromium (Debian's `chromium`
package, or the browser named by $RANDFEAT_CHROMIUM) with every host name except 127.0.0.1 made
unresolvable, lets the page's scripts run, and checks the DOM they leave: every formula rendered by
KaTeX, none in error, no raw TeX left in the text. With --screenshots it also saves a PNG of each page.
Exit status 1 when a page fails. tests/test_docs_site.py runs the same checks in the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bs4 import BeautifulSoup

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Raw TeX that a reader would see as text: the arithmatex delimiters, $$, or a TeX command.
RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\\(?:frac|mathcal|nabla|sim|circ|mu|nu|delta)\b")


def find_chromium() -> str | None:
    """The Chromium to use: $RANDFEAT_CHROMIUM, else the first of `CHROMIUM_NAMES` on the PATH."""
    if os.environ.get("RANDFEAT_CHROMIUM"):
        return os.environ["RANDFEAT_CHROMIUM"]
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve(site: Path) -> Iterator[str]:
    """Serve `site` on 127.0.0.1 (a free port) while the block runs; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _run_chromium(chromium: str, url: str, *args: str, timeout: float = 90) -> str:
    with tempfile.TemporaryDirectory(prefix="randfeat-chromium-") as profile:
        cmd = [
            chromium,
            "--headless",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            # no network: every host name but the local server's address fails to resolve
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            # run the page's scripts (KaTeX) to completion before dumping or shooting
            "--virtual-time-budget=10000",
            *args,
            url,
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.insert(1, "--no-sandbox")  # Chromium refuses to start its sandbox as root
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{chromium} failed on {url} (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


def dump_dom(chromium: str, url: str) -> str:
    """The page's DOM after its scripts ran, as HTML."""
    return _run_chromium(chromium, url, "--dump-dom")


def screenshot(chromium: str, url: str, png: Path, width: int = 1280, height: int = 2400) -> None:
    """Save a `width` x `height` PNG of the page (the top of it, as a reader sees it)."""
    _run_chromium(
        chromium, url, "--hide-scrollbars", f"--window-size={width},{height}", f"--screenshot={png}"
    )


def has_math(html: str) -> bool:
    """Whether a built page (before its scripts run) holds math for KaTeX to render."""
    soup = BeautifulSoup(html, "html.parser")
    cells = " ".join(c.get_text() for c in soup.select(".jupyter-wrapper .jp-RenderedMarkdown"))
    return bool(soup.select(".arithmatex")) or re.search(r"\$[^$]+\$", cells) is not None


def math_problems(dom: str, expect_math: bool = True) -> list[str]:
    """What is wrong with the math of a rendered page; empty when every formula rendered.

    Checks that the page has rendered math at all (when `expect_math`), that every element
    pymdownx.arithmatex marked up holds KaTeX's output, that KaTeX reported no error, and that no
    raw TeX is left in the visible text (code blocks and KaTeX's own TeX annotations aside).
    """
    soup = BeautifulSoup(dom, "html.parser")
    problems = []
    rendered = soup.select(".katex")
    if expect_math and not rendered:
        problems.append("no formula rendered by KaTeX (no .katex element)")
    for el in soup.select(".arithmatex"):
        if not el.select(".katex"):
            problems.append(f"not rendered: {el.get_text()[:80]!r}")
    for el in soup.select(".katex-error"):
        problems.append(f"KaTeX error: {el.get('title', '')[:160]!r} in {el.get_text()[:80]!r}")
    for el in soup.select(
        "pre, code, script, style, .katex-mathml, annotation, .clipboard-copy-txt"
    ):
        el.decompose()
    text = soup.get_text(" ")
    for m in RAW_TEX.finditer(text):
        problems.append(f"raw TeX in the text: {text[max(0, m.start() - 40) : m.end() + 40]!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "pages", nargs="+", help="pages relative to the site root, e.g. theory/ api/core/"
    )
    parser.add_argument(
        "--site", type=Path, default=Path("site"), help="the built site (default: site)"
    )
    parser.add_argument("--screenshots", type=Path, help="save a PNG of each page in this folder")
    parser.add_argument("--height", type=int, default=2400, help="screenshot height in pixels")
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print(
            "no Chromium found: apt-get install chromium, or set RANDFEAT_CHROMIUM", file=sys.stderr
        )
        return 2
    if not (args.site / "index.html").is_file():
        print(
            f"{args.site} holds no built site: run `mkdocs build --site-dir {args.site}`",
            file=sys.stderr,
        )
        return 2
    failed = False
    with serve(args.site) as base:
        for page in args.pages:
            url = base + page.lstrip("/")
            static = args.site / page.lstrip("/") / "index.html"
            expect = static.is_file() and has_math(static.read_text(encoding="utf-8"))
            problems = math_problems(dump_dom(chromium, url), expect_math=expect)
            print(f"{page}: {'FAILED' if problems else 'ok' if expect else 'ok (no math)'}")
            for p in problems:
                print(f"  {p}")
            failed |= bool(problems)
            if args.screenshots:
                args.screenshots.mkdir(parents=True, exist_ok=True)
                png = args.screenshots / f"{page.strip('/').replace('/', '_') or 'index'}.png"
                screenshot(chromium, url, png, height=args.height)
                print(f"  screenshot: {png}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
