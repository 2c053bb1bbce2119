"""The report half of `fashion_claims.py`: statistics, tables, plots and the generated page.

Reads the result files of the script's experiments in `out` and writes the tables and plots
into `docs/results/fashion-mnist.md` (between the markers `<!-- generated:start -->` and
`<!-- generated:end -->`) and `docs/results/fashion-*.png`.

The standard errors and the rule for "holds" / "tie" / "reversed" (two standard errors) are
stated in the docstring of `fashion_claims.py`, which the page points to; `verified`, `fresh`,
`paired` and `verdict` compute them.
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from randfeat.eval.grid.config import EvalConfig
from randfeat.eval.grid.plan import load_model, load_pool
from randfeat.eval.report.plot import plot_curves
from randfeat.eval.report.summary import attack_label, attack_rows_by_cell
from randfeat.eval.results.file import read_results
from randfeat.eval.results.records import AttackRow, Header
from randfeat.theory import layer_report

from .machine import ROOT, describe_machine

__all__ = ["CNN_DEPTH", "PAGE", "RESNET_DEPTH", "report"]

PAGE = ROOT / "docs" / "results" / "fashion-mnist.md"
START, END = "<!-- generated:start -->", "<!-- generated:end -->"
CNN_DEPTH = ("conv1", "pool1", "pool2", "head.pre")
"""The CNN's layers for claim 2, shallow to deep (after conv1; after blocks 1 and 2; penultimate)."""
RESNET_DEPTH = ("model.layer1", "model.layer2", "model.layer3", "model.fc.pre")
"""resnet18's layers for claim 2: after stages 1-3, and the pooled penultimate features."""


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Estimate:
    """A robust accuracy (a fraction) with its standard error, over `n` images."""

    value: float
    se: float
    n: int

    def text(self) -> str:
        return f"{100 * self.value:.1f} ± {100 * self.se:.1f}"


def verified(rows: Sequence[AttackRow]) -> Estimate:
    """Robust accuracy as the paper counts it, with the binomial standard error."""
    n = len(rows)
    p = 1 - sum(r.success for r in rows) / n
    return Estimate(p, math.sqrt(p * (1 - p) / n), n)


def fresh(rows: Sequence[AttackRow]) -> Estimate:
    """Robust accuracy re-judged afresh: mean of `1 - fresh`, with its standard error."""
    values = [1 - r.fresh for r in rows]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return Estimate(statistics.fmean(values), sd / math.sqrt(len(values)), len(values))


def paired(a: Sequence[AttackRow], b: Sequence[AttackRow], kind: str = "verified") -> Estimate:
    """Robust accuracy of `a` minus that of `b` on the images both attacked (paired SE)."""
    by_image = {r.image: r for r in b}
    pairs = [(r, by_image[r.image]) for r in a if r.image in by_image]

    def ra(r: AttackRow) -> float:
        return float(not r.success) if kind == "verified" else 1 - r.fresh

    d = [ra(x) - ra(y) for x, y in pairs]
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    return Estimate(statistics.fmean(d), sd / math.sqrt(len(d)), len(d))


def verdict(diff: Estimate, claimed_sign: int = 1) -> str:
    """`holds` / `tie` / `reversed` for a claimed sign of a difference, at two standard errors."""
    z = claimed_sign * diff.value
    if z > 2 * diff.se:
        return "holds"
    if z < -2 * diff.se:
        return "reversed"
    return "tie"


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman's ρ of `x` and `y` (no ties expected) and its exact one-sided permutation p-value."""

    def ranks(v: Sequence[float]) -> list[int]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0] * len(v)
        for rank, i in enumerate(order):
            r[i] = rank
        return r

    def rho(rx: Sequence[int], ry: Sequence[int]) -> float:
        n = len(rx)
        return 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, ry, strict=True)) / (n * (n * n - 1))

    rx, ry = ranks(x), ranks(y)
    observed = rho(rx, ry)
    perms = list(itertools.permutations(ry))
    p = sum(rho(rx, q) >= observed - 1e-12 for q in perms) / len(perms)
    return observed, p


# ----------------------------------------------------------------------------- tables


def _load(
    out: Path, name: str
) -> tuple[Header, dict[tuple[str, str, int], list[AttackRow]]] | None:
    path = out / f"{name}.jsonl"
    if not path.exists():
        return None
    res = read_results(path)
    return res.header, attack_rows_by_cell(res.rows)


