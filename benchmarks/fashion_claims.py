"""The paper's claims measured on Fashion-MNIST: tables with standard errors, plots, verdicts.

Nguyen et al., "Understanding the Robustness of Randomized Feature Defense Against Query-Based
Adversarial Attacks" (ICLR 2024) claim, on ImageNet and CIFAR-10:

1. noise on the features is at least as robust as noise on the input (RND) at equal clean-accuracy
   cost, under every attack (Tables 1-2);
2. robustness depends on the depth of the perturbed layer, and Eq. 26 predicts which layer is best
   (§4.4): here compared with `randfeat.theory.layer_report`'s ranking by Spearman's ρ;
3. EOT (averaging m noisy forwards per query) does not help the attacker at the same total query
   budget (§4.5);
4. AAA stops score-based attacks (Square) but not decision-based ones (RayS, SignFlip);
5. the "lucky attacker" who needs one misclassified forward (votes = 1, Table 15) looks stronger
   than the verified protocol (votes = 9); every cell shows the verified and the fresh figure.

Each experiment is a `randfeat eval` grid (`run_eval`) written to its own resumable result file in
`--out`; rerunning the script resumes them. Experiments run in `--workers` processes of one torch
thread each. Then the script reads every file and writes the tables and plots into
`docs/results/fashion-mnist.md` (between the markers `<!-- generated:start -->` and
`<!-- generated:end -->`) and `docs/results/fashion-*.png`.

Standard errors: a verified robust accuracy $p$ over $n$ images has $\\sqrt{p(1-p)/n}$; a fresh one
(a mean of per-image probabilities) the sample standard deviation over $\\sqrt{n}$; a difference of
two defenses on the same images the standard deviation of the per-image differences over
$\\sqrt{n}$ (paired). A claim "holds" when the difference has the claimed sign and exceeds two
standard errors, is a "tie" within two, and is "reversed" beyond two the other way.

Usage:

    OMP_NUM_THREADS=1 python benchmarks/fashion_claims.py --out bench-out/fashion \\
        --resnet18 ~/.cache/randfeat/fashion-resnet18.pt             # the full run
    OMP_NUM_THREADS=1 python benchmarks/fashion_claims.py --out bench-out/fashion --scale medium \\
        --resnet18 ~/.cache/randfeat/fashion-resnet18.pt             # half the images (the page's)
    OMP_NUM_THREADS=1 python benchmarks/fashion_claims.py --out /tmp/fc --quick --no-write
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import re
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _machine import describe_machine

from randfeat.eval.grid.config import EvalConfig
from randfeat.eval.grid.plan import load_model, load_pool
from randfeat.eval.grid.presets import PAPER_ATTACKS
from randfeat.eval.grid.runner import run_eval
from randfeat.eval.records import AttackRow, Header
from randfeat.eval.report.plot import plot_curves
from randfeat.eval.report.summary import attack_label, attack_rows_by_cell
from randfeat.eval.resultfile import read_results
from randfeat.theory import layer_report

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "results" / "fashion-mnist.md"
START, END = "<!-- generated:start -->", "<!-- generated:end -->"
CNN_DEPTH = ("conv1", "pool1", "pool2", "head.pre")
"""The CNN's layers for claim 2, shallow to deep (after conv1; after blocks 1 and 2; penultimate)."""
RESNET_DEPTH = ("model.layer1", "model.layer2", "model.layer3", "model.fc.pre")
"""resnet18's layers for claim 2: after stages 1-3, and the pooled penultimate features."""


@dataclass(frozen=True)
class Scale:
    """Image counts and budgets of one run of the script."""

    main: int  # claims 1, 4 and 5: images, budget 1000, all five attacks
    long: int  # Square and SignHunter at budget 10,000
    depth: int  # claim 2, Square
    eot: int  # claim 3
    resnet: int  # resnet18: main and depth
    budget: int
    long_budget: int
    calib: int  # calibration images of the main grid (and of claim 5: the same images, the same ν)
    calib_other: int  # of the other CNN grids
    calib_resnet: int
    draws_resnet: int  # noise draws per calibration image for resnet18 (the default is 64)


FULL = Scale(main=400, long=100, depth=200, eot=200, resnet=100, budget=1000, long_budget=10000, calib=1000, calib_other=500, calib_resnet=200, draws_resnet=32)  # fmt: skip
MEDIUM = Scale(main=200, long=50, depth=100, eot=100, resnet=50, budget=1000, long_budget=10000, calib=1000, calib_other=500, calib_resnet=200, draws_resnet=32)  # fmt: skip
QUICK = Scale(main=20, long=10, depth=10, eot=10, resnet=10, budget=60, long_budget=200, calib=200, calib_other=100, calib_resnet=100, draws_resnet=8)  # fmt: skip


SCALES = {"full": FULL, "medium": MEDIUM, "quick": QUICK}


@dataclass(frozen=True)
class Experiment:
    """One `randfeat eval` grid of the script."""

    name: str
    settings: Mapping[str, Any]
    cost: float = 1.0  # rough relative cost, to start the longest first


