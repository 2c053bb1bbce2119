"""Our attacks against peer implementations, and attack cost against pure query cost, in one run.

Part 1 ("Attacks vs peers"): on the digits CNN (undefended), the same ``--n`` correctly classified
test images (a class-balanced draw), the same per-image budget of *real model forwards*, and the
same seed where the peer takes one:

* our ``Square`` (ℓ∞ ε=0.2, ℓ2 ε=1.5) against ``torchattacks.Square`` (``n_queries=budget``, our
  ``p_init``, margin loss, one restart) and ART's ``SquareAttack``;
* our decision attacks ``RayS`` and ``SignFlip`` (ℓ∞ ε=0.2) against the closest decision-based peers
  that exist on PyPI, ART's ``HopSkipJump`` (ℓ∞) and ``SignOPTAttack`` (ℓ2 by design). Neither
  torchattacks 3.5.1 nor ART 1.20 ships RayS, SignFlip, NES or SignHunter.

Every implementation gets the model wrapped in :class:`Counting`, which counts the images that go
through real forwards (the peers' own book-keeping forwards included), so "budget" means the same for
all (ours run with ``votes=1``: on a deterministic model a query decides, so forwards = queries).
The returned points of every implementation are judged alike: an image counts as fooled when
the returned point lies inside the ε-ball (float64 check, tolerance :data:`BALL_TOL`) and the clean
undefended model misclassifies it; robust accuracy is the fraction not fooled. Ours and
torchattacks (cheap) run ``--repeats`` seeds, interleaved; ART runs once (slow, and HopSkipJump's
init draws from an unseeded ``RandomState``). The wrapper also times the model, so the wall time
splits into time in the model and the attack's own work; where ours misses the 2× speed target,
ours (and torchattacks) are profiled (cProfile, the model's share removed) and the profile printed.

How each peer is held to the budget ``B`` (forwards per image, read from the installed code):

* torchattacks ``Square``: a clean forward, the init point, ``n_queries`` iterations and a final
  check: ``n_queries + 3`` forwards at most. ``n_queries = B`` (the brief; it also makes its ``p``
  schedule identical to ours), so it may spend 3 forwards more than ours.
* ART ``SquareAttack``: every iteration predicts all current points (to find the unfooled ones),
  then evaluates the loss at the current best and at the candidate: 3 forwards per iteration per
  unfooled image, 3 more for the init. ``max_iter = (B - 3) // 3`` spends at most ``B``; a second row
  with ``max_iter = B - 1`` gives it as many *candidates* as ours (about ``3B`` forwards).
* ART ``HopSkipJump`` and ``SignOPTAttack`` have no query budget (HSJ) or check it only after a whole
  iteration (SignOPT, and not during the init search), and run image by image. We set ``max_iter``
  (HSJ) / ``query_limit`` (SignOPT) from the per-iteration costs in the code (comments at
  :func:`hsj_max_iter` and :func:`signopt_settings`), count forwards per image exactly (a subclass
  marks where each image starts), and if any image still spent more than ``B`` the setting is
  lowered and the whole run repeated; the table gives the setting that fit and the attempts.

Part 2 ("Attack cost vs pure query cost"): on a timm ``resnet18`` (``pretrained=False``, 10
classes) at ``--qc-size``² pixels, with labels = the model's own predictions, every attack of ours
is timed against the cost of its forwards at full-batch efficiency: ``t_batch`` is the median time
of one forward of the whole batch of ``--qc-n`` images, and the pure cost is
``(forwards / N) · t_batch``, counting queries and verification forwards. The target is a ratio
``wall / pure <= 1.15``. Attacks run with ``batch_size = N``, so no model call holds more images
than the ``t_batch`` forward. The table splits the wall time into time inside the model and
outside, counts model calls with fewer than N images (less efficient), and gives ``t_batch`` as
measured on the attack's own full-batch forwards (same load). For attacks that miss the target
the script profiles a second run (cProfile, the model's share removed) and prints where the time
outside the model goes.

All timings use ``--threads`` torch threads (default 1; run with ``OMP_NUM_THREADS=1``). The
script seeds numpy's and Python's global generators before each ART run and torch's before
creating the resnet18 (the peers and timm draw from them); our attacks use their own generators.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/attacks.py                 # full run (~9 min on 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/attacks.py --n 20 --budget 200 --qc-n 8 --qc-budget 40
    OMP_NUM_THREADS=1 python benchmarks/attacks.py --write         # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import math
import pstats
import random
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from _machine import describe_machine, replace_section
from torch import Tensor, nn

from randfeat.eval.attacks import NES, RayS, SignFlip, Square
from randfeat.eval.attacks.base import Attack
from randfeat.eval.attacks.eot import EOT
from randfeat.eval.data import balanced_subset, digits
from randfeat.eval.models import digits_cnn
from randfeat.eval.oracle import Norm, distance

try:  # SignHunter may not be exported yet while it is being written
    from randfeat.eval.attacks.signhunter import SignHunter
except ImportError:  # pragma: no cover - depends on the state of the tree
    SignHunter = None  # type: ignore[assignment,misc]

BALL_TOL = 1e-6
"""Absolute slack of the ε-ball check (float32 rounding of ``x0 ± ε`` is ~6e-8 near 1)."""
OVERHEAD_TARGET = 1.15
SPEED_TARGET = 2.0


# ---------------------------------------------------------------------------------------- counting
class Counting(nn.Module):
    """Wrap a model; count the images sent through real forwards and the time spent inside it.

    ``rows`` counts every image of every forward; inputs are cast to float32 (the models here are
    float32; ART's HopSkipJump sends float64). Forwards made while :meth:`image` is open are
    also charged to that image (``per_image``); the others are batch forwards (``shared``).
    ``full_times`` holds the time of every forward of exactly ``full`` images (when set), and
    ``strided`` counts inputs that were not contiguous.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.reset(0)

    def reset(self, n: int) -> None:
        self.rows = 0
        self.calls = 0
        self.seconds = 0.0
        self.shared = 0
        self.per_image = [0] * n
        self.current: int | None = None
        self._next = 0
        self.full: int | None = None
        self.full_times: list[float] = []
        self.strided = 0

    @contextlib.contextmanager
    def image(self) -> Iterator[None]:
        """Charge the forwards inside the block to the next image (sequential attacks)."""
        self.current = self._next
        self._next += 1
        try:
            yield
        finally:
            self.current = None

    def forward(self, x: Tensor) -> Tensor:
        t0 = time.perf_counter()
        if x.dtype != torch.float32:  # ART's HopSkipJump interpolates in float64
            x = x.float()
        out = self.model(x)
        dt = time.perf_counter() - t0
        self.seconds += dt
        n = int(x.shape[0])
        if n == self.full:
            self.full_times.append(dt)
        if not x.is_contiguous():
            self.strided += 1
        self.rows += n
        self.calls += 1
        if self.current is None:
            self.shared += n
        else:
            self.per_image[self.current] += n
        return out


# ---------------------------------------------------------------------------------------- judging
@dataclass
class Judged:
    robust: float  # fraction not fooled inside the ball
    outside: int  # returned points outside the ε-ball (never counted as fooled)
    median_dist: float  # median distance of the returned points in the threat norm


def judge(model: nn.Module, x0: Tensor, y: Tensor, x_adv: Tensor, norm: Norm, eps: float) -> Judged:
    """Judge returned points with the clean model, the same way for every implementation."""
    x_adv = x_adv.to(x0.dtype)
    d = distance(x_adv, x0, norm)
    in_range = ((x_adv >= 0) & (x_adv <= 1)).flatten(1).all(dim=1)
    inside = (d <= eps + BALL_TOL) & in_range
    with torch.no_grad():
        wrong = model(x_adv).argmax(dim=1) != y
    p = 1.0 - float((inside & wrong).double().mean())
    return Judged(p, int((~inside).sum()), float(d.median()))


@dataclass
class Row:
    """One implementation on one threat model; lists hold one entry per run (seed)."""

    attack: str
    impl: str
    setting: str
    norm: Norm
    eps: float
    n: int
    judged: list[Judged]
    wall: list[float]
    in_model: list[float]
    calls: list[int]
    fwd_mean: float
    fwd_max: float
    fwd_max_kind: str = "exact"
    note: str = ""

    @property
    def robust(self) -> float:
        return statistics.fmean(j.robust for j in self.judged)

    @property
    def se(self) -> float:
        """Standard error of one run's robust accuracy over the ``n`` images."""
        p = self.robust
        return math.sqrt(p * (1 - p) / self.n)

    @property
    def seconds(self) -> float:
        return statistics.fmean(self.wall)

    @property
    def per_call_ms(self) -> float:
        """Median wall time per model call (per iteration for one-call-per-step attacks)."""
        return 1000 * sum(self.wall) / sum(self.calls)

    @property
    def outside_model(self) -> float:
        return statistics.fmean(w - m for w, m in zip(self.wall, self.in_model, strict=True))

    @property
    def outside_per_call_ms(self) -> float:
        """Median time outside the model per model call (the attack's own work per step)."""
        return 1000 * (sum(self.wall) - sum(self.in_model)) / sum(self.calls)

    def merge(self, other: Row) -> Row:
        self.judged += other.judged
        self.wall += other.wall
        self.in_model += other.in_model
        self.calls += other.calls
        k = len(self.judged)
        self.fwd_mean = ((k - 1) * self.fwd_mean + other.fwd_mean) / k
        self.fwd_max = max(self.fwd_max, other.fwd_max)
        return self


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _seed_numpy(seed: int) -> None:
    # ART draws from numpy's and Python's global generators; this script (not library code) seeds
    # them so the peers are as reproducible as they allow (HopSkipJump's init is unseedable).
    np.random.seed(seed)
    random.seed(seed)


# ---------------------------------------------------------------------------------------- ours
def run_ours(
    attack: Attack,
    name: str,
    counting: Counting,
    clean: nn.Module,
    x: Tensor,
    y: Tensor,
    budget: int,
    seed: int,
) -> Row:
    n = x.shape[0]
    counting.reset(n)
    res, sec = _timed(lambda: attack.run(counting, x, y, budget=budget, votes=1, seed=seed))
    per = (res.queries + res.verify_forwards).double()
    if int(per.sum()) != counting.rows:  # every forward goes through the oracle
        raise RuntimeError(f"{name}: oracle counted {int(per.sum())}, model saw {counting.rows}")
    j = judge(clean, x, y, res.x_adv, attack.norm, attack.eps)
    verified = float(res.success.double().mean())
    if abs((1.0 - j.robust) - verified) > 1e-9:
        # a returned last iterate can be adversarial without ever having been queried
        _log(f"{name} {attack.norm}: judged fooled {1 - j.robust:.3f}, verified {verified:.3f}")
    return Row(
        name,
        "randfeat",
        f"budget {budget}, votes 1",
        attack.norm,
        attack.eps,
        n,
        [j],
        [sec],
        [counting.seconds],
        [counting.calls],
        float(per.mean()),
        float(per.max()),
    )


# ---------------------------------------------------------------------------------------- peers
def run_torchattacks_square(
    counting: Counting,
    clean: nn.Module,
    x: Tensor,
    y: Tensor,
    norm: Norm,
    eps: float,
    p_init: float,
    budget: int,
    seed: int,
) -> Row:
    import torchattacks

    n = x.shape[0]
    atk = torchattacks.Square(
        counting,
        norm="Linf" if norm == "linf" else "L2",
        eps=eps,
        n_queries=budget,
        n_restarts=1,
        p_init=p_init,
        loss="margin",
        resc_schedule=True,
        seed=seed,
        verbose=False,
    )
    counting.reset(n)
    x_adv, sec = _timed(lambda: atk(x, y))
    return Row(
        "Square",
        f"torchattacks {torchattacks.__version__}",
        f"n_queries {budget}, p_init {p_init}",
        norm,
        eps,
        n,
        [judge(clean, x, y, x_adv, norm, eps)],
        [sec],
        [counting.seconds],
        [counting.calls],
        counting.rows / n,
        budget + 3,
        "code",
    )


def _art_classifier(counting: Counting, shape: tuple[int, ...], classes: int) -> Any:
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=counting,
        loss=nn.CrossEntropyLoss(),
        input_shape=shape,
        nb_classes=classes,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )


