"""Our attacks against peer implementations ("Attacks vs peers" in docs/benchmarks.md).

On the digits CNN (undefended), the same ``--n`` correctly classified
test images (a class-balanced draw), the same per-image budget of *real model forwards*, and the
same seed where the peer takes one:

* our ``Square`` (ℓ∞ ε=0.2, ℓ2 ε=1.5) against ``torchattacks.Square`` (``n_queries=budget``, our
  ``p_init``, margin loss, one restart) and ART's ``SquareAttack``;
* our decision attacks ``RayS`` and ``SignFlip`` (ℓ∞ ε=0.2) against the closest decision-based peers
  that exist on PyPI, ART's ``HopSkipJump`` (ℓ∞) and ``SignOPTAttack`` (ℓ2 by design). Neither
  torchattacks 3.5.1 nor ART 1.20 ships RayS, SignFlip, NES or SignHunter.

Each implementation runs through `common/peers.py` (how each peer is held to the budget, how returned
points are judged). Ours and torchattacks (cheap) run `--repeats` seeds, interleaved; ART runs once
(slow, and HopSkipJump's init draws from an unseeded `RandomState`). The wall time splits into time
in the model and the attack's own work; where ours misses the 2× speed target, ours (and
torchattacks) are profiled (cProfile, the model's share removed) and the profile printed. All
timings use `--threads` torch threads (default 1; run with `OMP_NUM_THREADS=1`); the script seeds
numpy's and Python's global generators before each ART run (the peers draw from them); our attacks
use their own generators.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/attacks_vs_peers.py            # full run (~7 min on 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/attacks_vs_peers.py --n 20 --budget 200 --repeats 2
    OMP_NUM_THREADS=1 python benchmarks/attacks_vs_peers.py --write    # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
from collections.abc import Callable
from typing import Any

import torch
from common.machine import describe_machine, replace_section
from common.measure import Counting, log, profile_outside_model
from common.peers import (
    Row,
    run_art_decision,
    run_art_square,
    run_ours,
    run_torchattacks_square,
)
from torch import Tensor, nn

from randfeat.eval.attacks import RayS, SignFlip, Square
from randfeat.eval.attacks.base import Attack
from randfeat.eval.data.loaders import balanced_subset, digits
from randfeat.eval.models import digits_cnn
from randfeat.eval.oracle import Norm

SPEED_TARGET = 2.0
"""Ours should be at least this many times faster than a peer in wall time."""


def digits_subset(model: nn.Module, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` correctly classified test images, class-balanced when ``n`` is a multiple of 10."""
    data = digits()
    with torch.no_grad():
        wrong = (model(data.x_test).argmax(dim=1) != data.y_test).nonzero().squeeze(1)
    if n % 10 == 0:
        idx = balanced_subset(data.y_test, n, seed=seed, exclude=wrong)
    else:
        keep = torch.ones(data.y_test.shape[0], dtype=torch.bool)
        keep[wrong] = False
        idx = keep.nonzero().squeeze(1)[:n]
    return data.x_test[idx].contiguous(), data.y_test[idx].contiguous()