def experiments(scale: Scale, resnet18: str | None) -> list[Experiment]:
    """The grids of one run, by name."""
    five, budget = ",".join(PAPER_ATTACKS), str(scale.budget)
    cnn = {"model": "fashion-cnn", "data": "fashion-mnist", "calib_images": scale.calib_other, "quiet": True, "layers": "head.pre"}  # fmt: skip
    main = {**cnn, "n_images": scale.main, "calib_images": scale.calib}
    eot = {**cnn, "n_images": scale.eot, "defenses": "input,feature", "target_drop": "0.02", "budgets": budget}  # fmt: skip
    out = [
        Experiment("cnn-main", {**main, "defenses": "base,input,feature,aaa", "target_drop": "0.01,0.02,0.04", "attacks": five, "budgets": budget}, cost=8 * scale.main),
        Experiment("cnn-long", {**cnn, "n_images": scale.long, "defenses": "base,input,feature", "target_drop": "0.02", "attacks": "square-linf,signhunter-linf", "budgets": str(scale.long_budget)}, cost=5 * scale.long * scale.long_budget / scale.budget),
        # the main grid's images and calibration images, so the same ν: only the votes differ
        Experiment("cnn-votes1", {**main, "defenses": "input,feature", "target_drop": "0.02", "attacks": five, "budgets": budget, "votes": 1}, cost=2 * scale.main),
        # the same images and calibration in both (same n_images, same seed): the same ν
        Experiment("cnn-eot5", {**eot, "attacks": "square-linf,eot-square-linf", "eot_m": 5}, cost=2 * scale.eot),
        Experiment("cnn-eot10", {**eot, "attacks": "eot-square-linf", "eot_m": 10}, cost=scale.eot),
    ]  # fmt: skip
    for layer in CNN_DEPTH:
        out.append(Experiment(f"cnn-depth-{layer}", {**cnn, "n_images": scale.depth, "defenses": "feature", "target_drop": "0.02", "layers": layer, "attacks": "square-linf", "budgets": budget}, cost=scale.depth / 2))  # fmt: skip
    if resnet18:
        r18 = {"model": "resnet18", "checkpoint": resnet18, "data": "fashion-mnist", "calib_images": scale.calib_resnet, "calib_draws": scale.draws_resnet, "quiet": True, "n_images": scale.resnet}  # fmt: skip
        out.append(Experiment("resnet18-main", {**r18, "defenses": "base,input,feature", "target_drop": "0.02", "attacks": "square-linf,signhunter-linf,rays", "budgets": budget}, cost=3 * 3 * scale.resnet * 4))  # fmt: skip
        for layer in RESNET_DEPTH:
            out.append(Experiment(f"resnet18-depth-{layer}", {**r18, "defenses": "feature", "target_drop": "0.02", "layers": layer, "attacks": "square-linf", "budgets": budget}, cost=scale.resnet * 2))  # fmt: skip
    return out


def _run_one(args: tuple[Experiment, str]) -> tuple[str, float]:
    exp, out = args
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run_eval(EvalConfig.from_mapping({**exp.settings, "out": str(Path(out) / f"{exp.name}.jsonl")}))
    return exp.name, time.perf_counter() - t0


def worker_seconds(out: Path, new: Mapping[str, float]) -> dict[str, float]:
    """The worker seconds of every experiment in `out`, kept in `out/seconds.json` across runs.

    A rerun resumes finished experiments in seconds: per experiment the larger figure is kept, the
    one of the run that did the work.
    """
    path = out / "seconds.json"
    old: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
    merged = {k: max(v, old.get(k, 0.0)) for k, v in new.items()}
    merged = {**old, **merged}
    if new:
        path.write_text(json.dumps(merged, indent=1, sort_keys=True))
    return merged


def run_all(exps: Sequence[Experiment], out: Path, workers: int) -> dict[str, float]:
    """Run (or resume) every experiment; returns the wall seconds of each."""
    out.mkdir(parents=True, exist_ok=True)
    for e in exps:  # every setting checked before any work
        EvalConfig.from_mapping({**e.settings, "out": str(out / f"{e.name}.jsonl")})
    order = sorted(exps, key=lambda e: -e.cost)
    seconds: dict[str, float] = {}
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, maxtasksperchild=1) as pool:
        for name, s in pool.imap_unordered(_run_one, [(e, str(out)) for e in order]):
            seconds[name] = s
            print(f"[fashion_claims] {name} done in {s:.0f} s", flush=True)
    return seconds


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


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def claim1(out: Path) -> tuple[list[str], list[str]]:
    """Feature vs input at 1, 2, 4-point drops under every attack."""
    loaded = _load(out, "cnn-main")
    if loaded is None:
        return ["(cnn-main not run)"], []
    header, cells = loaded
    drops = header.config["target_drop"]
    attacks = [a for a in header.config["attacks"]]
    budget = header.config["budgets"][0]
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
                + " | ".join(f"{verified(r).text()} / {fresh(r).text()}" for r in row)
                + " |"
            )
        diffs = [
            paired(cells[(f"feature@{t:g}", a, budget)], cells[(f"input@{t:g}", a, budget)])
            for a in attacks
        ]
        lines.append(
            f"| {100 * t:g} | **Δ** | | "
            + " | ".join(
                f"**{100 * d.value:+.1f} ± {100 * d.se:.1f}** ({verdict(d)})" for d in diffs
            )
            + " |"
        )
        verdicts += [verdict(d) for d in diffs]
    counts = {v: verdicts.count(v) for v in ("holds", "tie", "reversed")}
    summary = f"Claim 1 (feature ≥ input): of {len(verdicts)} (drop, attack) pairs, feature is higher beyond 2 SE in {counts['holds']}, within 2 SE in {counts['tie']}, lower beyond 2 SE in {counts['reversed']}."
    return lines, [summary]


