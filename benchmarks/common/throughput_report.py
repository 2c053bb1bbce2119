"""The report half of `throughput.py`: its rows, the Markdown table, the paper-grid projection.

`Row` holds one `--forward-batch` setting over its rounds; `report` writes the table for
docs/benchmarks.md; `projection` turns the best measured rate into the wall time of the paper's
ImageNet grid (Tables 1 and 2 protocol), for two models of what the grid spends, with the
arithmetic printed.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass

import torch

from .memory import Peak

__all__ = [
    "PAPER_RA",
    "TARGET",
    "Round",
    "Row",
    "grid_queries",
    "other_forwards",
    "projection",
    "report",
]

TARGET = 0.85
"""The evaluation should keep at least this fraction of the pure forward throughput."""

# ---------------------------------------------------------------------------- the paper's grid
N_IMAGES, BUDGETS, VOTES, FRESH = 1000, (1000, 10000), 9, 50
ATTACKS = ("square-linf", "nes-linf", "signhunter-linf", "rays", "signflip")
DEFENSES = ("base", "input@0.01", "input@0.02", "feature@0.01", "feature@0.02")
# Robust accuracy (%) at budgets 1,000 / 10,000 (Table 1; RayS and SignFlip: Table 10, one value
# reported, used at both budgets). Input and Feature: one value per model in the tables, used for
# both drops. ResNet-50 has no decision-based row in the paper: those cells are None (counted
# at the full budget, as in the upper bound).
PAPER_RA: dict[str, dict[str, dict[str, tuple[float, float] | None]]] = {
    "vit_base_patch16_224": {
        "base": {
            "square-linf": (5.7, 0.0),
            "nes-linf": (45.7, 7.3),
            "signhunter-linf": (5.1, 0.0),
            "rays": (1.7, 1.7),
            "signflip": (9.7, 9.7),
        },
        "input": {
            "square-linf": (58.8, 58.1),
            "nes-linf": (70.8, 51.4),
            "signhunter-linf": (53.1, 52.2),
            "rays": (41.3, 41.3),
            "signflip": (70.3, 70.3),
        },
        "feature": {
            "square-linf": (60.6, 60.2),
            "nes-linf": (69.1, 47.5),
            "signhunter-linf": (54.0, 52.9),
            "rays": (41.0, 41.0),
            "signflip": (70.1, 70.1),
        },
    },
    "resnet50": {
        "base": {
            "square-linf": (3.5, 0.2),
            "nes-linf": (36.2, 4.3),
            "signhunter-linf": (6.6, 0.4),
            "rays": None,
            "signflip": None,
        },
        "input": {
            "square-linf": (40.3, 39.5),
            "nes-linf": (63.8, 23.9),
            "signhunter-linf": (47.6, 45.4),
            "rays": None,
            "signflip": None,
        },
        "feature": {
            "square-linf": (37.0, 36.0),
            "nes-linf": (56.7, 16.8),
            "signhunter-linf": (46.3, 43.4),
            "rays": None,
            "signflip": None,
        },
    },
}


def grid_queries(model: str | None) -> tuple[int, str]:
    """Image-queries the paper's grid spends: the budget bound, or the paper's robust accuracies.

    Returns the count and the arithmetic as text.
    """
    cells = len(DEFENSES) * len(ATTACKS)
    if model is None:
        q = N_IMAGES * cells * sum(BUDGETS)
        return q, (
            f"{N_IMAGES} images × {len(DEFENSES)} defenses × {len(ATTACKS)} attacks × "
            f"({' + '.join(map(str, BUDGETS))}) queries = {q:,}"
        )
    total = 0.0
    for d in DEFENSES:
        table = PAPER_RA[model][d.partition("@")[0]]
        for a in ATTACKS:
            ra = table[a]
            for i, b in enumerate(BUDGETS):
                total += N_IMAGES * b * (1.0 if ra is None else ra[i] / 100)
    q = round(total)
    return q, (
        f"Σ over defenses, attacks, budgets B of {N_IMAGES} images × RA(B) × B, RA from the "
        f"paper's tables for {model} (a cell without a figure counts the whole budget) = {q:,}"
    )


def other_forwards(verify_per_query: float, queries: int) -> tuple[int, str]:
    """Forwards beyond the queries: verification, fresh judging, clean rows (calibration aside)."""
    randomized = sum(d != "base" for d in DEFENSES)
    fresh = (
        N_IMAGES * len(ATTACKS) * len(BUDGETS) * (FRESH * randomized + (len(DEFENSES) - randomized))
    )
    clean = N_IMAGES * (VOTES * randomized + (len(DEFENSES) - randomized))
    verify = round(verify_per_query * queries)
    text = (
        f"verification {verify_per_query:.3f} per query (measured here) = {verify:,}; fresh "
        f"judging {N_IMAGES} × {len(ATTACKS)} attacks × {len(BUDGETS)} budgets × ({FRESH} × "
        f"{randomized} randomized + 1 × {len(DEFENSES) - randomized} base) = {fresh:,}; clean "
        f"{N_IMAGES} × ({VOTES} × {randomized} + {len(DEFENSES) - randomized}) = {clean:,}"
    )
    return verify + fresh + clean, text


# ---------------------------------------------------------------------------- rows
@dataclass
class Round:
    """One round: the pure forward, the evaluation, the pure forward again."""

    forwards: int  # every image forward of the evaluation (clean, queries, verification, fresh)
    calls: int
    eval_s: float
    in_model_s: float
    pure_before: float  # rows per second
    pure_after: float

    @property
    def rate(self) -> float:
        return self.forwards / self.eval_s

    @property
    def pure(self) -> float:
        return (self.pure_before + self.pure_after) / 2

    @property
    def ratio(self) -> float:
        return self.rate / self.pure


@dataclass
class Row:
    """The evaluation and the pure forward at one `--forward-batch`, over `--rounds` rounds."""

    forward_batch: int
    queries: int
    verify: int
    success: float
    rounds: list[Round]
    eval_peak: Peak
    pure_peak: Peak

    def _median(self, key: str) -> float:
        return statistics.median(getattr(r, key) for r in self.rounds)

    @property
    def rate(self) -> float:
        """Forwards per second of the evaluation (median over rounds)."""
        return self._median("rate")

    @property
    def pure_rows_per_s(self) -> float:
        return self._median("pure")

    @property
    def ratio(self) -> float:
        """The median over rounds of each round's ratio (its own evaluation and pure forwards)."""
        return self._median("ratio")

    @property
    def ratio_range(self) -> tuple[float, float]:
        ratios = [r.ratio for r in self.rounds]
        return min(ratios), max(ratios)

    @property
    def eval_s(self) -> float:
        return self._median("eval_s")

    @property
    def rows_per_call(self) -> float:
        r = self.rounds[0]
        return r.forwards / max(1, r.calls)

    @property
    def in_model(self) -> float:
        return statistics.median(r.in_model_s / r.eval_s for r in self.rounds)


