"""Markdown and CSV renderings of a [Table][randfeat.eval.report.summary.Table].

The tables follow Tables 1–2 and 5 of Nguyen et al., "Understanding the Robustness of Randomized
Feature Defense Against Query-Based Adversarial Attacks" (ICLR 2024);
[summarize][randfeat.eval.report.summary.summarize] builds them from a result file.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence

from randfeat.eval.report.summary import Cell, Table, TableRow

__all__ = ["to_csv", "to_markdown"]

_KINDS = ("verified", "fresh", "n", "detected", "first_flag_median", "undetected")
"""The CSV columns of every cell (the last three empty without `--detect`)."""


def _fmt(x: float | None, spec: str, scale: float = 1.0) -> str:
    return "–" if x is None or not math.isfinite(x) else format(scale * x, spec)


def _nu(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _cell_text(row: TableRow, cell: Cell | None) -> str:
    if cell is None:
        return "–"
    mark = "*" if cell.n != row.n_attacked else ""
    return f"{100 * cell.verified:.1f} / {100 * cell.fresh:.1f}{mark}"


def _detection_text(cell: Cell | None) -> str:
    d = None if cell is None else cell.detection
    if d is None:
        return "–"
    undetected = f"{100 * d.undetected:.1f}"
    if math.isnan(d.detected):  # a worst case: the undetected successes only
        return f"– · – · {undetected}"
    first = "–" if d.median_first_flag is None else f"{d.median_first_flag:g}"
    return f"{100 * d.detected:.0f} · {first} · {undetected}"


def _cells(table: Table, row: TableRow) -> list[Cell | None]:
    """The row's cells in column order, then its worst cases."""
    cells = [row.cells.get((c.attack, c.budget)) for c in table.columns]
    return cells + [row.worst.get(b) for b in table.worst_budgets]


def _labels(table: Table) -> list[str]:
    return [c.label for c in table.columns] + [f"Worst case {b}" for b in table.worst_budgets]


def to_markdown(table: Table) -> str:
    """The table as GitHub Markdown (columns padded for a terminal), with its legend."""
    head = ["Model", "Defense", "ν", "Acc", "Drop", "Clean", *_labels(table)]
    body = []
    last_model = None
    for r in table.rows:
        body.append(
            [
                r.model if r.model != last_model else "",
                r.label,
                _nu(r.nu),
                _fmt(r.accuracy, ".2f", 100),
                _fmt(r.drop, ".2f", 100),
                _fmt(r.clean, ".1f", 100),
                *(_cell_text(r, c) for c in _cells(table, r)),
            ]
        )
        last_model = r.model
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    left = 2  # Model and Defense are text; the rest are numbers

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i < left else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    rule = (
        "|"
        + "|".join("-" * (w + 2) if i < left else "-" * (w + 1) + ":" for i, w in enumerate(widths))
        + "|"
    )
    out = [f"## {table.title}", "", table.setting, "", line(head), rule]
    out += [line(b) for b in body]
    if any(c is not None and c.detection for r in table.rows for c in _cells(table, r)):
        det_head = ["Model", "Defense", *_labels(table)]
        det = [
            [r.model, r.label, *(_detection_text(c) for c in _cells(table, r))] for r in table.rows
        ]
        out += [
            "",
            "Query detection: detected (%) · median queries to the first flag · "
            "fooled before the first flag (%)",
            "",
        ]
        out += ["| " + " | ".join(det_head) + " |", "|" + "---|" * len(det_head)]
        out += ["| " + " | ".join(b) + " |" for b in det]
    out += ["", *table.legend]
    return "\n".join(out) + "\n"


def to_csv(table: Table) -> str:
    """The table as CSV: one line per row, percentages as numbers, each cell as two columns."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    fixed = ["model", "defense", "label", "nu", "target_drop_pct", "accuracy_pct", "drop_pct"]
    w.writerow(
        [
            *fixed,
            "clean_pct",
            "n_clean",
            *(f"{label} {kind}" for label in _labels(table) for kind in _KINDS),
        ]
    )

    def num(x: float | None, scale: float = 100.0) -> str:
        if x is None:
            return ""
        return f"{x:.6g}" if scale == 1.0 else f"{scale * x:.2f}"

    for r in table.rows:
        cells: list[str] = []
        for cell in _cells(table, r):
            cells += (
                ["", "", "0"]
                if cell is None
                else [num(cell.verified), num(cell.fresh), str(cell.n)]
            )
            d = None if cell is None else cell.detection
            cells += (
                ["", "", ""]
                if d is None
                else [num(d.detected), num(d.median_first_flag, 1.0), num(d.undetected)]
            )
        w.writerow(
            [
                r.model,
                r.defense,
                r.label,
                num(r.nu, 1.0),
                num(r.target_drop),
                num(r.accuracy),
                num(r.drop),
                num(r.clean),
                r.n_clean,
                *cells,
            ]
        )
    return buf.getvalue()