def _listed(header: Header, key: str) -> list[object]:
    value = header.config[key]
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(
            f"Expected the result file's setting `{key}` to be a non-empty list, but got "
            f"{value!r}; fix: rerun the experiment with this version of randfeat"
        )
    return list(value)


def _attacks_budget(header: Header) -> tuple[list[str], int]:
    """The attacks of an experiment and its budget (every experiment here runs one budget)."""
    budget = _listed(header, "budgets")[0]
    if not isinstance(budget, int):
        raise ValueError(f"Expected the result file's budget to be an integer, but got {budget!r}")
    return [str(a) for a in _listed(header, "attacks")], budget


def _drops(header: Header) -> list[float]:
    """The target drops in clean accuracy of an experiment's randomized defenses."""
    drops = [t for t in _listed(header, "target_drop") if isinstance(t, int | float)]
    if len(drops) != len(_listed(header, "target_drop")):
        raise ValueError(
            f"Expected the result file's target drops to be numbers, but got "
            f"{header.config['target_drop']!r}"
        )
    return [float(t) for t in drops]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _both(rows: Sequence[AttackRow]) -> str:
    """A table cell: the verified / the fresh robust accuracy, each ± its standard error."""
    return f"{verified(rows).text()} / {fresh(rows).text()}"


def _diff(d: Estimate) -> str:
    """A table cell: a paired difference ± its standard error, and its verdict."""
    return f"**{100 * d.value:+.1f} ± {100 * d.se:.1f}** ({verdict(d)})"


def _feature_minus_input(
    cells: Mapping[tuple[str, str, int], list[AttackRow]],
    attacks: Sequence[str],
    budget: int,
    drop: str = "0.02",
) -> list[Estimate]:
    """Feature minus Input at the target drop `drop`, per attack, on the same images (paired)."""
    return [
        paired(cells[(f"feature@{drop}", a, budget)], cells[(f"input@{drop}", a, budget)])
        for a in attacks
    ]


def claim1(out: Path) -> tuple[list[str], list[str]]:
    """Feature vs input at 1, 2, 4-point drops under every attack."""
    loaded = _load(out, "cnn-main")
    if loaded is None:
        return ["(cnn-main not run)"], []
    header, cells = loaded
    drops = _drops(header)
    attacks, budget = _attacks_budget(header)
    lines = [
        f"fashion-cnn, {header.n_attacked} class-balanced test images, {budget} queries, ℓ∞ ε = "
        f"{header.eps.linf:g}. Robust accuracy in % (± one standard error), verified / fresh; "
        "Δ = Feature − Input on the same images (paired), verified.",
        "",
        "| drop | defense | ν | " + " | ".join(attack_label(a) for a in attacks) + " |",
        "|---|---|---|" + "---|" * len(attacks),
    ]
    verdicts: list[str] = []
    base = [cells.get(("base", a, budget), []) for a in attacks]
    lines.append(
        "| – | Base | – | "
        + " | ".join(f"{verified(r).text()} / {_pct(fresh(r).value)}" for r in base)
        + " |"
    )
    for t in drops:
        for kind in ("input", "feature"):
            name = f"{kind}@{t:g}"
            nu = header.calibration[name].nu
            row = [cells.get((name, a, budget), []) for a in attacks]
            lines.append(
                f"| {100 * t:g} | {kind.capitalize()} | {nu:.3g} | "
                + " | ".join(_both(r) for r in row)
                + " |"
            )
        diffs = _feature_minus_input(cells, attacks, budget, f"{t:g}")
        lines.append(f"| {100 * t:g} | **Δ** | | " + " | ".join(map(_diff, diffs)) + " |")
        verdicts += [verdict(d) for d in diffs]
    counts = {v: verdicts.count(v) for v in ("holds", "tie", "reversed")}
    summary = f"Claim 1 (feature ≥ input): of {len(verdicts)} (drop, attack) pairs, feature is higher beyond 2 SE in {counts['holds']}, within 2 SE in {counts['tie']}, lower beyond 2 SE in {counts['reversed']}."
    return lines, [summary]


