"""`randfeat report`'s files: the table of one or more result files as Markdown, CSV and a plot.

[write_report][randfeat.eval.report.files.write_report] reads the result files
([randfeat.eval.results.file][]), summarizes each ([randfeat.eval.report.summary][]), combines the
tables, and writes them ([randfeat.eval.report.render][], [randfeat.eval.report.plot][]).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from randfeat.eval.errors import ReportError
from randfeat.eval.report.plot import plot_curves
from randfeat.eval.report.render import to_csv, to_markdown
from randfeat.eval.report.summary import Table, combine, summarize
from randfeat.eval.results.file import read_results

__all__ = ["FORMATS", "parse_formats", "write_report"]

FORMATS = ("md", "csv")
"""File formats `randfeat report --format` writes."""


def parse_formats(spec: str) -> tuple[str, ...]:
    """`"md,csv"` → `("md", "csv")`; `"none"` or `""` → `()`.

    Raises:
        ReportError: an unknown format.
    """
    items = [s.strip().lower() for s in spec.split(",") if s.strip()]
    if items == ["none"]:
        return ()
    bad = [s for s in items if s not in FORMATS]
    if bad:
        raise ReportError(
            f"Expected --format to be a comma list of {', '.join(FORMATS)} (or 'none'), but got "
            f"{spec!r}."
        )
    return tuple(dict.fromkeys(items))


def write_report(
    results: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    *,
    formats: Sequence[str] = FORMATS,
    plot: bool = False,
) -> tuple[Table, list[Path]]:
    """Summarize result files into one table and write its files.

    Files go to `out` (default: the first result file's directory), named after the result file
    (`results.jsonl` → `results.md`, `results.csv`, `results.png`); with several result files the
    tables are combined into `report.md` / `report.csv` and each file gets its plot.

    Returns:
        The (combined) table and the paths written.

    Raises:
        ReportError: a result file cannot be read (see
            [read_results][randfeat.eval.results.file.read_results]) or holds repeated rows.
        ImportError: `plot` without matplotlib.
    """
    paths = [Path(p) for p in results]
    loaded = [read_results(p) for p in paths]
    tables = []
    for p, res in zip(paths, loaded, strict=True):
        try:
            tables.append(summarize(res.header, res.rows))
        except ReportError as err:
            raise ReportError(f"Result file {str(p)!r}: {err}") from None
    table = combine(tables)
    directory = Path(out) if out is not None else paths[0].parent
    stem = paths[0].stem if len(paths) == 1 else "report"
    written = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for fmt in formats:
            target = directory / f"{stem}.{fmt}"
            target.write_text(to_markdown(table) if fmt == "md" else to_csv(table), "utf-8")
            written.append(target)
    except OSError as err:
        raise ReportError(f"Cannot write the table to {str(directory)!r}: {err}") from None
    if plot:
        for p, res in zip(paths, loaded, strict=True):
            written.append(plot_curves(res.header, res.rows, directory / f"{p.stem}.png"))
    return table, written