# ---------------------------------------------------------------------------- report
def _mib(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:,.0f}"


def report(args: argparse.Namespace, device: torch.device, rows: list[Row], machine: str) -> str:
    setting = (
        f"`{args.model}`"
        + ("" if args.model == "digits-cnn" else f" at {args.image_size}×{args.image_size}")
        + f", defense `{args.defense}`"
        + ("" if args.defense == "base" else f" (ν = {args.nu:g})")
        + f", attack `{args.attack}` (ε = {args.eps:g}), budget {args.budget}, votes {args.votes}, "
        f"fresh forwards {args.fresh_forwards}, {args.n_images} images in one chunk, dtype "
        f"{args.dtype}, channels-last {args.channels_last}, compile {args.compile}, device "
        f"{device}, {args.malloc_text}"
    )
    lines = [
        f"Machine: {machine}.",
        "",
        f"Setting: {setting}. {args.rounds} rounds per forward batch, each the pure forward for "
        f"{args.pure_seconds:g} s, the evaluation, the pure forward for {args.pure_seconds:g} s "
        "again; a round's ratio is its evaluation's forwards/s over the mean of its two pure "
        "forward rates, and the table gives the median over rounds (range in brackets).",
        "",
        "| forward batch | image-queries/s | forwards/s (evaluation) | rows/s (pure forward) | "
        "ratio [range] | ≥ target | rows per call | in model / wall | success | peak host MiB "
        "(eval / pure) | peak GPU MiB (eval / pure) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r.ratio_range
        lines.append(
            f"| {r.forward_batch} | {r.queries / r.eval_s:,.1f} | {r.rate:,.1f} | "
            f"{r.pure_rows_per_s:,.1f} | **{r.ratio:.2f}** [{lo:.2f}-{hi:.2f}] | "
            f"{'yes' if r.ratio >= TARGET else 'NO'} | {r.rows_per_call:.1f} | {r.in_model:.2f} | "
            f"{r.success:.2f} | {_mib(r.eval_peak.host_mib)} / {_mib(r.pure_peak.host_mib)} | "
            f"{_mib(r.eval_peak.gpu_mib)} / {_mib(r.pure_peak.gpu_mib)} |"
        )
    hows = {r.eval_peak.host_how for r in rows}
    lines += [
        "",
        f"Forwards of the evaluation: clean ({args.votes if args.defense != 'base' else 1} per "
        "image), queries, D.4 verification and fresh judging, all counted at the model. Peak host "
        f"memory: {', '.join(sorted(hows))}.",
    ]
    return "\n".join(lines)


def projection(args: argparse.Namespace, rows: list[Row]) -> str:
    best = max(rows, key=lambda r: r.rate)
    verify = sum(r.verify for r in rows) / max(1, sum(r.queries for r in rows))
    lines = [
        f"Projected wall time of the paper's ImageNet grid for `{args.model}` at the best measured "
        f"rate here ({best.rate:,.1f} forwards/s, `--forward-batch {best.forward_batch}`, "
        f"dtype {args.dtype}), one process, calibration not counted:",
        "",
    ]
    models: list[str | None] = [None]
    if args.model in PAPER_RA:
        models.append(args.model)
    for m in models:
        q, q_text = grid_queries(m)
        other, other_text = other_forwards(verify, q)
        total = q + other
        s = total / best.rate
        kind = "upper bound (every image spends the budget)" if m is None else "paper's RA"
        lines += [
            f"- {kind}: queries {q_text}; {other_text}; total {total:,} forwards / "
            f"{best.rate:,.1f} per s = {s:,.0f} s = **{s / 3600:,.1f} h** ({s / 86400:,.1f} days)",
        ]
    return "\n".join(lines)