def claim1_long(out: Path) -> list[str]:
    loaded = _load(out, "cnn-long")
    if loaded is None:
        return []
    header, cells = loaded
    attacks, budget = _attacks_budget(header)
    lines = [
        f"The same at {budget} queries (Square and SignHunter, 2-point drop, {header.n_attacked} images):",
        "",
        "| defense | " + " | ".join(attack_label(a) for a in attacks) + " |",
        "|---|" + "---|" * len(attacks),
    ]
    for d in header.defenses:
        lines.append(f"| {d} | " + " | ".join(_both(cells[(d, a, budget)]) for a in attacks) + " |")
    diffs = _feature_minus_input(cells, attacks, budget)
    lines.append("| **Δ Feature − Input** | " + " | ".join(map(_diff, diffs)) + " |")
    return lines


def claim2(
    out: Path, model_name: str, layers: Sequence[str], prefix: str, fashion_root: str | None
) -> tuple[list[str], list[str]]:
    """Robustness against the depth of the perturbed layer, and the predicted ranking."""
    measured: dict[str, Estimate] = {}
    calibrated: dict[str, Any] = {}
    header0 = None
    for layer in layers:
        loaded = _load(out, f"{prefix}-depth-{layer}")
        if loaded is None:
            continue
        header, cells = loaded
        header0 = header0 or header
        _, budget = _attacks_budget(header)
        measured[layer] = verified(cells[("feature@0.02", "square-linf", budget)])
        calibrated[layer] = header.calibration["feature@0.02"]
    if header0 is None or len(measured) < 2:
        return [f"({prefix} depth runs missing)"], []
    cfg = EvalConfig.from_mapping(
        {k: v for k, v in header0.config.items() if k in set(EvalConfig.keys())}
    )
    model = load_model(cfg)
    if not isinstance(model, nn.Module):
        raise ValueError(f"Expected {model_name} to be a local model, but got {model!r}")
    pool = load_pool(cfg, None)
    idx = torch.tensor(header0.calibration_indices[:500], dtype=torch.long)
    x, y = pool.images(idx)
    report = layer_report(model, (x, y), list(measured), target_drop=0.02)
    magnitude = {r.layer: r.magnitude for r in report.rows}
    # layer_report keys layers canonically ("head.pre" may read "head.pre"); match by order given
    keys = list(measured)
    mags = [magnitude.get(k, magnitude.get(_canonical(k, magnitude), math.nan)) for k in keys]
    rho, p = spearman(mags, [measured[k].value for k in keys])
    lines = [
        f"{model_name}, the feature defense on one layer at a time, ν calibrated to a 2-point drop; Square ℓ∞, "
        f"{_attacks_budget(header0)[1]} queries, {header0.n_attacked} images. Predicted: "
        "`layer_report`'s robustness magnitude ν‖∇ₕL‖² on 500 calibration images (larger = more robust).",
        "",
        "| layer | ν | calibrated accuracy | robust accuracy (verified) | predicted magnitude | measured rank | predicted rank |",
        "|---|---|---|---|---|---|---|",
    ]
    m_rank = {k: i + 1 for i, k in enumerate(sorted(keys, key=lambda k: -measured[k].value))}
    p_rank = {k: i + 1 for i, k in enumerate(sorted(keys, key=lambda k: -mags[keys.index(k)]))}
    for k, mag in zip(keys, mags, strict=True):
        c = calibrated[k]
        lines.append(
            f"| `{k}` | {c.nu:.3g} | {_pct(c.accuracy)} | {measured[k].text()} | {mag:.3g} | {m_rank[k]} | {p_rank[k]} |"
        )
    summary = f"Claim 2 ({model_name}): Spearman ρ between predicted and measured robustness over {len(keys)} layers = {rho:+.2f} (exact one-sided permutation p = {p:.2f})."
    lines += ["", summary]
    return lines, [summary]


def _canonical(layer: str, keys: Mapping[str, float]) -> str:
    for k in keys:
        if k.endswith(layer) or layer.endswith(k):
            return k
    return layer