def claim1_long(out: Path) -> list[str]:
    loaded = _load(out, "cnn-long")
    if loaded is None:
        return []
    header, cells = loaded
    budget = header.config["budgets"][0]
    attacks = header.config["attacks"]
    lines = [
        f"The same at {budget} queries (Square and SignHunter, 2-point drop, {header.n_attacked} images):",
        "",
        "| defense | " + " | ".join(attack_label(a) for a in attacks) + " |",
        "|---|" + "---|" * len(attacks),
    ]
    for d in header.defenses:
        lines.append(
            f"| {d} | "
            + " | ".join(
                f"{verified(cells[(d, a, budget)]).text()} / {fresh(cells[(d, a, budget)]).text()}"
                for a in attacks
            )
            + " |"
        )
    diffs = [
        paired(cells[("feature@0.02", a, budget)], cells[("input@0.02", a, budget)])
        for a in attacks
    ]
    lines.append(
        "| **Δ Feature − Input** | "
        + " | ".join(f"**{100 * d.value:+.1f} ± {100 * d.se:.1f}** ({verdict(d)})" for d in diffs)
        + " |"
    )
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
        budget = header.config["budgets"][0]
        measured[layer] = verified(cells[("feature@0.02", "square-linf", budget)])
        calibrated[layer] = header.calibration["feature@0.02"]
    if header0 is None or len(measured) < 2:
        return [f"({prefix} depth runs missing)"], []
    cfg = EvalConfig.from_mapping(
        {k: v for k, v in header0.config.items() if k in set(EvalConfig.keys())}
    )
    model = load_model(cfg).eval()
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
        f"{header0.config['budgets'][0]} queries, {header0.n_attacked} images. Predicted: "
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
    budget = h5.config["budgets"][0]
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
            f"| {d} | {verified(plain).text()} / {fresh(plain).text()} | {verified(e5).text()} / {fresh(e5).text()} | {verified(e10).text()} / {fresh(e10).text()} | {100 * d5.value:+.1f} ± {100 * d5.se:.1f} | {100 * d10.value:+.1f} ± {100 * d10.se:.1f} |"
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
    budget = header.config["budgets"][0]
    attacks = header.config["attacks"]
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
    budget = h1.config["budgets"][0]
    attacks = h1.config["attacks"]
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
                row.append(f"{verified(rows).text()} / {fresh(rows).text()}")
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
    budget = header.config["budgets"][0]
    attacks = header.config["attacks"]
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
            + " | ".join(
                f"{verified(cells[(d, a, budget)]).text()} / {fresh(cells[(d, a, budget)]).text()}"
                for a in attacks
            )
            + " |"
        )
    diffs = [
        paired(cells[("feature@0.02", a, budget)], cells[("input@0.02", a, budget)])
        for a in attacks
    ]
    lines.append(
        "| **Δ Feature − Input** | | "
        + " | ".join(f"**{100 * d.value:+.1f} ± {100 * d.se:.1f}** ({verdict(d)})" for d in diffs)
        + " |"
    )
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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory of the result files (resumable)")
    p.add_argument("--resnet18", metavar="CKPT", help="a randfeat train checkpoint of resnet18")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
    p.add_argument(
        "--scale",
        choices=SCALES,
        default="full",
        help="image counts and budgets: full, medium (half the images) or quick (tiny settings, "
        "to check the script runs; writes nothing)",
    )
    p.add_argument("--quick", action="store_true", help="the same as --scale quick")
    p.add_argument(
        "--only",
        metavar="PREFIX",
        help="run only the experiments whose name starts with PREFIX (cnn, resnet18, cnn-depth, ...)"
        "; the report still reads every file in --out",
    )
    p.add_argument("--only-report", action="store_true", help="do not run; tabulate the files")
    p.add_argument("--no-write", action="store_true", help="print the page body, write nothing")
    args = p.parse_args(argv)
    out = Path(args.out).expanduser()
    name = "quick" if args.quick else args.scale
    exps = experiments(SCALES[name], args.resnet18)
    if args.only:
        exps = [e for e in exps if e.name.startswith(args.only)]
        if not exps:
            p.error(f"--only {args.only!r} matches no experiment of this run")
    seconds = worker_seconds(out, {} if args.only_report else run_all(exps, out, args.workers))
    cmd = "python benchmarks/fashion_claims.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.only:  # a subset: the tables need every experiment
        print("[fashion_claims] done; tabulate with --only-report once every experiment is done")
        return 0
    print(report(out, seconds, not args.no_write and name != "quick", cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
