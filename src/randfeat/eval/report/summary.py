"""Paper-style robustness tables from the rows of a result file: [summarize][randfeat.eval.report.summary.summarize].

The tables follow Tables 1–2 and 5 of Nguyen et al., "Understanding the Robustness of Randomized
Feature Defense Against Query-Based Adversarial Attacks" (ICLR 2024): one row per model × defense
(Base, Input = RND, Feature, AAA) with its clean accuracy, the achieved drop and ν, one column per
attack × query budget, and robust accuracy (accuracy under attack, higher is more robust) in each
cell. Each cell holds two figures:

- **verified**: $1 - \\text{verified successes} / N$, as the paper counts it: an image counts as
  fooled when a queried point inside the ε-ball was misclassified by a strict majority of `votes`
  forwards (the judging rule, appendix D.4). The first such point is biased toward lucky draws.
- **fresh**: $1 - \\operatorname{mean}(\\text{fresh})$, where `fresh` is the probability that a
  *new* majority of `votes` forwards is fooled at the returned point
  (`randfeat.eval.oracle.rejudge`): what a user of the defended model would see afterwards. For
  deterministic models both figures agree.

Per defense and budget, the **worst case** over the attacks that were run (AutoAttack's practice)
is the fraction of images that survive every attack: verified, an image none of them fooled;
fresh, the mean over images of $1 - \\max_a \\text{fresh}_a$ (the attacker keeps the returned
point most likely to fool).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from randfeat.eval.attacks.registry import ATTACKS
from randfeat.eval.errors import ReportError
from randfeat.eval.report.detection import Detection, detection_cell, detection_legend
from randfeat.eval.results.file import duplicate_rows
from randfeat.eval.results.records import AttackRow, CleanRow, Header, Row

__all__ = [
    "Cell",
    "Column",
    "Table",
    "TableRow",
    "attack_label",
    "attack_rows_by_cell",
    "combine",
    "defense_label",
    "points",
    "summarize",
]

_NORM_NAMES = {"linf": "ℓ∞", "l2": "ℓ2"}
_DEFENSE_NAMES = {
    "base": "Base",
    "input": "Input",
    "feature": "Feature",
    "keyed": "Keyed",
    "aaa": "AAA",
    "served": "Served",
}


@dataclass(frozen=True)
class Column:
    """One attack × budget column.

    Attributes:
        attack: the attack's name in the file.
        budget: the query budget.
        label: the column's title (`Square ℓ∞ 1000`).
    """

    attack: str
    budget: int
    label: str


@dataclass(frozen=True)
class Cell:
    """Robust accuracy of one defense under one attack (or the worst case) and budget.

    Attributes:
        n: attacked images with a row (for the worst case: with a row for every attack).
        verified: $1 - \\operatorname{mean}(\\text{success})$, the paper's count.
        fresh: $1 - \\operatorname{mean}(\\text{fresh})$, re-judged afresh at the returned point.
        mean_queries: mean queries spent per image (for the worst case: summed over the attacks).
        detection: what the detector saw (`--detect`; for the worst case, `undetected` only:
            the images fooled before their first flag by any attack).
    """

    n: int
    verified: float
    fresh: float
    mean_queries: float
    detection: Detection | None = None


@dataclass(frozen=True)
class TableRow:
    """One model × defense row.

    Attributes:
        model: model name from the header.
        defense: defense name in the file (`base`, `input@0.02`, ...).
        label: the paper's name (`Base`, `Input`, `Feature (≈2%)`, `AAA`).
        nu: calibrated noise variance ν (None for Base / AAA).
        target_drop: the drop ν was calibrated for (None for Base / AAA).
        accuracy: clean accuracy on the calibration images (the defended model's mean over noise
            draws; the base model's for Base); None when the file has no calibration.
        drop: achieved drop `base − defended` on the calibration images.
        clean: clean accuracy on the attacked images (by the judging rule).
        n_clean: attacked images with a clean row.
        n_attacked: images the run attacks (from the header): a cell with fewer rows is marked.
        cells: `(attack, budget) -> Cell` for every column with rows.
        worst: `budget -> Cell`, the worst case over the attacks with rows at that budget.
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
    cells: dict[tuple[str, int], Cell]
    worst: dict[int, Cell]


@dataclass(frozen=True)
class Table:
    """A paper-style robustness table (see [summarize][randfeat.eval.report.summary.summarize]).

    Attributes:
        title: `"<model> on <data>: robust accuracy (%) under query-based attacks"`.
        setting: one sentence (a list for combined tables) with the protocol's settings.
        columns: attack × budget columns.
        worst_budgets: budgets with a worst-case column (those with at least two attacks).
        rows: model × defense rows.
        n_images: attacked images.
        votes: the judging rule's forwards.
        radii: the radii of the attacks in the table (`"ℓ∞ ε = 0.2"`).
        legend: lines explaining the figures.
    """

    title: str
    setting: str
    columns: tuple[Column, ...]
    worst_budgets: tuple[int, ...]
    rows: tuple[TableRow, ...]
    n_images: int
    votes: int
    radii: str
    legend: tuple[str, ...]


def points(fraction: float) -> str:
    """A fraction as percentage points, 3 significant digits: `0.02` → `"2"`."""
    return f"{100 * fraction:.3g}"


def attack_label(name: str, eot_m: int | None = None) -> str:
    """The table name of an attack: `square-linf` → `Square ℓ∞`, `eot-rays` → `EOT-5 RayS`."""
    factory = ATTACKS.get(name)
    return name if factory is None else factory.label(eot_m)


def defense_label(name: str, several_drops: bool) -> str:
    """The paper's name of a defense: `input@0.02` → `Input` (`Input (≈2%)` if several drops)."""
    kind, _, drop = name.partition("@")
    label = _DEFENSE_NAMES.get(kind, kind)
    if drop and several_drops:
        label += f" (≈{points(float(drop))}%)"
    return label


def attack_rows_by_cell(rows: Sequence[Row]) -> dict[tuple[str, str, int], list[AttackRow]]:
    """The attack rows per (defense, attack, budget), in file order."""
    out: dict[tuple[str, str, int], list[AttackRow]] = {}
    for r in rows:
        if isinstance(r, AttackRow):
            out.setdefault((r.defense, r.attack, r.budget), []).append(r)
    return out


def _cell(rows: Sequence[AttackRow]) -> Cell:
    n = len(rows)
    return Cell(
        n=n,
        verified=1.0 - sum(r.success for r in rows) / n,
        fresh=1.0 - sum(r.fresh for r in rows) / n,
        mean_queries=sum(r.queries for r in rows) / n,
        detection=detection_cell(rows),
    )


def _worst(groups: Sequence[Sequence[AttackRow]]) -> Cell | None:
    """The worst case over attacks: images with a row for every attack, fooled by any."""
    by_image = [{r.image: r for r in g} for g in groups]
    images = set.intersection(*(set(b) for b in by_image))
    if not images:
        return None
    n = len(images)
    survived = sum(not any(b[i].success for b in by_image) for i in images)
    fresh = sum(1.0 - max(b[i].fresh for b in by_image) for i in images)
    queries = sum(b[i].queries for b in by_image for i in images)
    detection = None
    if any(r.detection is not None for g in groups for r in g):
        hidden = sum(any(b[i].undetected for b in by_image) for i in images) / n
        detection = Detection(math.nan, None, hidden, math.nan, 0)
    return Cell(n, survived / n, fresh / n, queries / n, detection)


def _check_rows(rows: Sequence[Row]) -> None:
    dupes = duplicate_rows(rows)
    if dupes:
        shown = "; ".join(dupes[:5]) + (f"; and {len(dupes) - 5} more" if len(dupes) > 5 else "")
        raise ReportError(
            f"The result file holds {len(dupes)} repeated row(s): {shown}. Two runs wrote it at "
            "once? Rerun `randfeat eval` with the file's settings on it to repair it (that keeps "
            "the first copy of each unit), then report again."
        )


def summarize(header: Header, rows: Sequence[Row]) -> Table:
    """Aggregate the rows of one result file into a [Table][randfeat.eval.report.summary.Table].

    Rows follow the header's defense order; columns follow the configured attack order, budgets
    ascending; a worst-case column follows for every budget with at least two attacks.

    Raises:
        ReportError: the rows hold a repeated (image, defense, attack, budget); the message names
            them and the repair.
    """
    _check_rows(rows)
    config = header.config
    eot_m = config.get("eot_m")
    eot_m = eot_m if isinstance(eot_m, int) else None
    votes = config.get("votes")
    votes = votes if isinstance(votes, int) else 9
    groups = attack_rows_by_cell(rows)
    clean: dict[str, list[CleanRow]] = {}
    for r in rows:
        if isinstance(r, CleanRow):
            clean.setdefault(r.defense, []).append(r)

    defenses = list(header.defenses)
    defenses += [d for d in dict.fromkeys([*clean, *(k[0] for k in groups)]) if d not in defenses]
    order = [str(a) for a in config.get("attacks", ()) or ()]  # type: ignore[attr-defined]
    order += sorted({k[1] for k in groups} - set(order))
    columns = tuple(
        Column(a, b, f"{attack_label(a, eot_m)} {b}")
        for a in order
        for b in sorted({k[2] for k in groups if k[1] == a})
    )
    budgets = sorted({c.budget for c in columns})
    worst_budgets = tuple(b for b in budgets if sum(c.budget == b for c in columns) >= 2)
    drops = {d.partition("@")[2] for d in defenses if "@" in d}
    calibration = header.calibration
    base_acc = next((c.base_accuracy for c in calibration.values()), None)

    table_rows = []
    for name in defenses:
        cal = calibration.get(name)
        cells = {}
        for col in columns:
            g = groups.get((name, col.attack, col.budget))
            if g:
                cells[(col.attack, col.budget)] = _cell(g)
        worst = {}
        for b in worst_budgets:
            gs = [groups.get((name, c.attack, b), []) for c in columns if c.budget == b]
            w = _worst(gs)
            if w is not None:
                worst[b] = w
        seen = clean.get(name, [])
        table_rows.append(
            TableRow(
                model=header.model.name,
                defense=name,
                label=defense_label(name, len(drops) > 1),
                nu=None if cal is None else cal.nu,
                target_drop=None if cal is None else cal.target_drop,
                accuracy=cal.accuracy if cal else base_acc if name == "base" else None,
                drop=None if cal is None else cal.drop,
                clean=sum(r.correct for r in seen) / len(seen) if seen else None,
                n_clean=len(seen),
                n_attacked=header.n_attacked,
                cells=cells,
                worst=worst,
            )
        )
    return _table(header, columns, worst_budgets, tuple(table_rows), votes)


def _radii(header: Header, columns: Sequence[Column]) -> str:
    """`"ℓ∞ ε = 0.2"` (and `ℓ2` when an ℓ2 attack is in the table), from the header."""
    norms = {a: v.norm for a, v in header.attacks.items()}
    used = {norms.get(c.attack) or ("l2" if c.attack.endswith("-l2") else "linf") for c in columns}
    radius = {"linf": header.eps.linf, "l2": header.eps.l2}
    return ", ".join(f"{_NORM_NAMES[k]} ε = {radius[k]:g}" for k in ("linf", "l2") if k in used)


def _table(
    header: Header,
    columns: tuple[Column, ...],
    worst_budgets: tuple[int, ...],
    rows: tuple[TableRow, ...],
    votes: int,
) -> Table:
    n = header.n_attacked
    radii = _radii(header, columns) or "ε = ?"
    source = f" ({header.eps.source})" if header.eps.source else ""
    targets = sorted({r.target_drop for r in rows if r.target_drop is not None})
    calib = next(iter(header.calibration.values()), None)
    setting = (
        f"{n} attacked images, {radii}{source}, success verified by a majority of {votes} votes"
    )
    if targets:
        setting += (
            "; ν calibrated to a clean-accuracy drop of "
            + " / ".join(f"≈{points(t)}" for t in targets)
            + " points"
            + (f" on {calib.n_images} held-out images" if calib else "")
        )
    setting += f"; device {header.device}."
    legend = [
        f"Cells: robust accuracy (%), verified / fresh. Verified = 1 − success rate as the paper "
        f"counts it (a majority of {votes} votes at the first fooling point); fresh = 1 − mean "
        f"probability that a new majority of {votes} votes is fooled at the returned point.",
        "Acc: clean accuracy (%) on the calibration images (a randomized defense: mean over noise "
        "draws); Drop: achieved drop in points; ν: noise variance (Input: on pixels in [0, 1]; "
        "Feature: on the perturbed features); Clean: accuracy (%) on the attacked images, judged "
        f"by the same rule as the attacks (correct unless a strict majority of {votes} votes "
        "misclassify the clean image).",
    ]
    if worst_budgets:
        legend.append(
            "Worst case: the images that survive every attack of the table at that budget "
            "(verified: fooled by none; fresh: 1 − the highest fresh probability among the "
            "attacks' returned points, averaged over images)."
        )
    incomplete = [
        f"{r.label} / {c.label}: {r.cells[(c.attack, c.budget)].n} of {r.n_attacked}"
        for r in rows
        for c in columns
        if (c.attack, c.budget) in r.cells and r.cells[(c.attack, c.budget)].n != r.n_attacked
    ]
    incomplete += [
        f"{r.label} / Worst case {b}: {w.n} of {r.n_attacked}"
        for r in rows
        for b, w in r.worst.items()
        if w.n != r.n_attacked
    ]
    if incomplete:
        legend.append("* incomplete (images with rows): " + "; ".join(incomplete) + ".")
    if header.detection is not None:
        legend.append(detection_legend(header))
    return Table(
        title=f"{header.model.name} on {header.data.name}: robust accuracy (%) under "
        "query-based attacks",
        setting=setting,
        columns=columns,
        worst_budgets=worst_budgets,
        rows=rows,
        n_images=n,
        votes=votes,
        radii=radii,
        legend=tuple(legend),
    )


def combine(tables: Sequence[Table]) -> Table:
    """One table from several (e.g. one result file per model, as the paper's Tables 1–2).

    Rows are concatenated; columns are the union, in order of first appearance.

    Raises:
        ValueError: `tables` is empty.
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
        worst_budgets=tuple(sorted({b for t in tables for b in t.worst_budgets})),
        rows=tuple(r for t in tables for r in t.rows),
        n_images=max(t.n_images for t in tables),
        votes=tables[0].votes,
        radii=", ".join(dict.fromkeys(t.radii for t in tables)),
        legend=tuple(dict.fromkeys(line for t in tables for line in t.legend)),
    )
