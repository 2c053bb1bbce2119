"""`benchmarks/defense_in_depth.py --scale quick` end to end: the page, its cells, the verdict,
the plots, and a rerun that resumes instead of attacking again."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CELL = re.compile(r"^[+-]?\d+(\.\d+)? ± \d+(\.\d+)?( / \d+(\.\d+)?)?( \(.+\))?$")


def _rows(path: Path) -> int:
    return len(path.read_text().splitlines())


def _table_rows(body: str, title: str) -> list[list[str]]:
    """The body rows of the table after the paragraph starting with `title`, as cells."""
    lines = body[body.index(title) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_quick_scale_writes_the_page_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import defense_in_depth
    from common.defense_report import MARKS

    out, page = tmp_path / "out", tmp_path / "docs" / "defense-in-depth.md"
    page.parent.mkdir()
    page.write_text("# Defense in depth\n\nIntro by hand.\n\n<!-- generated:start -->\n<!-- generated:end -->\n")  # fmt: skip
    argv = ["--out", str(out), "--scale", "quick", "--data", "digits", "--workers", "1"]
    argv += ["--page", str(page), "--write"]
    assert defense_in_depth.main(argv) == 0
    files = sorted(out.glob("*.jsonl"))
    assert [f.name for f in files] == ["digits-none.jsonl", "digits-pooled-linf-log.jsonl", "digits-pooled-linf-reject.jsonl"]  # fmt: skip
    counts = {f.name: _rows(f) for f in files}

    text = page.read_text()
    assert text.startswith("# Defense in depth\n\nIntro by hand.")  # the hand-written part stays
    body = text[text.index("<!-- generated:start -->") : text.index("<!-- generated:end -->")]
    assert "python benchmarks/defense_in_depth.py --out OUT --scale quick --data digits" in body
    titles = ["**Robust accuracy (%), 50 queries**", "**Detection, 50 queries**",
              "**Paired differences, 50 queries**", "**Benign false positives**", "**Whose queries caused the flags**"]  # fmt: skip
    for title in titles:
        table = _table_rows(body, title)
        assert table, title
        for row in table:  # every cell filled: a figure or a marker of why it is missing
            assert all(row), (title, row)
    for row in _table_rows(body, titles[0]):
        assert all(CELL.match(c) or c in MARKS for c in row[1:]), row
    ran = {r[0]: r for r in _table_rows(body, titles[0])}
    assert CELL.match(ran["noise + detection (pooled-linf, reject)"][1])  # Square ran
    assert ran["noise + detection (blacklight, reject)"][1] == "n/s"  # not at quick scale
    assert "**Sybil**" in body and "n/s (not run at this scale)" in body

    # the verdict paragraph follows from the paired differences: > 2 SE holds, < -2 SE reversed
    paired = _table_rows(body, titles[2])
    noise: dict[str, set[str]] = {"reject": set(), "log": set()}
    for det, act, what, _, delta, said, *_ in paired:
        if delta == "n/s":
            continue
        value, se = (float(x) for x in delta.split(" ± "))
        expect = "holds" if value > 2 * se else "reversed" if value < -2 * se else "tie"
        assert said == expect, (det, act, delta, said)
        if det == "pooled-linf" and what.startswith("noise"):
            noise[act].add(said)
    verdicts = dict(re.findall(r"`pooled-linf`, (reject|log), 50 queries: defense in depth: (\w+)", body))  # fmt: skip
    assert sorted(verdicts) == ["log", "reject"]
    for act, found in noise.items():  # holds only when both differences hold
        overall = "holds" if found == {"holds"} else "reversed" if "reversed" in found else "tie"
        assert verdicts[act] == overall, (act, found)

    for kind in ("robust", "detected"):
        png = page.parent / f"defense-in-depth-digits-{kind}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
        assert f"({png.name})" in body

    # a rerun resumes every finished file: no new rows
    assert defense_in_depth.main(argv) == 0
    assert {f.name: _rows(f) for f in sorted(out.glob("*.jsonl"))} == counts


def test_bad_workers_fail_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import defense_in_depth

    with pytest.raises(SystemExit):
        defense_in_depth.main(["--out", str(tmp_path / "o"), "--workers", "0"])
    assert not (tmp_path / "o").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
