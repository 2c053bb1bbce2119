"""Paper-style tables and robustness curves from a result file of :mod:`randfeat.eval.results`.

The tables follow Tables 1–2 and 5 of Nguyen et al., "Understanding the Robustness of Randomized
Feature Defense Against Query-Based Adversarial Attacks" (ICLR 2024): one row per model × defense
(Base, Input = RND, Feature, AAA) with its clean accuracy, the achieved drop and ν, one column per
attack × query budget, and robust accuracy (accuracy under attack, higher is more robust) in each
cell. Each cell holds two figures:

* **verified**: ``1 − (verified successes) / N``, as the paper counts it: an image counts as fooled
  when a queried point inside the ε-ball was misclassified by a majority of ``votes`` forwards
  (appendix D.4). The first such point is biased toward lucky noise draws.
* **fresh**: ``1 − mean(fresh)``, where ``fresh`` is the probability that a *new* majority of
  ``votes`` forwards is fooled at the returned point (:func:`randfeat.eval.oracle.rejudge`): what a
  user of the defended model would see afterwards. For deterministic models both figures agree.

:func:`~randfeat.eval.plot.plot_curves` (in :mod:`randfeat.eval.plot`) draws robust accuracy
against queries, ``RA(q) = 1 − P[success_query <= q]``, from the same rows (matplotlib, the
optional ``plot`` extra, imported lazily). The Markdown and CSV renderings, :func:`to_markdown`
and :func:`to_csv`, live in :mod:`randfeat.eval.tables` and are re-exported here.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from randfeat.eval.results import RESULT_SCHEMA, ReportError, load_results
from randfeat.eval.tables import to_csv as to_csv
from randfeat.eval.tables import to_markdown as to_markdown

if TYPE_CHECKING:  # re-exported lazily by __getattr__ below (plot.py imports this module)
    from randfeat.eval.plot import plot_curves as plot_curves
    from randfeat.eval.plot import robust_curve as robust_curve

__all__ = [
    "Cell",
    "Column",
    "ReportError",
    "Table",
    "TableRow",
    "attack_label",
    "combine",
    "defense_label",
    "load_results",
    "main_report",
    "parse_formats",
    "plot_curves",
    "robust_curve",
    "summarize",
    "to_csv",
    "to_markdown",
    "write_report",
]

logger = logging.getLogger(__name__)

FORMATS = ("md", "csv")
"""File formats ``randfeat report --format`` writes."""

_ATTACK_NAMES = {
    "square": "Square",
    "nes": "NES",
    "signhunter": "SignHunter",
    "rays": "RayS",
    "signflip": "SignFlip",
}
_NORM_NAMES = {"linf": "ℓ∞", "l2": "ℓ2"}
_DEFENSE_NAMES = {"base": "Base", "input": "Input", "feature": "Feature", "aaa": "AAA"}
_ATTACK_FIELDS = ("image", "defense", "attack", "budget", "success", "success_query", "fresh")
_CLEAN_FIELDS = ("image", "defense", "correct")


@dataclass(frozen=True)
class Column:
    """One attack × budget column: ``attack`` as in the file, ``label`` as in the paper."""

    attack: str
    budget: int
    label: str


@dataclass(frozen=True)
class Cell:
    """Robust accuracy of one defense under one attack and budget (fractions in ``[0, 1]``).

    Attributes:
        n: attacked images with a row.
        verified: ``1 − mean(success)``, the paper's count (majority of ``votes`` at the first
            fooling point).
        fresh: ``1 − mean(fresh)``, re-judged afresh at the returned point.
        mean_queries: mean queries spent per image (until success, or the budget).
    """

    n: int
    verified: float
    fresh: float
    mean_queries: float


@dataclass(frozen=True)
class TableRow:
    """One model × defense row.

    Attributes:
        model: model name from the header.
        defense: defense name in the file (``base``, ``input@0.02``, ...).
        label: the paper's name (``Base``, ``Input``, ``Feature (≈2%)``, ``AAA``).
        nu: calibrated noise variance ν (``None`` for Base / AAA).
        target_drop: the drop ν was calibrated for (``None`` for Base / AAA).
        accuracy: clean accuracy on the calibration images (the defended model's mean over noise
            draws; the base model's for Base); ``None`` when the file has no calibration.
        drop: achieved drop ``base − defended`` on the calibration images.
        clean: clean accuracy on the attacked images (majority of ``votes`` forwards).
        n_clean: attacked images with a clean row.
        n_attacked: images the run attacks (from the header): a cell with fewer rows is marked.
        cells: ``(attack, budget) -> Cell`` for every column with rows.
    """

    model: str
    defense: str
    label: str
    nu: float | None
    target_drop: float | None
    accuracy: float | None
    drop: float | None
    clean: float | None
    n_clean: int
    n_attacked: int
    cells: Mapping[tuple[str, int], Cell]


@dataclass(frozen=True)
class Table:
    """A paper-style robustness table (see :func:`summarize`)."""

    title: str
    setting: str
    columns: tuple[Column, ...]
    rows: tuple[TableRow, ...]
    n_images: int
    votes: int
    legend: tuple[str, ...]


def attack_label(name: str, eot_m: int | None = None) -> str:
    """The table name of an attack: ``square-linf`` → ``Square ℓ∞``, ``rays`` → ``RayS``."""
    eot = name.startswith("eot-")
    base = name[4:] if eot else name
    family, _, norm = base.partition("-")
    label = _ATTACK_NAMES.get(family, family)
    if norm:
        label += f" {_NORM_NAMES.get(norm, norm)}"
    if eot:
        label = f"EOT-{eot_m} {label}" if eot_m else f"EOT {label}"
    return label


def defense_label(name: str, several_drops: bool) -> str:
    """The paper's name of a defense: ``input@0.02`` → ``Input`` (``Input (≈2%)`` if several)."""
    kind, _, drop = name.partition("@")
    label = _DEFENSE_NAMES.get(kind, kind)
    if drop and several_drops:
        label += f" (≈{_points(float(drop))}%)"
    return label


def _points(fraction: float) -> str:
    return f"{100 * fraction:.3g}"


def _check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    for i, r in enumerate(rows):
        kind = r.get("type")
        need = _ATTACK_FIELDS if kind == "attack" else _CLEAN_FIELDS if kind == "clean" else ()
        missing = [f for f in need if f not in r]
        if missing:
            raise ReportError(
                f"Row {i + 1} after the header (type {kind!r}) lacks field(s) "
                f"{', '.join(missing)}; expected the fields of RESULT_SCHEMA[{kind!r}]: "
                f"{', '.join(RESULT_SCHEMA[str(kind)])}."
            )


_Groups = dict[tuple[str, str, int], list[Mapping[str, Any]]]


def _group(rows: Sequence[Mapping[str, Any]]) -> tuple[dict[str, dict[Any, bool]], _Groups]:
    """Clean verdicts per defense and image; attack rows per (defense, attack, budget).

    A repeated (image, defense[, attack, budget]) keeps its first row.
    """
    clean: dict[str, dict[Any, bool]] = {}
    attacked: dict[tuple[str, str, int], dict[Any, Mapping[str, Any]]] = {}
    dupes = 0
    for r in rows:
        if r.get("type") == "clean":
            verdicts = clean.setdefault(str(r["defense"]), {})
            dupes += r["image"] in verdicts
            verdicts.setdefault(r["image"], bool(r["correct"]))
        elif r.get("type") == "attack":
            key = (str(r["defense"]), str(r["attack"]), int(r["budget"]))
            by_image = attacked.setdefault(key, {})
            dupes += r["image"] in by_image
            by_image.setdefault(r["image"], r)
    if dupes:
        logger.warning("Ignoring %d repeated row(s) (same image, defense, attack, budget).", dupes)
    return clean, {k: list(v.values()) for k, v in attacked.items()}


def summarize(header: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Table:
    """Aggregate the rows of one result file into a :class:`Table`.

    Rows follow the header's defense order, then any other defense found in the rows; columns
    follow the configured attack order, budgets ascending. A repeated (image, defense, attack,
    budget) keeps its first row (a warning says how many were dropped).

    Raises:
        ReportError: a row lacks a field the table needs.
    """
    _check_rows(rows)
    config = header.get("config", {})
    calibration: Mapping[str, Mapping[str, Any]] = header.get("calibration", {}) or {}
    model = str(header.get("model", {}).get("name", config.get("model", "model")))
    votes = int(config.get("votes", 9))
    eot_m = config.get("eot_m")

    clean, attacked = _group(rows)

    defenses = list(header.get("defenses", []))
    for name in [*clean, *(k[0] for k in attacked)]:
        if name not in defenses:
            defenses.append(name)
    order = list(config.get("attacks", []))
    order += sorted({k[1] for k in attacked} - set(order))
    columns = tuple(
        Column(a, b, f"{attack_label(a, eot_m)} {b}")
        for a in order
        for b in sorted({k[2] for k in attacked if k[1] == a})
    )
    drops = {str(d).partition("@")[2] for d in defenses if "@" in str(d)}
    base_acc = next((float(c["base_accuracy"]) for c in calibration.values()), None)
    n_attacked = int(header.get("n_attacked", config.get("n_images", 0)) or 0)

    table_rows = []
    for name in defenses:
        cal = calibration.get(name)
        cells = {}
        for col in columns:
            g = attacked.get((name, col.attack, col.budget))
            if g:
                n = len(g)
                cells[(col.attack, col.budget)] = Cell(
                    n=n,
                    verified=1.0 - sum(bool(r["success"]) for r in g) / n,
                    fresh=1.0 - sum(float(r["fresh"]) for r in g) / n,
                    mean_queries=sum(float(r.get("queries", math.nan)) for r in g) / n,
                )
        seen = clean.get(name, {})
        table_rows.append(
            TableRow(
                model=model,
                defense=name,
                label=defense_label(name, len(drops) > 1),
                nu=None if cal is None else float(cal["nu"]),
                target_drop=None if cal is None else float(cal["target_drop"]),
                accuracy=(float(cal["accuracy"]) if cal else base_acc if name == "base" else None),
                drop=None if cal is None else float(cal["drop"]),
                clean=sum(seen.values()) / len(seen) if seen else None,
                n_clean=len(seen),
                n_attacked=n_attacked,
                cells=cells,
            )
        )
    return _table(header, columns, tuple(table_rows), votes)


def _table(
    header: Mapping[str, Any], columns: tuple[Column, ...], rows: tuple[TableRow, ...], votes: int
) -> Table:
    config = header.get("config", {})
    data = header.get("data", {}).get("name", config.get("data", "?"))
    model = rows[0].model if rows else header.get("model", {}).get("name", "?")
    n = int(header.get("n_attacked", config.get("n_images", 0)) or 0)
    eps = header.get("eps", {})
    radii = _radii(header, columns)
    source = f" ({eps['source']})" if eps.get("source") else ""
    targets = sorted({r.target_drop for r in rows if r.target_drop is not None})
    calib = next(iter(header.get("calibration", {}).values()), None)
    setting = (
        f"{n} attacked images, {radii}{source}, success verified by a majority of {votes} votes"
    )
    if targets:
        setting += (
            "; ν calibrated to a clean-accuracy drop of "
            + " / ".join(f"≈{_points(t)}" for t in targets)
            + " points"
            + (f" on {calib['n_images']} held-out images" if calib else "")
        )
    setting += f"; device {header.get('device', '?')}."
    legend = [
        f"Cells: robust accuracy (%), verified / fresh. Verified = 1 − success rate as the paper "
        f"counts it (a majority of {votes} votes at the first fooling point); fresh = 1 − mean "
        f"probability that a new majority of {votes} votes is fooled at the returned point.",
        "Acc: clean accuracy (%) on the calibration images (a randomized defense: mean over noise "
        "draws); Drop: achieved drop in points; ν: noise variance (Input: on pixels in [0, 1]; "
        "Feature: on the perturbed features); Clean: accuracy (%) on the attacked images "
        f"(majority of {votes} votes).",
    ]
    incomplete = [
        f"{r.label} / {c.label}: {r.cells[(c.attack, c.budget)].n} of {r.n_attacked}"
        for r in rows
        for c in columns
        if (c.attack, c.budget) in r.cells and r.cells[(c.attack, c.budget)].n != r.n_attacked
    ]
    if incomplete:
        legend.append("* incomplete (images with rows): " + "; ".join(incomplete) + ".")
    return Table(
        title=f"{model} on {data}: robust accuracy (%) under query-based attacks",
        setting=setting,
        columns=columns,
        rows=rows,
        n_images=n,
        votes=votes,
        legend=tuple(legend),
    )


def _radii(header: Mapping[str, Any], columns: Sequence[Column]) -> str:
    """``"ℓ∞ ε = 0.2"`` (and ``ℓ2`` when an ℓ2 attack is in the table), from the header."""
    eps = header.get("eps", {})
    norms = {a: v.get("norm") for a, v in header.get("attacks", {}).items()}
    used = {norms.get(c.attack) or ("l2" if c.attack.endswith("-l2") else "linf") for c in columns}
    parts = []
    for k in ("linf", "l2"):
        if k in used:
            r = eps.get(k)
            parts.append(
                f"{_NORM_NAMES[k]} ε = {r:g}"
                if isinstance(r, (int, float))
                else f"{_NORM_NAMES[k]} ε = ?"
            )
    return ", ".join(parts) or "ε = ?"


def combine(tables: Sequence[Table]) -> Table:
    """One table from several (e.g. one result file per model, as the paper's Tables 1–2).

    Rows are concatenated; columns are the union, in order of first appearance.
    """
    if not tables:
        raise ValueError("Expected argument `tables` to hold at least one Table, but got none.")
    if len(tables) == 1:
        return tables[0]
    columns = tuple(dict.fromkeys(c for t in tables for c in t.columns))
    models = ", ".join(dict.fromkeys(r.model for t in tables for r in t.rows))
    return Table(
        title=f"{models}: robust accuracy (%) under query-based attacks",
        setting="\n".join(f"- {t.title.partition(':')[0]}: {t.setting}" for t in tables),
        columns=columns,
        rows=tuple(r for t in tables for r in t.rows),
        n_images=max(t.n_images for t in tables),
        votes=tables[0].votes,
        legend=tuple(dict.fromkeys(line for t in tables for line in t.legend)),
    )


# ---------------------------------------------------------------------------- the command
def parse_formats(spec: str) -> tuple[str, ...]:
    """``"md,csv"`` → ``("md", "csv")``; ``"none"`` or ``""`` → ``()``.

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

    Files go to ``out`` (default: the first result file's directory), named after the result file
    (``results.jsonl`` → ``results.md``, ``results.csv``, ``results.png``); with several result
    files the tables are combined into ``report.md`` / ``report.csv`` and each file gets its plot.

    Returns:
        The (combined) table and the paths written.

    Raises:
        ReportError: a result file cannot be read (see :func:`load_results`), or nothing is in it.
        ImportError: ``plot`` without matplotlib.
    """
    paths = [Path(p) for p in results]
    loaded = [load_results(p) for p in paths]
    table = combine([summarize(h, rows) for h, rows in loaded])
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
        from randfeat.eval.plot import plot_curves

        for p, (h, rows) in zip(paths, loaded, strict=True):
            written.append(plot_curves(h, rows, directory / f"{p.stem}.png"))
    return table, written


def main_report(args: Any) -> int:
    """``randfeat report``: print the table of ``args.results`` and write its files.

    ``args`` has ``results`` (paths), ``out`` (a directory or None), ``plot`` (bool) and
    ``format`` (``"md,csv"``). Returns the exit code (0).
    """
    import sys

    formats = parse_formats(str(getattr(args, "format", "md,csv")))
    table, written = write_report(
        list(args.results), getattr(args, "out", None), formats=formats, plot=bool(args.plot)
    )
    sys.stdout.write(to_markdown(table))
    if written:
        sys.stdout.write("\nWrote " + ", ".join(str(p) for p in written) + "\n")
    return 0


def __getattr__(name: str) -> Any:
    """``plot_curves`` and ``robust_curve``, which moved to :mod:`randfeat.eval.plot`.

    They stay importable from here; imported on first use, because :mod:`randfeat.eval.plot` builds
    on this module (its tables and names).
    """
    if name in ("plot_curves", "robust_curve"):
        from randfeat.eval import plot

        return getattr(plot, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