def claim3(out: Path) -> tuple[list[str], list[str]]:
    five, ten = _load(out, "cnn-eot5"), _load(out, "cnn-eot10")
    if five is None or ten is None:
        return ["(EOT runs missing)"], []
    (h5, c5), (_, c10) = five, ten
    _, budget = _attacks_budget(h5)
    lines = [
        f"fashion-cnn, 2-point drop, {h5.n_attacked} images, {budget} queries for every attack: EOT "
        f"averages m forwards per query and is charged for each, so EOT-{5} takes {budget // 5} steps and "
        f"EOT-10 {budget // 10}.",
        "",
        "| defense | Square | EOT-Square m=5 | EOT-Square m=10 | Δ (m=5 − plain) | Δ (m=10 − plain) |",
        "|---|---|---|---|---|---|",
    ]
    summaries = []
    for d in h5.defenses:
        plain, e5, e10 = (
            c5[(d, "square-linf", budget)],
            c5[(d, "eot-square-linf", budget)],
            c10[(d, "eot-square-linf", budget)],
        )
        d5, d10 = paired(e5, plain), paired(e10, plain)
        lines.append(
            f"| {d} | {_both(plain)} | {_both(e5)} | {_both(e10)} | {100 * d5.value:+.1f} ± {100 * d5.se:.1f} | {100 * d10.value:+.1f} ± {100 * d10.se:.1f} |"
        )
        # the claim: EOT does not lower robust accuracy (a positive or zero Δ)
        summaries.append(
            f"{d}: EOT m=5 {verdict(d5)}/{'not worse' if d5.value > -2 * d5.se else 'worse'}, m=10 {'not worse' if d10.value > -2 * d10.se else 'worse'}"
        )
    summary = (
        "Claim 3 (EOT does not help at equal total queries; 'worse' = EOT lowered robust accuracy beyond 2 SE): "
        + "; ".join(summaries)
        + "."
    )
    return [*lines, "", summary], [summary]


def claim4(out: Path) -> tuple[list[str], list[str]]:
    loaded = _load(out, "cnn-main")
    if loaded is None:
        return [], []
    header, cells = loaded
    attacks, budget = _attacks_budget(header)
    lines = [
        f"fashion-cnn, {header.n_attacked} images, {budget} queries (from the claim-1 run): AAA with its published defaults beside Base and Feature at a 2-point drop.",
        "",
        "| defense | " + " | ".join(attack_label(a) for a in attacks) + " |",
        "|---|" + "---|" * len(attacks),
    ]
    for d in ("base", "aaa", "feature@0.02"):
        lines.append(
            f"| {d} | "
            + " | ".join(f"{verified(cells[(d, a, budget)]).text()}" for a in attacks)
            + " |"
        )
    gain = {a: paired(cells[("aaa", a, budget)], cells[("base", a, budget)]) for a in attacks}
    lines.append(
        "| **Δ AAA − Base** | "
        + " | ".join(f"**{100 * g.value:+.1f} ± {100 * g.se:.1f}**" for g in gain.values())
        + " |"
    )
    score = [a for a in attacks if a in ("square-linf", "nes-linf", "signhunter-linf")]
    decision = [a for a in attacks if a in ("rays", "signflip")]
    summary = (
        "Claim 4 (AAA stops score-based, not decision-based attacks): AAA − Base = "
        + ", ".join(
            f"{attack_label(a)} {100 * gain[a].value:+.1f} ± {100 * gain[a].se:.1f}"
            for a in score + decision
        )
        + " points."
    )
    return [*lines, "", summary], [summary]


def claim5(out: Path) -> tuple[list[str], list[str]]:
    one, nine = _load(out, "cnn-votes1"), _load(out, "cnn-main")
    if one is None or nine is None:
        return ["(votes runs missing)"], []
    (h1, c1), (_, c9) = one, nine
    attacks, budget = _attacks_budget(h1)
    lines = [
        f"fashion-cnn, 2-point drop, the same {h1.n_attacked} images, {budget} queries: robust accuracy "
        "with votes = 1 (the first misclassified forward counts) and votes = 9 (the verified "
        "protocol), each verified / fresh (fresh: a new majority of that many forwards at the "
        "returned point).",
        "",
        "| defense | votes | " + " | ".join(attack_label(a) for a in attacks) + " |",
        "|---|---|" + "---|" * len(attacks),
    ]
    gaps = []
    for d in h1.defenses:
        images = {r.image for r in c1[(d, attacks[0], budget)]}
        for votes, cells in ((1, c1), (9, c9)):
            row = []
            for a in attacks:
                rows = [r for r in cells[(d, a, budget)] if r.image in images]
                row.append(_both(rows))
            lines.append(f"| {d} | {votes} | " + " | ".join(row) + " |")
        if d != "base":
            gaps += [paired(c9[(d, a, budget)], c1[(d, a, budget)]).value for a in attacks]
    summary = f"Claim 5 (votes = 1 flatters the attacker): verified robust accuracy with 9 votes minus with 1, over the randomized defenses and attacks: mean {100 * statistics.fmean(gaps):+.1f} points, range {100 * min(gaps):+.1f} to {100 * max(gaps):+.1f}."
    return [*lines, "", summary], [summary]