def compare(args: argparse.Namespace) -> tuple[list[Row], list[str], list[tuple[str, str]]]:
    """Run every implementation; profile ours (and torchattacks) where the speed target is missed."""
    clean = digits_cnn().eval()
    counting = Counting(clean).eval()
    x, y = digits_subset(clean, args.n, args.seed)
    b, s = args.budget, args.seed
    rows: list[Row] = []
    notes: list[str] = []
    rerun: dict[int, Callable[[], Any]] = {}  # id(row) -> one more run, for profiling
    have_ta = have_art = True
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        have_ta = False
        notes.append("torchattacks is not installed: its rows are missing.")
    try:
        import art  # noqa: F401
    except ImportError:
        have_art = False
        notes.append("adversarial-robustness-toolbox is not installed: its rows are missing.")

    with torch.no_grad():  # warm up the model once
        counting(x)

    def repeated(fns: list[Callable[[int], Row]]) -> list[Row]:
        """Run each implementation for seeds s, s+1, ..., interleaved (drift hits all alike)."""
        out: list[Row] = []
        for r in range(args.repeats):
            for i, fn in enumerate(fns):
                row = fn(s + r)
                if r == 0:
                    out.append(row)
                else:
                    out[i].merge(row)
        for row, fn in zip(out, fns, strict=True):
            rerun[id(row)] = functools.partial(fn, s)
        return out

    threats: tuple[tuple[Norm, float], ...] = (("linf", args.eps_linf), ("l2", args.eps_l2))
    for norm, eps in threats:
        ours = Square(eps, norm)
        log(f"Square {norm}: ours" + (" and torchattacks" if have_ta else ""))

        def run_sq(seed: int, ours: Square = ours) -> Row:
            return run_ours(ours, "Square", counting, clean, x, y, b, seed)

        def run_ta(seed: int, norm: Norm = norm, eps: float = eps, p: float = ours.p_init) -> Row:
            return run_torchattacks_square(counting, clean, x, y, norm, eps, p, b, seed)

        rows += repeated([run_sq, run_ta] if have_ta else [run_sq])
        if have_art:
            settings = [((b - 3) // 3, "equal forwards")]
            if not args.skip_art_equal_candidates:
                settings.append((b - 1, "equal candidates"))
            for max_iter, label in settings:
                log(f"Square {norm}: ART ({label})")
                rows.append(
                    run_art_square(
                        counting, clean, x, y, norm, eps, ours.p_init, max_iter, s, label
                    )
                )
    decision: tuple[tuple[str, Attack], ...] = (
        ("RayS", RayS(args.eps_linf)),
        ("SignFlip", SignFlip(args.eps_linf)),
    )
    for name, atk in decision:
        log(f"{name}: ours")

        def run_dec(seed: int, atk: Attack = atk, name: str = name) -> Row:
            return run_ours(atk, name, counting, clean, x, y, b, seed)

        rows += repeated([run_dec])
    if have_art:
        for which in ("HopSkipJump", "SignOPT"):
            if which in args.skip:
                continue
            log(f"{which}: ART")
            rows.append(run_art_decision(which, counting, clean, x, y, args.eps_linf, b, s))

    profiles: list[tuple[str, str]] = []
    if args.profile:
        done: set[int] = set()
        for o, p in _pairs(rows):
            if p.seconds / o.seconds >= SPEED_TARGET:
                continue
            for r in (o, p):
                if id(r) in rerun and id(r) not in done:
                    done.add(id(r))
                    log(f"profile: {r.attack} {r.norm} ({r.impl})")
                    profiles.append(
                        (f"{r.attack} {r.norm} ({r.impl})", profile_outside_model(rerun[id(r)]))
                    )
    return rows, notes, profiles


def _pairs(rows: list[Row]) -> list[tuple[Row, Row]]:
    """(ours, peer) pairs: Square with the same norm; decision attacks with each other."""
    pairs: list[tuple[Row, Row]] = []
    ours_rows = [o for o in rows if o.impl == "randfeat"]
    for r in rows:
        if r.impl == "randfeat":
            continue
        if r.attack == "Square":
            pairs += [(o, r) for o in ours_rows if o.attack == "Square" and o.norm == r.norm]
        else:
            pairs += [(o, r) for o in ours_rows if o.attack in ("RayS", "SignFlip")]
    return pairs


def _per_run_var(r: Row) -> float:
    """Variance of one run's robust accuracy: across runs when there are several, else binomial."""
    if len(r.judged) > 1:
        return statistics.variance(j.robust for j in r.judged)
    return r.robust * (1 - r.robust) / r.n


def strength(ours: Row, peer: Row) -> str:
    """``yes`` if ours leaves no more images robust; ``tie`` within 2 standard errors; else ``NO``.

    The standard error is that of the difference of the two mean robust accuracies, from the spread
    of the per-run values (the binomial one for a single run).
    """
    d = ours.robust - peer.robust
    if d <= 0:
        return "yes"
    se = math.sqrt(_per_run_var(ours) / len(ours.judged) + _per_run_var(peer) / len(peer.judged))
    if d <= 2 * se:
        return f"tie (Δ {d:+.3f}, SE {se:.3f})"
    return f"NO (Δ {d:+.3f}, SE {se:.3f})"


def _fmt_ra(r: Row) -> str:
    text = f"{r.robust:.3f} ± {r.se:.3f}"
    if len(r.judged) > 1:
        text += " (" + " / ".join(f"{j.robust:.2f}" for j in r.judged) + ")"
    return text


def markdown(rows: list[Row], notes: list[str], args: argparse.Namespace) -> str:
    lines = [
        f"Machine: {describe_machine()}; CPU shared with other jobs, timings are noisy. Digits CNN "
        f"(undefended), {args.n} correctly classified test images (class-balanced, seed "
        f"{args.seed}), budget {args.budget} real model forwards per image, ε ℓ∞ = {args.eps_linf}, "
        f"ε ℓ2 = {args.eps_l2}. Ours and torchattacks: {args.repeats} runs (seeds {args.seed}.."
        f"{args.seed + args.repeats - 1}, interleaved), mean robust accuracy (per-seed values in "
        "brackets), mean times per run (a run's time depends on when its last image falls, so the "
        "mean over runs is what a user pays on average); ART: one run (seed "
        f"{args.seed}). Robust accuracy: fraction of images whose returned point is not (inside "
        "the ε-ball and misclassified by the clean model), ± the standard error of one run over "
        "the images. Forwards: real model forwards per image, counted by a wrapper around the "
        "model, the peers' own book-keeping forwards included; the max is exact or, marked "
        "(code), read from the peer's code. In model: time inside the model's forward.",
        "",
        "| attack | implementation | setting | norm, ε | robust acc. | outside ball | "
        "median dist. | forwards/img mean | max | model calls | wall s | ms / call | in model s "
        "| outside model s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mx = f"{r.fwd_max:.0f}" + ("" if r.fwd_max_kind == "exact" else " (code)")
        lines.append(
            f"| {r.attack} | {r.impl} | {r.setting} | {r.norm} {r.eps:g} | {_fmt_ra(r)} | "
            f"{max(j.outside for j in r.judged)} | "
            f"{statistics.median(j.median_dist for j in r.judged):.3f} | "
            f"{r.fwd_mean:.0f} | {mx} | {statistics.median(r.calls):.0f} | {r.seconds:.2f} | "
            f"{r.per_call_ms:.2f} | {statistics.fmean(r.in_model):.2f} | {r.outside_model:.2f} |"
        )
    lines.append("")
    lines += [f"- {r.attack} ({r.impl}): {r.note}." for r in rows if r.note]
    lines += [f"- {n}" for n in notes]
    lines += [
        "- No implementation of RayS, SignFlip, NES or SignHunter exists in torchattacks 3.5.1 or "
        "ART 1.20: the decision attacks are compared with the closest peers, HopSkipJump (ℓ∞) "
        "and SignOPT (an ℓ2 minimiser, judged in ℓ∞ here). Both are minimum-norm attacks: they "
        "return their closest adversarial point, which counts only inside the ball.",
        "",
        f"Ours vs peer (targets: robust accuracy ours ≤ peer's, where a difference within 2 standard "
        "errors of the difference of the means (from the per-run spread) is a tie; ours ≥ "
        f"{SPEED_TARGET:g}× faster in wall time). Wall time is dominated by the slowest images: an attack loops until its "
        "last unfooled image has spent the budget, one model call per step, so ms / call (per "
        "step) and the outside-model time (the attack's own work) are given too. Ceiling: the "
        "peer's wall time over the time ours spends inside the model, i.e. the largest speed-up "
        "ours could show if its own work cost nothing (same forwards); where it is below "
        f"{SPEED_TARGET:g}, the target cannot be met by any implementation that makes these "
        "forwards:",
        "",
        "| ours | peer | robust acc. ours | peer | ours as strong | wall s ours | peer | "
        f"peer / ours | ≥ {SPEED_TARGET:g}× | ceiling | ms / call ours | peer | "
        "outside model s ours | peer | peer / ours | outside ms / call ours | peer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o, p in _pairs(rows):
        strong = strength(o, p)
        ratio = p.seconds / o.seconds
        out_ratio = p.outside_model / o.outside_model if o.outside_model > 0 else float("nan")
        ceiling = p.seconds / statistics.fmean(o.in_model)
        lines.append(
            f"| {o.attack} {o.norm} | {p.impl} {p.attack} ({p.setting.split(',')[0]}) | "
            f"{o.robust:.3f} | {p.robust:.3f} | {strong} | {o.seconds:.2f} | {p.seconds:.2f} | "
            f"{ratio:.2f} | {'yes' if ratio >= SPEED_TARGET else 'NO'} | {ceiling:.2f} | "
            f"{o.per_call_ms:.2f} | {p.per_call_ms:.2f} | {o.outside_model:.2f} | "
            f"{p.outside_model:.2f} | {out_ratio:.1f} | {o.outside_per_call_ms:.2f} | "
            f"{p.outside_per_call_ms:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="digits test images")
    p.add_argument("--budget", type=int, default=1000, help="forwards per image")
    p.add_argument("--eps-linf", type=float, default=0.2)
    p.add_argument("--eps-l2", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeats", type=int, default=10, help="seeds for ours and torchattacks (cheap)"
    )
    p.add_argument("--skip", nargs="*", default=[], help="peers to skip: HopSkipJump SignOPT")
    p.add_argument(
        "--skip-art-equal-candidates",
        action="store_true",
        help="skip the ART Square rows with as many candidates as ours (3x the forwards)",
    )
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: comparable timings)")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows, notes, profiles = compare(args)
    md = markdown(rows, notes, args)
    print("\n## Attacks vs peers\n\n" + md + "\n", flush=True)
    for title, text in profiles:
        print(f"### Profile of {title} on digits (cProfile, outside the model)\n")
        print(f"```\n{text}\n```\n", flush=True)
    if args.write:
        replace_section("Attacks vs peers", md)


if __name__ == "__main__":
    main()
