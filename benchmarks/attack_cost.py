"""Attack cost against pure query cost ("Attack cost vs pure query cost" in docs/benchmarks.md).

On a timm `resnet18` (`pretrained=False`, 10 classes) at `--size`² pixels, with labels = the
model's own predictions, every attack of ours is timed against the cost of its forwards at
full-batch efficiency: `t_batch` is the median time of one forward of the whole batch of `--n`
images, and the pure cost is `(forwards / N) · t_batch`, counting queries and verification
forwards. The target is a ratio `wall / pure <= 1.15`. Attacks run with `batch_size = N`, so no
model call holds more images than the `t_batch` forward. The table splits the wall time into time
inside the model and outside, counts model calls with fewer than N images (less efficient), and
gives `t_batch` as measured on the attack's own full-batch forwards (same load). For attacks that
miss the target the script profiles a second run (cProfile, the model's share removed) and prints
where the time outside the model goes. All timings use `--threads` torch threads (default 1); the
script seeds torch's global generator before creating the resnet18 (timm draws from it).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/attack_cost.py                 # full run (~3 min on 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/attack_cost.py --n 8 --budget 40 --repeats 1
    OMP_NUM_THREADS=1 python benchmarks/attack_cost.py --write         # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass
from typing import Any

import torch
from common.machine import describe_machine, replace_section
from common.measure import Counting, forward_times, log, profile_outside_model, timed

from randfeat.eval.attacks import NES, RayS, SignFlip, SignHunter, Square
from randfeat.eval.attacks.base import Attack
from randfeat.eval.attacks.eot import EOT

OVERHEAD_TARGET = 1.15
"""An attack should cost at most this much more than the pure cost of its forwards."""


@dataclass
class CostRow:
    """One attack's cost on the resnet18 batch; times are medians over ``--qc-repeats`` runs."""

    name: str
    success: float
    forwards: int  # images through the model in one run (queries + verification)
    calls: int  # model calls in one run
    t_batch: float  # seconds per image in one forward of the whole batch
    wall: float
    in_model: float
    t_batch_attack: float  # same, median over the attack's own full-batch forwards
    partial: int  # model calls with fewer than N images
    strided: int  # model inputs that were not contiguous
    profile: str = ""

    @property
    def pure(self) -> float:
        return self.forwards * self.t_batch

    @property
    def ratio(self) -> float:
        return self.wall / self.pure

    @property
    def ratio_attack(self) -> float:
        """Wall over pure cost with ``t_batch`` taken from the attack's own full-batch forwards."""
        return self.wall / (self.forwards * self.t_batch_attack)


def cost_attacks(args: argparse.Namespace) -> list[tuple[str, Attack]]:
    li, l2 = args.eps_linf, args.eps_l2
    out: list[tuple[str, Attack]] = [
        ("Square ℓ∞", Square(li, "linf")),
        ("Square ℓ2", Square(l2, "l2")),
        ("NES ℓ∞", NES(li, "linf")),
        ("NES ℓ2", NES(l2, "l2")),
    ]
    out += [("SignHunter ℓ∞", SignHunter(li, "linf")), ("SignHunter ℓ2", SignHunter(l2, "l2"))]
    out += [
        (f"EOT(Square ℓ∞, m={args.eot_m})", EOT(Square(li, "linf"), args.eot_m)),
        ("RayS ℓ∞", RayS(li)),
        ("SignFlip ℓ∞", SignFlip(li)),
    ]
    return out


def measure_costs(args: argparse.Namespace) -> list[CostRow]:
    import timm

    torch.manual_seed(args.seed)  # script only: timm initialises from the global RNG
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    counting = Counting(model).eval()
    g = torch.Generator().manual_seed(args.seed)
    n, size = args.n, args.size
    x = torch.rand(n, 3, size, size, generator=g)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    forward_times(model, x, 3)  # warm up
    rows = []
    for name, atk in cost_attacks(args):
        if any(s.lower() in name.lower() for s in args.skip):
            continue
        log(f"cost: {name}")

        def run(atk: Attack = atk) -> Any:
            # batch_size = N: no model call holds more images than the t_batch forward
            return atk.run(counting, x, y, budget=args.budget, seed=args.seed, batch_size=n)

        times, walls, in_model, during = [], [], [], []
        for _ in range(args.repeats):
            times += forward_times(model, x, args.reps)
            counting.reset(n)
            counting.full = n
            res, wall = timed(run)
            walls.append(wall)
            in_model.append(counting.seconds)
            during += counting.full_times
        times += forward_times(model, x, args.reps)
        row = CostRow(
            name,
            float(res.success.double().mean()),
            counting.rows,
            counting.calls,
            statistics.median(times) / n,
            statistics.median(walls),
            statistics.median(in_model),
            statistics.median(during) / n if during else float("nan"),
            counting.calls - len(counting.full_times),
            counting.strided,
        )
        log(f"cost: {name}: wall / pure {row.ratio:.2f}")
        if row.ratio > OVERHEAD_TARGET and args.profile:
            row.profile = profile_outside_model(run)
        rows.append(row)
    return rows


