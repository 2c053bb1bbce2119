"""Defense in depth: randomized feature noise and a stateful query detector, each alone and together.

The question (issue 23): against its own strongest adaptive attacker, does noise + detection
keep more images than either layer alone, and at what benign false-positive cost?

Every experiment is one `randfeat eval` grid (`run_eval`) with the defenses `base`, `feature`
(fresh noise, ν calibrated to a 2-point clean-accuracy drop) and `keyed` (keyed feature noise),
written to its own resumable result file in `--out` (rerunning the script resumes them):

- `<data>-none`: no detector: the settings *none*, *noise*, *keyed*;
- `<data>-<detector>-<on_detect>` for the detectors `pooled-linf` and `blacklight` and the
  actions `reject` and `log` (the silent case): *detection alone*, *noise + detection*,
  *keyed + detection*;
- `<data>-sybil-<k>` (`pooled-linf`, `on_detect = ban` after 10 flags, the attacker on k = 1 or
  10 API keys): base and feature under Square and adaptive Square.

The attackers are every attack family in its ℓ∞ form, the adaptive ones and the persistent ones;
one not in `randfeat.eval.ATTACKS` when the script runs is left out and its cells read "not
registered". Each image is attacked on its own behind the detector, which has stored a benign
history first (`randfeat.eval.grid.detection`).

Standard errors: a fraction $p$ over $n$ images has $\\sqrt{p(1-p)/n}$; a difference of two
settings on the same images the standard deviation of the per-image differences over $\\sqrt{n}$.
A difference "holds" beyond two standard errors in the claimed direction, is a "tie" within two,
and is "reversed" beyond two the other way.

Usage:

    OMP_NUM_THREADS=1 python benchmarks/defense_in_depth.py --out bench-out/did --scale medium --write
    OMP_NUM_THREADS=1 python benchmarks/defense_in_depth.py --out /tmp/did --scale quick  # < 60 s

The tables, plots and the page are `common/defense_report.py`'s.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common.defense_report import DETECTORS, ON_DETECT, Data, Plan, by_label, report
from common.machine import ROOT

from randfeat.checks import check_positive_int
from randfeat.eval import ATTACKS
from randfeat.eval.grid.config import EvalConfig
from randfeat.eval.grid.runner import run_eval
from randfeat.eval.outcome import robust_accuracy_curve
from randfeat.eval.report.summary import attack_label

PAGE = ROOT / "docs" / "results" / "defense-in-depth.md"
ATTACKERS = (
    "square-linf", "nes-linf", "signhunter-linf", "rays", "signflip", "hsja-linf",
    "adaptive-square-linf", "adaptive-nes-linf", "adaptive-hsja-linf",
    "resubmit-square-linf", "jitter-eot-square-linf",
)  # fmt: skip
"""Every attacker of the page: the families in ℓ∞, the adaptive ones, the persistent ones."""
SYBIL_ATTACKERS = ("square-linf", "adaptive-square-linf")
DATA = {
    # digits: 540 test images leave ~420 benign ones, too few for 0.1% (1,000 needed)
    "digits": {"data": "digits", "detect_fpr": 0.005},
    "fashion-mnist": {"model": "fashion-cnn", "data": "fashion-mnist", "layers": "head.pre", "detect_fpr": 0.001},
}  # fmt: skip


@dataclass(frozen=True)
class Scale:
    """Images per data set (0: not run at this scale), budgets, attackers, detectors."""

    images: Mapping[str, int]
    budgets: tuple[int, ...]
    attackers: tuple[str, ...]
    detectors: tuple[str, ...]
    sybil: tuple[str, ...]  # data sets with the sybil runs


SCALES = {
    "quick": Scale({"digits": 10, "fashion-mnist": 0}, (50,), ("square-linf", "adaptive-square-linf", "resubmit-square-linf"), ("pooled-linf",), ()),
    "medium": Scale({"digits": 50, "fashion-mnist": 30}, (1000,), ATTACKERS, DETECTORS, ("digits",)),
    "full": Scale({"digits": 50, "fashion-mnist": 100}, (1000, 10000), ATTACKERS, DETECTORS, ("digits", "fashion-mnist")),
}  # fmt: skip


@dataclass(frozen=True)
class Experiment:
    """One `randfeat eval` grid of the script."""

    name: str
    settings: Mapping[str, Any]


def registered(names: Sequence[str]) -> tuple[str, ...]:
    """The attackers of `names` in `randfeat.eval.ATTACKS` now (others are being added)."""
    return tuple(a for a in names if a in ATTACKS)


def experiments(scale: Scale, data: Sequence[str]) -> list[Experiment]:
    """The grids of one run, by name."""
    out = []
    budgets = ",".join(map(str, scale.budgets))
    for name in data:
        n = scale.images[name]
        if n == 0:
            continue
        base = {**DATA[name], "n_images": n, "budgets": budgets, "quiet": True, "target_drop": "0.02"}  # fmt: skip
        fpr = base.pop("detect_fpr")
        grid = {**base, "defenses": "base,feature,keyed", "attacks": ",".join(registered(scale.attackers))}  # fmt: skip
        out.append(Experiment(f"{name}-none", grid))
        for det in scale.detectors:
            for act in ON_DETECT:
                out.append(Experiment(f"{name}-{det}-{act}", {**grid, "detect": det, "detect_fpr": fpr, "on_detect": act}))  # fmt: skip
        if name in scale.sybil:
            sybil = {**base, "defenses": "base,feature", "attacks": ",".join(registered(SYBIL_ATTACKERS)), "detect": "pooled-linf", "detect_fpr": fpr, "on_detect": "ban", "ban_after": 10}  # fmt: skip
            for k in (1, 10):
                out.append(Experiment(f"{name}-sybil-{k}", {**sybil, "accounts": k}))
    return out


def _config(exp: Experiment, out: str) -> EvalConfig:
    return EvalConfig.from_mapping({**exp.settings, "out": str(Path(out) / f"{exp.name}.jsonl")})


def _run_one(args: tuple[Experiment, str]) -> tuple[str, float]:
    exp, out = args
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run_eval(_config(exp, out))
    return exp.name, time.perf_counter() - t0


def run_all(exps: Sequence[Experiment], out: Path, workers: int) -> dict[str, float]:
    """Run (or resume) every experiment, in `workers` processes of one torch thread (1: in
    this process); returns the wall seconds of each."""
    out.mkdir(parents=True, exist_ok=True)
    for e in exps:  # every setting checked before any work
        _config(e, str(out))
    jobs = [(e, str(out)) for e in exps]
    seconds: dict[str, float] = {}
    if workers == 1:
        done = map(_run_one, jobs)
        for name, s in done:
            seconds[name] = s
            print(f"[defense_in_depth] {name} done in {s:.1f} s", file=sys.stderr, flush=True)
        return seconds
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, maxtasksperchild=1) as pool:
        for name, s in pool.imap_unordered(_run_one, jobs):
            seconds[name] = s
            print(f"[defense_in_depth] {name} done in {s:.1f} s", file=sys.stderr, flush=True)
    return seconds


def worker_seconds(out: Path, new: Mapping[str, float]) -> dict[str, float]:
    """Seconds per experiment, kept in `out/seconds.json` across runs (the larger figure: the
    run that did the work, not one that resumed a finished file)."""
    path = out / "seconds.json"
    old: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
    merged = {**old, **{k: max(v, old.get(k, 0.0)) for k, v in new.items()}}
    path.write_text(json.dumps(merged, indent=1, sort_keys=True))
    return merged


def plot(d: Data, budget: int, dest: Path) -> list[str]:
    """Kept vs queries and detected vs queries for the main settings, each at its strongest attacker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = torch.unique(torch.logspace(0, math.log10(budget), 60).round().long())
    main = ["none", "noise", "keyed"] + [f"{a} (pooled-linf, reject)" for a in ("detection alone", "noise + detection", "keyed + detection")]  # fmt: skip
    made = []
    for kind, ylabel in (("robust", "robust accuracy"), ("detected", "images detected")):
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = 0
        for label in main:
            s = by_label(label)
            best = d.strongest(s, budget)
            if best is None or (kind == "detected" and s.on_detect is None):
                continue
            rows = d.rows(s, best[0], budget)
            if isinstance(rows, str):
                continue
            if kind == "robust":
                y = robust_accuracy_curve(torch.tensor([r.success for r in rows]), torch.tensor([r.success_query for r in rows]), q)  # fmt: skip
            else:
                first = torch.tensor([r.detection.first_flag if r.detection else -1 for r in rows])
                y = (
                    ((first.unsqueeze(0) > 0) & (first.unsqueeze(0) <= q.unsqueeze(1)))
                    .double()
                    .mean(1)
                )
            ax.plot(q.numpy(), y.numpy(), label=f"{label}: {attack_label(best[0])}")
            drawn += 1
        ax.set(
            xscale="log",
            xlabel="queries",
            ylabel=ylabel,
            ylim=(-0.02, 1.02),
            title=f"{d.name}, {budget} queries",
        )
        if drawn:
            ax.legend(fontsize=6)
        name = f"defense-in-depth-{d.name}-{kind}.png"
        fig.savefig(dest / name, dpi=70, bbox_inches="tight")
        plt.close(fig)
        made.append(f"![{d.name}: {ylabel} against queries]({name})")
    return made