def _art_version() -> str:
    import art

    return f"ART {art.__version__}"


def run_art_square(
    counting: Counting,
    clean: nn.Module,
    x: Tensor,
    y: Tensor,
    norm: Norm,
    eps: float,
    p_init: float,
    max_iter: int,
    seed: int,
    label: str,
) -> Row:
    from art.attacks.evasion import SquareAttack

    n = x.shape[0]
    clf = _art_classifier(counting, tuple(x.shape[1:]), 10)
    atk = SquareAttack(
        clf,
        norm=np.inf if norm == "linf" else 2,
        max_iter=max_iter,
        eps=eps,
        p_init=p_init,
        nb_restarts=1,
        batch_size=max(n, 1),
        verbose=False,
    )
    xn, yn = x.numpy(), y.numpy()
    _seed_numpy(seed)
    counting.reset(n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # ℓ2 init on 8×8: 0/0 in a 1×1 tile
        x_adv, sec = _timed(lambda: atk.generate(xn, yn))
    return Row(
        "Square",
        _art_version(),
        f"max_iter {max_iter} ({label}), p_init {p_init}",
        norm,
        eps,
        n,
        [judge(clean, x, y, torch.from_numpy(x_adv), norm, eps)],
        [sec],
        [counting.seconds],
        [counting.calls],
        counting.rows / n,
        3 + 3 * max_iter,
        "code",
    )


def hsj_max_iter(budget: int, dim: int, init_eval: int, max_eval: int) -> int:
    """Largest HopSkipJump ``max_iter`` whose forwards per image (read from ART's code) fit.

    Per image: 1 clean prediction and 2 in ``compute_success`` (batch forwards); the init draws
    uniform images until one is misclassified (we reserve 5) and bisects in ℓ2 to 0.001 (10); every
    iteration ``t`` bisects in ℓ∞ to ``theta = 0.01 / d`` (``ceil(log2(1 / theta))`` + 1 steps),
    estimates the gradient with ``min(init_eval sqrt(t + 1), max_eval)`` points and runs a geometric
    step search (we reserve 3).
    """
    steps = math.ceil(math.log2(dim / 0.01)) + 1
    cost, t = 3 + 5 + 10, 0
    while True:
        c = steps + min(int(init_eval * math.sqrt(t + 1)), max_eval) + 3
        if cost + c > budget:
            return t
        cost += c
        t += 1


def signopt_settings(budget: int) -> dict[str, int]:
    """SignOPT settings for ``budget`` forwards per image (ART's SignOPT counts them its own way).

    ART's defaults (``num_trial = 100`` initial directions, ``k = 200`` gradient queries) are meant
    for 20,000 queries: the init search alone (a query per direction, plus a bisection of ~13
    queries for each direction that beats the best so far) spends several hundred. We scale them,
    ``num_trial = clip(B / 100, 1, 100)`` and ``k = min(200, B / 5)``, and stop early: ART counts
    the init and every iteration (``k`` + a line search) and stops once its count exceeds
    ``query_limit`` after a whole iteration, and 3 forwards per image (the clean prediction and
    ``compute_success``) are not in its count, so ``query_limit = B - 3 - k - 60`` (60: a generous
    line search).
    """
    k = max(1, min(200, budget // 5))
    return {
        "num_trial": max(1, min(100, budget // 100)),
        "k": k,
        "query_limit": max(1, budget - 3 - k - 60),
    }


def _make_hsj_class() -> Any:
    from art.attacks.evasion import HopSkipJump

    class CountedHSJ(HopSkipJump):  # type: ignore[misc]
        """ART's HopSkipJump, marking where each image's forwards start (for exact counts)."""

        counting: Counting

        def _perturb(self, *args: Any, **kwargs: Any) -> Any:
            with self.counting.image():
                return super()._perturb(*args, **kwargs)

    return CountedHSJ


def _make_signopt_class() -> Any:
    from art.attacks.evasion import SignOPTAttack

    class CountedSignOPT(SignOPTAttack):  # type: ignore[misc]
        """ART's SignOPTAttack, marking where each image's forwards start (for exact counts).

        Also records each image's forwards when its first gradient estimate starts (init cost).
        """

        counting: Counting
        init_cost: list[int]

        def _attack(self, *args: Any, **kwargs: Any) -> Any:
            with self.counting.image():
                self._init_seen = False
                return super()._attack(*args, **kwargs)

        def _sign_grad(self, *args: Any, **kwargs: Any) -> Any:
            if not self._init_seen and self.counting.current is not None:
                self._init_seen = True
                self.init_cost.append(self.counting.per_image[self.counting.current])
            return super()._sign_grad(*args, **kwargs)

    return CountedSignOPT


def _run_art_sequential(
    make: Callable[[Any], Any],
    counting: Counting,
    x: Tensor,
    y: Tensor,
    seed: int,
) -> tuple[Tensor, float, list[float], Any]:
    n = x.shape[0]
    clf = _art_classifier(counting, tuple(x.shape[1:]), 10)
    atk = make(clf)
    atk.counting = counting
    atk.init_cost = []
    xn, yn = x.numpy(), y.numpy()
    _seed_numpy(seed)
    counting.reset(n)
    x_adv, sec = _timed(lambda: atk.generate(xn, yn))
    per = [c + counting.shared / n for c in counting.per_image]
    return torch.from_numpy(x_adv), sec, per, atk


def run_art_decision(
    which: str,
    counting: Counting,
    clean: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    budget: int,
    seed: int,
    tries: int = 6,
) -> Row:
    """HopSkipJump (ℓ∞) or SignOPT, lowered and rerun until no image spends more than ``budget``.

    The first setting comes from :func:`hsj_max_iter` / :func:`signopt_settings`; while an image
    spent more than ``budget`` forwards, HSJ's ``max_iter`` drops by one, SignOPT's ``query_limit``
    by the excess (then ``num_trial``, then ``k``, halve), and the whole run is repeated.
    """
    dim = int(x[0].numel())
    if which == "HopSkipJump":
        cls = _make_hsj_class()
        # ART defaults (the HSJ paper's) except max_iter; one batch for a gradient estimate
        cfg = {"max_iter": 0, "init_eval": 100, "max_eval": 10000, "init_size": 100}
        cfg["max_iter"] = hsj_max_iter(budget, dim, cfg["init_eval"], cfg["max_eval"])

        def make(clf: Any) -> Any:
            return cls(clf, norm=np.inf, batch_size=1024, verbose=False, **cfg)

        def describe() -> str:
            return f"max_iter {cfg['max_iter']}, init_eval {cfg['init_eval']}, ℓ∞"

        def shrink(worst: float) -> bool:
            if cfg["max_iter"] == 0:
                return False
            cfg["max_iter"] -= 1
            return True
    else:
        cls = _make_signopt_class()
        cfg = signopt_settings(budget)

        def make(clf: Any) -> Any:
            return cls(clf, targeted=False, max_iter=1000, batch_size=1024, verbose=False, **cfg)

        def describe() -> str:
            return (
                f"query_limit {cfg['query_limit']}, k {cfg['k']}, num_trial {cfg['num_trial']}, "
                "ℓ2 minimiser"
            )

        def shrink(worst: float) -> bool:
            if cfg["query_limit"] > 1:
                cfg["query_limit"] = max(1, cfg["query_limit"] - math.ceil(worst - budget))
            elif cfg["num_trial"] > 1:
                cfg["num_trial"] //= 2
            elif cfg["k"] > 1:
                cfg["k"] //= 2
            else:
                return False
            return True

    attempts: list[str] = []
    while True:
        x_adv, sec, per, atk = _run_art_sequential(make, counting, x, y, seed)
        worst = max(per)
        j = judge(clean, x, y, x_adv, "linf", eps)
        attempts.append(
            f"{describe().split(',')[0]}: max {worst:.0f} / mean {statistics.fmean(per):.0f} "
            f"forwards, robust acc. {j.robust:.2f}"
        )
        _log(f"{which}: {attempts[-1]}")
        if worst <= budget or len(attempts) >= tries or not shrink(worst):
            break
    note = f"{len(attempts)} run(s) to fit the budget"
    if len(attempts) > 1:
        note += " (discarded: " + "; ".join(attempts[:-1]) + ")"
    if atk.init_cost:
        note += f"; init search: {statistics.fmean(atk.init_cost):.0f} forwards/img on average"
    if worst > budget:
        note += f"; STILL over budget on {sum(p > budget for p in per)} image(s)"
    return Row(
        which,
        _art_version(),
        describe(),
        "linf",
        eps,
        x.shape[0],
        [j],
        [sec],
        [counting.seconds],
        [counting.calls],
        statistics.fmean(per),
        worst,
        "exact",
        note,
    )


# ---------------------------------------------------------------------------------------- part 1
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


def part1(args: argparse.Namespace) -> tuple[list[Row], list[str], list[tuple[str, str]]]:
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
        _log(f"Square {norm}: ours" + (" and torchattacks" if have_ta else ""))

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
                _log(f"Square {norm}: ART ({label})")
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
        _log(f"{name}: ours")

        def run_dec(seed: int, atk: Attack = atk, name: str = name) -> Row:
            return run_ours(atk, name, counting, clean, x, y, b, seed)

        rows += repeated([run_dec])
    if have_art:
        for which in ("HopSkipJump", "SignOPT"):
            if which in args.skip:
                continue
            _log(f"{which}: ART")
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
                    _log(f"profile: {r.attack} {r.norm} ({r.impl})")
                    profiles.append((f"{r.attack} {r.norm} ({r.impl})", _profile(rerun[id(r)])))
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


def part1_markdown(rows: list[Row], notes: list[str], args: argparse.Namespace) -> str:
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


# ---------------------------------------------------------------------------------------- part 2
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


def _forward_times(model: nn.Module, x: Tensor, reps: int) -> list[float]:
    ts = []
    with torch.no_grad():
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x)
            ts.append(time.perf_counter() - t0)
    return ts


def cost_attacks(args: argparse.Namespace) -> list[tuple[str, Attack]]:
    li, l2 = args.qc_eps_linf, args.qc_eps_l2
    out: list[tuple[str, Attack]] = [
        ("Square ℓ∞", Square(li, "linf")),
        ("Square ℓ2", Square(l2, "l2")),
        ("NES ℓ∞", NES(li, "linf")),
        ("NES ℓ2", NES(l2, "l2")),
    ]
    if SignHunter is not None:
        out += [("SignHunter ℓ∞", SignHunter(li, "linf")), ("SignHunter ℓ2", SignHunter(l2, "l2"))]
    out += [
        (f"EOT(Square ℓ∞, m={args.qc_eot_m})", EOT(Square(li, "linf"), args.qc_eot_m)),
        ("RayS ℓ∞", RayS(li)),
        ("SignFlip ℓ∞", SignFlip(li)),
    ]
    return out


def part2(args: argparse.Namespace) -> list[CostRow]:
    import timm

    torch.manual_seed(args.seed)  # script only: timm initialises from the global RNG
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    counting = Counting(model).eval()
    g = torch.Generator().manual_seed(args.seed)
    n, size = args.qc_n, args.qc_size
    x = torch.rand(n, 3, size, size, generator=g)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    _forward_times(model, x, 3)  # warm up
    rows = []
    for name, atk in cost_attacks(args):
        if any(s.lower() in name.lower() for s in args.qc_skip):
            continue
        _log(f"cost: {name}")

        def run(atk: Attack = atk) -> Any:
            # batch_size = N: no model call holds more images than the t_batch forward
            return atk.run(counting, x, y, budget=args.qc_budget, seed=args.seed, batch_size=n)

        times, walls, in_model, during = [], [], [], []
        for _ in range(args.qc_repeats):
            times += _forward_times(model, x, args.qc_reps)
            counting.reset(n)
            counting.full = n
            res, wall = _timed(run)
            walls.append(wall)
            in_model.append(counting.seconds)
            during += counting.full_times
        times += _forward_times(model, x, args.qc_reps)
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
        _log(f"cost: {name}: wall / pure {row.ratio:.2f}")
        if row.ratio > OVERHEAD_TARGET and args.profile:
            row.profile = _profile(run)
        rows.append(row)
    return rows


_MODEL_FILES = ("/torch/nn/", "/timm/")


def _is_model(func: tuple[str, int, str]) -> bool:
    """Whether a profiled function belongs to the model (torch.nn / timm, or Counting.forward)."""
    fname, _, name = func
    if any(k in fname for k in _MODEL_FILES):
        return True
    return fname == __file__ and name == "forward"


def _short(func: tuple[str, int, str]) -> str:
    fname, line, name = func
    if fname == "~":
        return name.strip("<>").replace("built-in method ", "").replace("method ", ".")
    return f"{fname.rsplit('/', 1)[-1]}:{line}({name})"


def _profile(fn: Callable[[], Any], top: int = 18) -> str:
    """cProfile ``fn`` and list where the time *outside the model* goes.

    Every function's own time is attributed to its callers (cProfile records that split); time
    of model functions, and of anything a model function calls (e.g. ``torch.conv2d`` from
    ``conv.py``), is dropped. Built-ins are listed with the caller they were called from.
    """
    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    spent: dict[str, list[float]] = {}
    model = 0.0
    for func, (_, _, tt, _, callers) in stats.items():
        if _is_model(func):
            model += tt
            continue
        parts = callers.items() if callers else [(None, (0, 0, tt, 0))]
        for caller, (_, nc, ctt, _) in parts:
            if caller is not None and _is_model(caller):
                model += ctt
                continue
            key = _short(func)
            if func[0] == "~" and caller is not None:
                key += f" ← {_short(caller)}"
            acc = spent.setdefault(key, [0.0, 0.0])
            acc[0] += ctt
            acc[1] += nc
    outside = sum(v[0] for v in spent.values())
    lines = [
        f"profiled run: wall {wall:.2f} s (with profiler overhead); model {model:.2f} s; "
        f"outside the model {outside:.2f} s, of which:",
        f"{'own s':>8} {'calls':>8}  function (← caller for built-ins)",
    ]
    for key, (tt, nc) in sorted(spent.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{tt:8.3f} {int(nc):8d}  {key}")
    return "\n".join(lines)


def _num(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.2f}"


def part2_markdown(rows: list[CostRow], args: argparse.Namespace) -> str:
    lines = [
        f"Machine: {describe_machine()}; CPU shared with other jobs, timings are noisy. timm "
        f"resnet18 (pretrained=False, 10 classes), {args.qc_n} random {args.qc_size}×"
        f"{args.qc_size} images labelled by the model's own predictions, budget {args.qc_budget} "
        f"queries, ε ℓ∞ = {args.qc_eps_linf:.4g}, ε ℓ2 = {args.qc_eps_l2:g} (small, so that the "
        f"attacks spend their budget), votes 9, batch_size = {args.qc_n}. t_batch: median time "
        f"of one forward of the {args.qc_n} images ({args.qc_reps} forwards before and after "
        "each run), per image. Pure cost = forwards (queries + verification) × t_batch. In model: "
        "time inside the model's forward during the attack; outside = wall − in model (the "
        "attack's own work: candidates, oracle checks). Wall/in-model are medians of "
        f"{args.qc_repeats} run(s). Target: wall / pure ≤ {OVERHEAD_TARGET}.",
        "",
        "| attack | success | forwards/img | model calls | t_batch ms/img | pure s | wall s | "
        "in model s | outside s | in model / pure | outside / pure | wall / pure | ≤ target | "
        "t_batch in attack ms/img | wall / pure (in-attack t_batch) | partial calls | "
        "strided inputs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.success:.2f} | {r.forwards / args.qc_n:.1f} | {r.calls} | "
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
        f"{max(1, args.qc_n // args.qc_eot_m) * args.qc_eot_m} rows here). "
        "Ratios at or below 1 come from forwards that ran faster than the separate t_batch "
        "measurement.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main
def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="digits test images (part 1)")
    p.add_argument("--budget", type=int, default=1000, help="forwards per image (part 1)")
    p.add_argument("--eps-linf", type=float, default=0.2)
    p.add_argument("--eps-l2", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeats", type=int, default=10, help="seeds for ours and torchattacks (cheap) in part 1"
    )
    p.add_argument("--skip", nargs="*", default=[], help="peers to skip: HopSkipJump SignOPT")
    p.add_argument(
        "--skip-art-equal-candidates",
        action="store_true",
        help="skip the ART Square rows with as many candidates as ours (3x the forwards)",
    )
    p.add_argument("--qc-n", type=int, default=32, help="images (part 2)")
    p.add_argument("--qc-budget", type=int, default=200, help="queries per image (part 2)")
    p.add_argument("--qc-size", type=int, default=32, help="image side (part 2)")
    p.add_argument("--qc-eps-linf", type=float, default=1 / 255)
    p.add_argument("--qc-eps-l2", type=float, default=0.1)
    p.add_argument("--qc-eot-m", type=int, default=5)
    p.add_argument("--qc-reps", type=int, default=10, help="t_batch forwards before/after each")
    p.add_argument("--qc-repeats", type=int, default=3, help="runs per attack (median)")
    p.add_argument("--qc-skip", nargs="*", default=[], help="part-2 attacks to skip (substring)")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--only", choices=["peers", "cost"], default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: comparable timings)")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.only in (None, "peers"):
        rows, notes, profiles = part1(args)
        md = part1_markdown(rows, notes, args)
        print("\n## Attacks vs peers\n\n" + md + "\n", flush=True)
        for title, text in profiles:
            print(f"### Profile of {title} on digits (cProfile, outside the model)\n")
            print(f"```\n{text}\n```\n", flush=True)
        if args.write:
            replace_section("Attacks vs peers", md)
    if args.only in (None, "cost"):
        crow = part2(args)
        md = part2_markdown(crow, args)
        print("\n## Attack cost vs pure query cost\n\n" + md + "\n", flush=True)
        for r in crow:
            if r.profile:
                print(
                    f"### Profile of {r.name} (cProfile, outside the model)\n\n```\n{r.profile}\n```\n"
                )
        if args.write:
            replace_section("Attack cost vs pure query cost", md)


if __name__ == "__main__":
    main()
