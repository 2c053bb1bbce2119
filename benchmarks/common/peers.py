"""Our attacks and their peers (torchattacks, ART) run alike, judged alike, in table rows.

Every implementation gets the model wrapped in `common.measure.Counting`, which counts the images that go
through real forwards (the peers' own book-keeping forwards included), so "budget" means the same
for all (ours run with `votes=1`: on a deterministic model a query decides, so forwards = queries).
The returned points of every implementation are judged alike by `judge`: an image counts as fooled
when the returned point lies inside the ε-ball (float64 check, tolerance `BALL_TOL`) and the clean
undefended model misclassifies it; robust accuracy is the fraction not fooled.

How each peer is held to the budget `B` (forwards per image, read from the installed code):

* torchattacks `Square`: a clean forward, the init point, `n_queries` iterations and a final
  check: `n_queries + 3` forwards at most. `n_queries = B` (it also makes its `p` schedule
  identical to ours), so it may spend 3 forwards more than ours.
* ART `SquareAttack`: every iteration predicts all current points (to find the unfooled ones),
  then evaluates the loss at the current best and at the candidate: 3 forwards per iteration per
  unfooled image, 3 more for the init. `max_iter = (B - 3) // 3` spends at most `B`; a second row
  with `max_iter = B - 1` gives it as many *candidates* as ours (about `3B` forwards).
* ART `HopSkipJump` and `SignOPTAttack` have no query budget (HSJ) or check it only after a whole
  iteration (SignOPT, and not during the init search), and run image by image. We set `max_iter`
  (HSJ) / `query_limit` (SignOPT) from the per-iteration costs in the code (`hsj_max_iter` and
  `signopt_settings`), count forwards per image exactly (a subclass marks where each image
  starts), and if any image still spent more than `B` the setting is lowered and the whole run
  repeated; the table gives the setting that fit and the attempts.
"""

from __future__ import annotations

import math
import random
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from randfeat.eval.attacks.base import Attack
from randfeat.eval.oracle import Norm, distance

from .measure import Counting, log, timed

__all__ = [
    "BALL_TOL",
    "Judged",
    "Row",
    "hsj_max_iter",
    "judge",
    "run_art_decision",
    "run_art_square",
    "run_ours",
    "run_torchattacks_square",
    "signopt_settings",
]

BALL_TOL = 1e-6
"""Absolute slack of the ε-ball check (float32 rounding of `x0 ± ε` is ~6e-8 near 1)."""


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
    res, sec = timed(lambda: attack.run(counting, x, y, budget=budget, votes=1, seed=seed))
    per = (res.queries + res.verify_forwards).double()
    if int(per.sum()) != counting.rows:  # every forward goes through the oracle
        raise RuntimeError(f"{name}: oracle counted {int(per.sum())}, model saw {counting.rows}")
    j = judge(clean, x, y, res.x_adv, attack.norm, attack.eps)
    verified = float(res.success.double().mean())
    if abs((1.0 - j.robust) - verified) > 1e-9:
        # a returned last iterate can be adversarial without ever having been queried
        log(f"{name} {attack.norm}: judged fooled {1 - j.robust:.3f}, verified {verified:.3f}")
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
    x_adv, sec = timed(lambda: atk(x, y))
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
        x_adv, sec = timed(lambda: atk.generate(xn, yn))
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
    x_adv, sec = timed(lambda: atk.generate(xn, yn))
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
        log(f"{which}: {attempts[-1]}")
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
