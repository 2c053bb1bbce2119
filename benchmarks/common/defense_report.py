"""The report half of `defense_in_depth.py`: tables, paired differences, plots, the verdict.

Reads the result files of the script's grids in `out` and writes the generated part of
`docs/results/defense-in-depth.md` (between `<!-- generated:start -->` and
`<!-- generated:end -->`) and `docs/results/defense-in-depth-*.png` next to it.

What an image "kept" means depends on what a flag does: with `reject` (and without detection)
an image is kept when the attack did not fool it (verified robust accuracy); with `log` the
attacker's queries are all answered, so an image is kept when it was not fooled *before the
first flag* (the owner saw the attack before it won). The standard errors and the
"holds" / "tie" / "reversed" rule (two standard errors) are `fashion_report`'s.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from randfeat.eval.report.summary import attack_label, attack_rows_by_cell
from randfeat.eval.results.file import read_results
from randfeat.eval.results.records import AttackRow, Header

from .fashion_report import Estimate, fresh, verdict, verified
from .machine import describe_machine

__all__ = ["DETECTORS", "MARKS", "ON_DETECT", "Data", "Plan", "Plotter", "Setting", "by_label", "report", "settings"]  # fmt: skip

START, END = "<!-- generated:start -->", "<!-- generated:end -->"
DETECTORS = ("pooled-linf", "blacklight")
ON_DETECT = ("reject", "log")
DATA_LABELS = {"digits": "digits (digits-cnn)", "fashion-mnist": "Fashion-MNIST (fashion-cnn)"}
MARKS = {
    "n/s": "not run at this scale",
    "n/r": "attack not registered in `randfeat.eval.ATTACKS` when the script ran",
    "n/f": "no result file (the run has not finished)",
    "n/c": "no rows for this cell in the result file",
}
"""The markers of a missing cell, and what each means (the legend under every table)."""
Cells = Mapping[tuple[str, str, int], list[AttackRow]]


@dataclass(frozen=True)
class Setting:
    """One row of the tables: a defense of one grid run, behind a detector or not."""

    label: str
    run: str  # the experiment's name without the data set: "none", "pooled-linf-reject"
    defense: str  # the defense name in the result file: "base", "feature@0.02", "keyed@0.02"
    on_detect: str | None = None


def settings(drop: str = "0.02") -> list[Setting]:
    """Every setting of the page, run at this scale or not (the rows are the same at every scale)."""
    out = [
        Setting("none", "none", "base"),
        Setting("noise", "none", f"feature@{drop}"),
        Setting("keyed", "none", f"keyed@{drop}"),
    ]
    for det in DETECTORS:
        for act in ON_DETECT:
            run, tag = f"{det}-{act}", f" ({det}, {act})"
            out += [
                Setting("detection alone" + tag, run, "base", act),
                Setting("noise + detection" + tag, run, f"feature@{drop}", act),
                Setting("keyed + detection" + tag, run, f"keyed@{drop}", act),
            ]
    return out


@dataclass(frozen=True)
class Plan:
    """What this run of the script asked for: the report marks everything else missing."""

    scale: str
    data: tuple[str, ...]
    budgets: tuple[int, ...]
    attackers: tuple[str, ...]  # of this scale
    all_attackers: tuple[str, ...]  # the page's columns, every scale
    registered: frozenset[str]
    runs: frozenset[str]  # experiment names of this run: "digits-none", ...
    fpr: Mapping[str, float]  # detect_fpr per data set


# ----------------------------------------------------------------------------- statistics


def kept(r: AttackRow, on_detect: str | None) -> float:
    """1 when the image was kept: not fooled (none, reject), not fooled unseen (`log`)."""
    return float(not (r.undetected if on_detect == "log" else r.success))


def per_image(rows: Sequence[AttackRow], on_detect: str | None) -> dict[int, float]:
    return {r.image: kept(r, on_detect) for r in rows}


def mean_se(values: Sequence[float]) -> Estimate:
    """A fraction's mean with the binomial SE $\\sqrt{p(1-p)/n}$ (values in {0, 1})."""
    n = len(values)
    p = statistics.fmean(values) if n else math.nan
    return Estimate(p, math.sqrt(p * (1 - p) / n) if n else math.nan, n)


