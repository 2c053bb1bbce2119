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
    OMP_NUM_THREADS=1 python benchmarks/fashion_claims.py --out bench-out/fashion-quick --quick

The tables, plots and the page are written by `common/fashion_report.py`; this script runs the
experiments. The page shows the command that generated it with the paths a reader can use: a
path inside the repository relative to its root, one in the home folder as `~/...`, any other
as a placeholder (`OUT`, `CKPT`).
"""

from __future__ import annotations

import argparse
import json
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
from common.fashion_report import CNN_DEPTH, RESNET_DEPTH, report
from common.machine import ROOT

from randfeat.eval.grid.config import EvalConfig
from randfeat.eval.grid.presets import PAPER_ATTACKS
from randfeat.eval.grid.runner import run_eval


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


def shown_path(value: str, placeholder: str) -> str:
    """`value` as the page shows it, runnable on a reader's machine.

    Inside the repository: relative to its root (the scripts run from there); in the home folder:
    `~/...`; anywhere else: `placeholder`, since another machine's absolute paths mean nothing to
    a reader.
    """
    path = Path(os.path.abspath(Path(value).expanduser()))
    if path.is_relative_to(ROOT):
        return shlex.quote(path.relative_to(ROOT).as_posix())
    home = Path.home()
    if home != Path(home.anchor) and path.is_relative_to(home):
        return "~/" + shlex.quote(path.relative_to(home).as_posix())
    return placeholder


def command_line(args: argparse.Namespace) -> str:
    """The command that ran, as the page shows it: paths by `shown_path`, defaults left out."""
    parts = ["python", "benchmarks/fashion_claims.py", "--out", shown_path(args.out, "OUT")]
    if args.quick:
        parts.append("--quick")
    elif args.scale != "full":
        parts += ["--scale", args.scale]
    if args.resnet18:
        parts += ["--resnet18", shown_path(args.resnet18, "CKPT")]
    if args.workers != 2:
        parts += ["--workers", str(args.workers)]
    if args.only:
        parts += ["--only", shlex.quote(args.only)]
    parts += [
        flag
        for flag, on in (("--only-report", args.only_report), ("--no-write", args.no_write))
        if on
    ]
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", metavar="OUT", required=True, help="directory of the result files (resumable)"
    )
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
    if args.only:  # a subset: the tables need every experiment
        print("[fashion_claims] done; tabulate with --only-report once every experiment is done")
        return 0
    print(report(out, seconds, not args.no_write and name != "quick", command_line(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
