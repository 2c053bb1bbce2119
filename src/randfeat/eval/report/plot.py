"""Robustness curves of a result file: robust accuracy against queries, one panel per attack.

The robust accuracy of the tables of Nguyen et al., "Understanding the Robustness of Randomized
Feature Defense Against Query-Based Adversarial Attacks", ICLR 2024 (§5, Tables 1–2), at every
query count up to the budget: [robust_curve][randfeat.eval.report.plot.robust_curve] computes
$RA(q) = 1 - P[\text{success\\_query} \\le q]$ from the attack rows of a result file (with
`randfeat.eval.outcome.robust_accuracy_curve`, the one implementation), and
[plot_curves][randfeat.eval.report.plot.plot_curves] draws it for every defense with the names and
the table of [randfeat.eval.report.summary][]. matplotlib is the optional `plot` extra, imported
lazily.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from randfeat.eval.errors import ReportError
from randfeat.eval.outcome import robust_accuracy_curve
from randfeat.eval.report.summary import attack_label, attack_rows_by_cell, points, summarize
from randfeat.eval.results.records import AttackRow, Header, Row

__all__ = ["plot_curves", "robust_curve"]

_COLORS = {
    "base": "#4d4d4d",
    "input": "#1f77b4",
    "feature": "#d62728",
    "aaa": "#2ca02c",
    "served": "#9467bd",
}
_STYLES = ("-", "--", ":", "-.")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "randfeat report --plot needs matplotlib, which is not installed. Install the plot "
            'extra: pip install "randfeat[plot]".'
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def robust_curve(rows: Sequence[AttackRow], queries: Sequence[int]) -> list[float]:
    """Robust accuracy at each query count: $RA(q) = 1 - \\#\\{\text{success}, \text{success\\_query} \\le q\\} / N$.

    Args:
        rows: the attack rows of one (defense, attack, budget), one per image.
        queries: query counts `q` at which to evaluate.

    Returns:
        `RA(q)` for every `q` (fractions; `[]` for no rows).
    """
    if not rows:
        return []
    success = torch.tensor([r.success for r in rows])
    first = torch.tensor([r.success_query for r in rows], dtype=torch.long)
    curve = robust_accuracy_curve(success, first, torch.tensor(list(queries), dtype=torch.long))
    return [float(v) for v in curve.tolist()]


def plot_curves(
    header: Header,
    rows: Sequence[Row],
    path: str | os.PathLike[str],
    *,
    dpi: int = 150,
) -> Path:
    """Draw robust accuracy against queries, one subplot per attack, one line per defense.

    Each line is `robust_curve` of the defense's run with the largest budget for that attack;
    a hollow marker at the budget shows the robust accuracy re-judged afresh (`1 − mean(fresh)`).

    Args:
        header: the header record of the result file.
        rows: its rows (clean rows are ignored).
        path: the PNG to write (parent directories are created).
        dpi: resolution of the PNG.

    Returns:
        `path` as a `Path`.

    Raises:
        ImportError: matplotlib is not installed (fix: `pip install "randfeat[plot]"`).
        ReportError: the rows hold no attack results.
    """
    table = summarize(header, rows)
    if not table.columns:
        raise ReportError("Nothing to plot: the result file has no attack rows yet.")
    plt = _pyplot()
    from matplotlib import ticker

    groups = attack_rows_by_cell(rows)
    attacks = list(dict.fromkeys(c.attack for c in table.columns))
    budgets = sorted({c.budget for c in table.columns})
    eot_m = header.config.get("eot_m")
    eot_m = eot_m if isinstance(eot_m, int) else None
    kinds = [trow.defense.partition("@")[0] for trow in table.rows]
    # one colour per kind of defense; several target drops of one kind differ by line style
    styles = [_STYLES[kinds[:i].count(k) % len(_STYLES)] for i, k in enumerate(kinds)]
    ncols = min(3, len(attacks))
    nrows = math.ceil(len(attacks) / ncols)
    spare = nrows * ncols > len(attacks)
    with plt.rc_context({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11}):
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows + 1.1), squeeze=False, sharey=True
        )
        flat = list(axes.flat)
        handles: dict[str, Any] = {}
        for ax, attack in zip(flat, attacks, strict=False):
            top = max(c.budget for c in table.columns if c.attack == attack)
            log = top >= 100
            q = sorted({int(log), top, *(round(top ** (i / 400)) for i in range(401))})
            for i, (trow, kind, style) in enumerate(zip(table.rows, kinds, styles, strict=True)):
                g = groups.get((trow.defense, attack, top), [])
                if not g:
                    continue
                ra = robust_curve(g, q)
                (line,) = ax.step(
                    q,
                    [100 * v for v in ra],
                    where="post",
                    color=_COLORS.get(kind),
                    linestyle=style,
                    lw=max(1.8, 3.4 - 0.4 * i),  # earlier lines wider: overlaps stay visible
                )
                fresh = trow.cells[(attack, top)].fresh
                ax.plot([top], [100 * fresh], "o", mfc="white", mec=line.get_color(), mew=1.8, ms=7)
                nu = "" if trow.nu is None else f", ν = {trow.nu:.3g}"
                handles.setdefault(f"{trow.label}{nu}", line)
            ax.set_title(attack_label(attack, eot_m), fontweight="bold")
            if log:
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_xlim(*((1, top * 1.15) if log else (0, top * 1.04)))
            ax.set_ylim(-2, 102)
            ax.grid(True, which="major", alpha=0.35)
            ax.grid(True, which="minor", alpha=0.12)
            ax.set_xlabel("Queries")
        for ax in flat[: len(attacks) : ncols]:
            ax.set_ylabel("Robust accuracy (%)")
        for ax in flat[len(attacks) :]:
            ax.axis("off")
        marker = plt.Line2D(
            [], [], linestyle="none", marker="o", mfc="white", mec="#333333", mew=1.8, ms=7
        )
        labels = [*handles, "re-judged afresh\nat the budget"]
        items = [*handles.values(), marker]
        targets = sorted({r.target_drop for r in table.rows if r.target_drop is not None})
        title = "Defense"
        if len(targets) == 1:
            title += f" (ν for a ≈{points(targets[0])}-point drop)"
        bottom = 0.0
        if spare:
            flat[-1].legend(
                items,
                labels,
                loc="center",
                frameon=False,
                fontsize=12,
                title=title.replace(" (", "\n("),
            )
        else:
            ncol = min(len(items), 2 * ncols)
            fig.legend(items, labels, loc="lower center", ncol=ncol, frameon=False)
            height = fig.get_figheight()
            bottom = (0.3 + 0.32 * math.ceil(len(items) / ncol)) / height
        data = header.data.name
        model = table.rows[0].model if table.rows else "?"
        fig.suptitle(
            f"{model} on {data}: robust accuracy vs. queries\n"
            f"{table.n_images} images, {table.radii}, "
            f"budget {', '.join(map(str, budgets))}, "
            f"success verified by a majority of {table.votes} votes",
            fontsize=13,
        )
        fig.tight_layout(rect=(0, bottom, 1, 1))
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi, facecolor="white")
        plt.close(fig)
    return out