def resnet_main(out: Path) -> list[str]:
    loaded = _load(out, "resnet18-main")
    if loaded is None:
        return []
    header, cells = loaded
    attacks, budget = _attacks_budget(header)
    lines = [
        f"resnet18 (`randfeat train`), {header.n_attacked} images, {budget} queries, 2-point drop:",
        "",
        "| defense | ν | " + " | ".join(attack_label(a) for a in attacks) + " |",
        "|---|---|" + "---|" * len(attacks),
    ]
    for d in header.defenses:
        nu = header.calibration[d].nu if d in header.calibration else None
        lines.append(
            f"| {d} | {'–' if nu is None else f'{nu:.3g}'} | "
            + " | ".join(_both(cells[(d, a, budget)]) for a in attacks)
            + " |"
        )
    diffs = _feature_minus_input(cells, attacks, budget)
    lines.append("| **Δ Feature − Input** | | " + " | ".join(map(_diff, diffs)) + " |")
    return lines


def plots(out: Path, dest: Path) -> list[str]:
    made = []
    for name, title in (
        ("cnn-main", "fashion-cnn: robust accuracy against queries"),
        ("cnn-long", "10,000 queries"),
        ("cnn-eot5", "Square vs EOT-Square (m = 5)"),
        ("resnet18-main", "resnet18"),
    ):
        path = out / f"{name}.jsonl"
        if not path.exists():
            continue
        res = read_results(path)
        png = dest / f"fashion-{name}.png"
        plot_curves(res.header, res.rows, png, dpi=60)
        made.append(f"![{title}](fashion-{name}.png)")
    return made


def write_page(body: str, page: Path = PAGE) -> None:
    text = page.read_text() if page.exists() else f"# Fashion-MNIST\n\n{START}\n{END}\n"
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    page.write_text(pattern.sub(lambda m: f"{START}\n{body.strip()}\n{END}", text))


def report(out: Path, seconds: Mapping[str, float], write: bool, cmd: str) -> str:
    parts: list[str] = []
    verdicts: list[str] = []

    def section(title: str, lines: Sequence[str], extra: Sequence[str] = ()) -> None:
        parts.extend([f"### {title}", "", *lines, ""])
        verdicts.extend(extra)

    l1, v1 = claim1(out)
    section(
        "1. Feature vs input noise at equal clean-accuracy cost", [*l1, "", *claim1_long(out)], v1
    )
    l2, v2 = claim2(out, "fashion-cnn", CNN_DEPTH, "cnn", None)
    section("2. The depth of the perturbed layer", l2, v2)
    if (out / f"resnet18-depth-{RESNET_DEPTH[0]}.jsonl").exists():
        l2r, v2r = claim2(out, "resnet18", RESNET_DEPTH, "resnet18", None)
        section("2b. The depth of the perturbed layer in resnet18", l2r, v2r)
    l3, v3 = claim3(out)
    section("3. EOT at the same total query budget", l3, v3)
    l4, v4 = claim4(out)
    section("4. AAA against score- and decision-based attacks", l4, v4)
    l5, v5 = claim5(out)
    section("5. The lucky attacker: votes = 1 against votes = 9", l5, v5)
    rm = resnet_main(out)
    if rm:
        section("resnet18: feature vs input", rm)
    dest = PAGE.parent
    dest.mkdir(parents=True, exist_ok=True)
    figures = plots(out, dest if write else out)
    total = sum(seconds.values())
    head = [
        f"Generated by `{cmd}` on {describe_machine()}; "
        + (
            f"experiments took {total / 60:.0f} min of worker time ({', '.join(f'{k} {v / 60:.1f}' for k, v in seconds.items())} min)."
            if seconds
            else "from existing result files."
        ),
        "",
        "**Verdicts** (computed from the tables below):",
        "",
        *[f"- {v}" for v in verdicts],
        "",
        *figures,
        "",
    ]
    body = "\n".join(head + parts)
    if write:
        write_page(body)
    return body