def _num(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.2f}"


def markdown(rows: list[CostRow], args: argparse.Namespace) -> str:
    lines = [
        f"Machine: {describe_machine()}; CPU shared with other jobs, timings are noisy. timm "
        f"resnet18 (pretrained=False, 10 classes), {args.n} random {args.size}×"
        f"{args.size} images labelled by the model's own predictions, budget {args.budget} "
        f"queries, ε ℓ∞ = {args.eps_linf:.4g}, ε ℓ2 = {args.eps_l2:g} (small, so that the "
        f"attacks spend their budget), votes 9, batch_size = {args.n}. t_batch: median time "
        f"of one forward of the {args.n} images ({args.reps} forwards before and after "
        "each run), per image. Pure cost = forwards (queries + verification) × t_batch. In model: "
        "time inside the model's forward during the attack; outside = wall − in model (the "
        "attack's own work: candidates, oracle checks). Wall/in-model are medians of "
        f"{args.repeats} run(s). Target: wall / pure ≤ {OVERHEAD_TARGET}.",
        "",
        "| attack | success | forwards/img | model calls | t_batch ms/img | pure s | wall s | "
        "in model s | outside s | in model / pure | outside / pure | wall / pure | ≤ target | "
        "t_batch in attack ms/img | wall / pure (in-attack t_batch) | partial calls | "
        "strided inputs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.success:.2f} | {r.forwards / args.n:.1f} | {r.calls} | "
            f"{1000 * r.t_batch:.2f} | {r.pure:.2f} | {r.wall:.2f} | {r.in_model:.2f} | "
            f"{r.wall - r.in_model:.2f} | {r.in_model / r.pure:.2f} | "
            f"{(r.wall - r.in_model) / r.pure:.2f} | {r.ratio:.2f} | "
            f"{'yes' if r.ratio <= OVERHEAD_TARGET else 'NO'} | {_num(1000 * r.t_batch_attack)} | "
            f"{_num(r.ratio_attack)} | {r.partial} | {r.strided} |"
        )
    lines += [
        "",
        "t_batch in attack: median time per image of the attack's own forwards of the whole batch "
        "(same load as the attack; a gap to t_batch means the model ran slower during the attack, "
        "from load drift or from the attack's inputs, e.g. non-contiguous ones). Partial calls: "
        "model calls with fewer than N images (less efficient per image; they show in "
        "in model / pure; EOT splits a query into chunks of whole images × m, "
        f"{max(1, args.n // args.eot_m) * args.eot_m} rows here). "
        "Ratios at or below 1 come from forwards that ran faster than the separate t_batch "
        "measurement.",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=32, help="images")
    p.add_argument("--budget", type=int, default=200, help="queries per image")
    p.add_argument("--size", type=int, default=32, help="image side")
    p.add_argument("--eps-linf", type=float, default=1 / 255)
    p.add_argument("--eps-l2", type=float, default=0.1)
    p.add_argument("--eot-m", type=int, default=5)
    p.add_argument("--reps", type=int, default=10, help="t_batch forwards before/after each run")
    p.add_argument("--repeats", type=int, default=3, help="runs per attack (median)")
    p.add_argument("--skip", nargs="*", default=[], help="attacks to skip (substring)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: comparable timings)")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure_costs(args)
    md = markdown(rows, args)
    print("\n## Attack cost vs pure query cost\n\n" + md + "\n", flush=True)
    for r in rows:
        if r.profile:
            print(
                f"### Profile of {r.name} (cProfile, outside the model)\n\n```\n{r.profile}\n```\n"
            )
    if args.write:
        replace_section("Attack cost vs pure query cost", md)


if __name__ == "__main__":
    main()