def paired_diff(a: Mapping[int, float], b: Mapping[int, float]) -> Estimate:
    """Mean of the per-image differences `a - b` on the images of both, ± SD / √n."""
    d = [a[i] - b[i] for i in a if i in b]
    if not d:
        return Estimate(math.nan, math.nan, 0)
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    return Estimate(statistics.fmean(d), sd / math.sqrt(len(d)), len(d))


# ----------------------------------------------------------------------------- cells


@dataclass
class Data:
    """The loaded result files of one data set, and the plan they belong to."""

    name: str
    plan: Plan
    files: Mapping[str, tuple[Header, Cells]]

    def rows(self, s: Setting, attack: str, budget: int) -> list[AttackRow] | str:
        """The rows of one cell, or the marker of why it is missing (`MARKS`)."""
        run = f"{self.name}-{s.run}"
        if attack not in self.plan.registered:
            return "n/r"
        if run not in self.plan.runs or attack not in self.plan.attackers:
            return "n/s"
        if budget not in self.plan.budgets:
            return "n/s"
        if run not in self.files:
            return "n/f"
        return self.files[run][1].get((s.defense, attack, budget)) or "n/c"

    def strongest(self, s: Setting, budget: int) -> tuple[str, dict[int, float]] | None:
        """The attacker that keeps the fewest images of `s` (its own strongest), its per-image kept."""
        best: tuple[float, str, dict[int, float]] | None = None
        for a in self.plan.all_attackers:
            rows = self.rows(s, a, budget)
            if isinstance(rows, str):
                continue
            k = per_image(rows, s.on_detect)
            m = statistics.fmean(k.values())
            if best is None or m < best[0]:
                best = (m, a, k)
        return None if best is None else (best[1], best[2])

    def every(self, s: Setting, budget: int) -> dict[int, float] | None:
        """Per image: kept against every attacker that ran (the per-image worst case)."""
        ks = []
        for a in self.plan.all_attackers:
            rows = self.rows(s, a, budget)
            if not isinstance(rows, str):
                ks.append(per_image(rows, s.on_detect))
        if not ks:
            return None
        common = set.intersection(*(set(k) for k in ks))
        return {i: min(k[i] for k in ks) for i in sorted(common)}

    def header(self) -> Header | None:
        return next((h for h, _ in self.files.values()), None)


Plotter = Callable[[Data, int, Path], list[str]]
"""Draws one data set's figures at a budget into a folder; returns their Markdown lines."""


def pct(e: Estimate) -> str:
    return f"{100 * e.value:.1f} ± {100 * e.se:.1f}"


def diff_text(d: Estimate) -> tuple[str, str]:
    if d.n == 0:
        return "n/c", "–"
    return f"{100 * d.value:+.1f} ± {100 * d.se:.1f}", verdict(d)


def legend() -> str:
    return "Missing cells: " + "; ".join(f"`{k}` {v}" for k, v in MARKS.items()) + "."


def table(head: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(r) + " |" for r in body]


# ----------------------------------------------------------------------------- tables


def accuracy_table(d: Data, budget: int) -> list[str]:
    body = []
    for s in settings():
        row = [s.label]
        for a in d.plan.all_attackers:
            rows = d.rows(s, a, budget)
            row.append(rows if isinstance(rows, str) else f"{pct(verified(rows))} / {100 * fresh(rows).value:.1f}")  # fmt: skip
        best, every = d.strongest(s, budget), d.every(s, budget)
        row.append("n/s" if best is None else f"{pct(mean_se(list(best[1].values())))} ({attack_label(best[0])})")  # fmt: skip
        row.append("n/s" if every is None else pct(mean_se(list(every.values()))))
        body.append(row)
    head = ["setting", *(attack_label(a) for a in d.plan.all_attackers), "strongest attacker", "every attacker"]  # fmt: skip
    return [
        f"**Robust accuracy (%), {budget} queries**: verified ± SE / fresh per attacker; "
        "*strongest attacker*: the images kept against the setting's own strongest attacker "
        "(with `log`: not fooled before the first flag); *every attacker*: kept against all of them.",
        "",
        *table(head, body),
    ]