def shown_path(value: str, placeholder: str) -> str:
    """`value` as the page shows it: relative to the repository, `~/...`, or `placeholder`."""
    path = Path(os.path.abspath(Path(value).expanduser()))
    if path.is_relative_to(ROOT):
        return shlex.quote(path.relative_to(ROOT).as_posix())
    home = Path.home()
    if home != Path(home.anchor) and path.is_relative_to(home):
        return "~/" + shlex.quote(path.relative_to(home).as_posix())
    return placeholder


def command_line(args: argparse.Namespace) -> str:
    """The command that ran, as the page shows it (defaults left out)."""
    parts = ["python", "benchmarks/defense_in_depth.py", "--out", shown_path(args.out, "OUT")]
    parts += ["--scale", args.scale, "--data", args.data]
    if args.workers != 2:
        parts += ["--workers", str(args.workers)]
    if Path(args.page).resolve() != PAGE:
        parts += ["--page", shown_path(args.page, "PAGE")]
    return " ".join(parts + (["--write"] if args.write else []))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", metavar="DIR", required=True, help="result files (resumable)")
    p.add_argument("--scale", choices=SCALES, default="quick", help="quick (default), medium, full")
    p.add_argument("--data", choices=("digits", "fashion-mnist", "both"), default="both")
    p.add_argument("--workers", default="2", help="processes of one torch thread (default 2)")
    p.add_argument("--page", default=str(PAGE), help="the page to write (default: %(default)s)")
    p.add_argument("--write", action="store_true", help="write the page and plots (else print)")
    args = p.parse_args(argv)
    try:
        workers = check_positive_int(int(args.workers) if args.workers.isdigit() else args.workers, "workers")  # fmt: skip
    except (TypeError, ValueError) as err:
        p.error(str(err))
    scale = SCALES[args.scale]
    data = ("digits", "fashion-mnist") if args.data == "both" else (args.data,)
    exps = experiments(scale, data)
    out = Path(args.out).expanduser()
    seconds = worker_seconds(out, run_all(exps, out, workers)) if exps else {}
    plan = Plan(
        scale=args.scale,
        data=tuple(d for d in data if scale.images[d] > 0),
        budgets=scale.budgets,
        attackers=scale.attackers,
        all_attackers=ATTACKERS,
        registered=frozenset(ATTACKS),
        runs=frozenset(e.name for e in exps),
        fpr={k: float(str(v["detect_fpr"])) for k, v in DATA.items()},
    )
    body = report(out, plan, Path(args.page), args.write, command_line(args), seconds, plot)
    if not args.write:
        print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