def detection_table(d: Data, budget: int) -> list[str]:
    body = []
    for s in settings():
        if s.on_detect is None:
            continue
        row = [s.label]
        for a in d.plan.all_attackers:
            rows = d.rows(s, a, budget)
            if isinstance(rows, str):
                row.append(rows)
                continue
            first = [
                r.detection.first_flag for r in rows if r.detection and r.detection.first_flag > 0
            ]
            med = f"{statistics.median(first):g}" if first else "–"
            und = sum(r.undetected for r in rows) / len(rows)
            row.append(f"{100 * len(first) / len(rows):.0f} · {med} · {100 * und:.0f}")
        body.append(row)
    return [
        f"**Detection, {budget} queries**: images with a flagged query (%) · median queries to the "
        "first flag · fooled before the first flag (%).",
        "",
        *table(["setting", *(attack_label(a) for a in d.plan.all_attackers)], body),
    ]


COMPARE = (("noise + detection", "detection alone"), ("noise + detection", "noise"),
           ("keyed + detection", "detection alone"), ("keyed + detection", "keyed"))  # fmt: skip


def by_label(label: str) -> Setting:
    return next(s for s in settings() if s.label == label)


def comparisons(d: Data, budget: int) -> list[tuple[str, str, str, Estimate, Estimate, str]]:
    """(detector, on_detect, comparison, Δ at the strongest attackers, Δ at every attacker, attackers)."""
    out = []
    for det in DETECTORS:
        for act in ON_DETECT:
            for a, b in COMPARE:
                sa = by_label(f"{a} ({det}, {act})")
                sb = by_label(b if b in ("noise", "keyed") else f"{b} ({det}, {act})")
                ba, bb = d.strongest(sa, budget), d.strongest(sb, budget)
                ea, eb = d.every(sa, budget), d.every(sb, budget)
                none = Estimate(math.nan, math.nan, 0)
                strong = paired_diff(ba[1], bb[1]) if ba and bb else none
                every = paired_diff(ea, eb) if ea is not None and eb is not None else none
                who = f"{attack_label(ba[0])} vs {attack_label(bb[0])}" if ba and bb else "n/s"
                out.append((det, act, f"{a} − {b}", strong, every, who))
    return out


def paired_table(d: Data, budget: int) -> list[str]:
    body = []
    for det, act, what, strong, every, who in comparisons(d, budget):
        s1, v1 = ("n/s", "n/s") if who == "n/s" else diff_text(strong)
        s2, v2 = ("n/s", "n/s") if who == "n/s" else diff_text(every)
        body.append([det, act, what, who, s1, v1, s2, v2])
    head = ["detector", "on_detect", "Δ kept (points)", "strongest attackers", "Δ at the strongest", "verdict", "Δ at every attacker", "verdict"]  # fmt: skip
    return [
        f"**Paired differences, {budget} queries**: per image, kept in the first setting minus kept "
        "in the second (each against its own strongest attacker, or against every attacker), on the "
        "same images; mean ± SD/√n. *holds*: more than 2 SE above 0; *tie*: within 2 SE; "
        "*reversed*: more than 2 SE below. `noise` and `keyed` have no detector, so their kept is "
        "their robust accuracy in both the `reject` and the `log` rows.",
        "",
        *table(head, body),
    ]


def fpr_tables(d: Data) -> list[str]:
    """The benign false positives per workload and detector, and whose queries caused flags."""
    body, flags = [], []
    for det in DETECTORS:
        runs = [f"{d.name}-{det}-{a}" for a in ON_DETECT]
        h = next((d.files[r][0] for r in runs if r in d.files), None)
        if h is None or h.detection is None:
            mark = "n/s" if all(r not in d.plan.runs for r in runs) else "n/f"
            body.append([det, mark, mark, mark])
            continue
        info = h.detection
        rates = ", ".join(f"{w} {100 * r.rate:.2f}% ({r.flagged}/{r.queries})" for w, r in info.workloads.items())  # fmt: skip
        body.append([det, f"{100 * info.target_fpr:g}% on {len(info.history_indices)} images", f"{info.threshold:.4g}", rates])  # fmt: skip
    for s in settings():
        if s.on_detect is None:
            continue
        cells = [d.rows(s, a, d.plan.budgets[-1]) for a in d.plan.all_attackers]
        rows = [r for c in cells if not isinstance(c, str) for r in c]
        if not rows:
            continue
        own = sum(r.detection.flagged - r.detection.benign_flags for r in rows if r.detection)
        ben = sum(r.detection.benign_flags for r in rows if r.detection)
        imgs = sum(1 for r in rows if r.detection and r.detection.benign_flags > 0)
        flags.append([s.label, str(own), str(ben), f"{imgs}/{len(rows)}"])
    return [
        "**Benign false positives** (the run's header: each workload streamed through the "
        "calibrated detector after the benign history):",
        "",
        *table(["detector", "calibrated to", "threshold", "false positives per workload"], body),
        "",
        f"**Whose queries caused the flags** ({d.plan.budgets[-1]} queries, summed over attackers): a "
        "flag is *benign* when the closest earlier query was a stored benign image.",
        "",
        *table(["setting", "own flags", "benign-history flags", "attacked (image, attacker) with a benign flag"], flags or [["n/s", "n/s", "n/s", "n/s"]]),
    ]  # fmt: skip


def sybil_table(d: Data, budget: int) -> list[str]:
    runs = [f"{d.name}-sybil-{k}" for k in (1, 10)]
    if not any(r in d.plan.runs for r in runs):
        return ["**Sybil** (`on_detect = ban` after 10 flags, 1 vs 10 API keys): n/s (not run at this scale)."]  # fmt: skip
    attacks = ("square-linf", "adaptive-square-linf")
    body = []
    for k, run in zip((1, 10), runs, strict=True):
        for defense in ("base", "feature@0.02"):
            row = [f"{defense} ({k} key{'s' if k > 1 else ''})"]
            for a in attacks:
                cells = d.files.get(run)
                rows = "n/f" if cells is None else cells[1].get((defense, a, budget)) or "n/c"
                if isinstance(rows, str):
                    row.append(rows)
                    continue
                det = sum(1 for r in rows if r.detection and r.detection.first_flag > 0) / len(rows)
                row.append(f"{pct(verified(rows))} · {100 * det:.0f}")
            body.append(row)
    return [
        f"**Sybil, {budget} queries** (`pooled-linf`, `on_detect = ban` after 10 flags): robust "
        "accuracy (%) ± SE · images detected (%), the attacker on 1 key vs spread over 10.",
        "",
        *table(["defense (keys)", *(attack_label(a) for a in attacks)], body),
    ]


# ----------------------------------------------------------------------------- verdict


def verdict_lines(d: Data, budget: int) -> list[str]:
    """The verdict per (detector, on_detect), computed from the paired differences."""
    lines = []
    for det in DETECTORS:
        for act in ON_DETECT:
            mine = [(w, s, who) for dd, aa, w, s, _, who in comparisons(d, budget) if (dd, aa) == (det, act) and w.startswith("noise") and s.n]  # fmt: skip
            if len(mine) < 2:
                continue
            found = {verdict(s) for _, s, _ in mine}
            word = "holds" if found == {"holds"} else "reversed" if "reversed" in found else "tie"
            parts = "; ".join(f"{w}: {100 * s.value:+.1f} ± {100 * s.se:.1f} points ({verdict(s)}; {who})" for w, s, who in mine)  # fmt: skip
            h = d.files.get(f"{d.name}-{det}-{act}")
            cost = ""
            if h and h[0].detection:
                rates = {w: r.rate for w, r in h[0].detection.workloads.items()}
                worst = max(rates, key=lambda w: rates[w])
                cost = (f" Benign cost: {100 * rates.get('in-order', math.nan):.2f}% of in-order queries flagged "
                        f"(calibrated to {100 * h[0].detection.target_fpr:g}%), up to {100 * rates[worst]:.1f}% on the `{worst}` workload.")  # fmt: skip
            kept_is = "not fooled before the first flag" if act == "log" else "not fooled"
            lines.append(
                f"- **{d.name}, `{det}`, {act}, {budget} queries: defense in depth: {word}.** Images kept "
                f"({kept_is}) by noise + detection against its own strongest attacker, paired on the same images: {parts}."
                + (" It keeps more images than either layer alone beyond 2 SE." if word == "holds" else
                   " At least one layer alone keeps more images beyond 2 SE." if word == "reversed" else
                   " Within 2 SE of zero or mixed: no gain over both layers alone shown at this sample size.")
                + cost
            )  # fmt: skip
    return lines


# ----------------------------------------------------------------------------- page


def load(out: Path, plan: Plan, name: str) -> Data:
    files = {}
    for run in sorted(plan.runs):
        path = out / f"{run}.jsonl"
        if run.startswith(f"{name}-") and path.exists():
            res = read_results(path)
            files[run] = (res.header, attack_rows_by_cell(res.rows))
    return Data(name, plan, files)


def section(out: Path, plan: Plan, name: str, dest: Path, plot: Plotter) -> tuple[list[str], list[str]]:  # fmt: skip
    """The lines of one data set's section and its verdict lines."""
    title = f"## {DATA_LABELS[name]}"
    if name not in plan.data:
        return [title, "", f"n/s: not run by this command (`--data`, scale `{plan.scale}`).", ""], []  # fmt: skip
    d = load(out, plan, name)
    h = d.header()
    if h is None:
        return [title, "", "n/f: no result file yet.", ""], []
    nu = ", ".join(f"{k} ν = {c.nu:.3g}" for k, c in h.calibration.items())
    lines = [title, "", f"{h.model.name}, {h.n_attacked} class-balanced test images, ℓ∞ ε = {h.eps.linf:g}, "
             f"{h.setting('votes')} votes; ν calibrated to a 2-point clean-accuracy drop ({nu}); detector "
             f"threshold calibrated to {100 * plan.fpr[name]:g}% benign false positives.", ""]  # fmt: skip
    if name == "digits":
        lines += ["The digits test set has 540 images: after the attacked and the workload images about "
                  "420 remain to calibrate the detector on, too few for a 0.1% target (1/0.001 = 1,000 "
                  "needed), so digits uses 0.5%.", ""]  # fmt: skip
    verdicts = []
    for budget in plan.budgets:
        for part in (accuracy_table, detection_table, paired_table):
            lines += [*part(d, budget), ""]
        verdicts += verdict_lines(d, budget)
    last = plan.budgets[-1]
    lines += [*sybil_table(d, last), "", legend(), "", *fpr_tables(d), "", *plot(d, last, dest), ""]
    return lines, verdicts


def write_page(body: str, page: Path) -> None:
    text = page.read_text() if page.exists() else f"# Defense in depth\n\n{START}\n{END}\n"
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    page.write_text(pattern.sub(lambda m: f"{START}\n{body.strip()}\n{END}", text))


def report(out: Path, plan: Plan, page: Path, write: bool, cmd: str, seconds: Mapping[str, float], plot: Plotter) -> str:  # fmt: skip
    """The generated page body; written into `page` (and the plots, by `plot`, beside it) when
    `write`, else the plots go to `out`."""
    dest = page.parent if write else out
    dest.mkdir(parents=True, exist_ok=True)
    parts, verdicts = [], []
    for name in DATA_LABELS:
        lines, v = section(out, plan, name, dest, plot)
        parts += lines
        verdicts += v
    total = sum(seconds.get(r, 0.0) for r in plan.runs)
    head = [f"Generated by `{cmd}` (scale `{plan.scale}`) on {describe_machine()}; the grids took {total / 60:.1f} min of worker time.", "",
            "**Verdict** (computed from the paired differences below; *holds* needs both differences more than 2 SE above zero):", "",
            *(verdicts or ["- n/f: no finished detection run to judge."]), ""]  # fmt: skip
    body = "\n".join(head + parts)
    if write:
        write_page(body, page)
    return body
