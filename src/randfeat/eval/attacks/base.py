"""The shared run contract of every attack: validation, the oracle, projection, seeding.

Each attack subclasses `Attack`, takes its hyperparameters in `__init__` and implements
`_attack(oracle, generator) -> x_last`. Everything an attack learns about the model comes from the
`Oracle`; query counting, budgets and the success rule live there, never
in the attack.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from randfeat.checks import (
    check_batch,
    check_choice,
    check_labels,
    check_positive_float,
    check_positive_int,
    check_seed,
)
from randfeat.eval.errors import QueryRefused
from randfeat.eval.oracle import Model, Norm, Oracle, Output, distance
from randfeat.eval.outcome import AttackResult

__all__ = [
    "Attack",
    "FarthestInBall",
    "OracleAttack",
    "linf_bounds",
    "make_generator",
    "project",
    "validate_inputs",
]


def make_generator(seed: int | torch.Generator | None, device: torch.device) -> torch.Generator:
    """A generator on `device`: seeded by `seed`, or from OS entropy when `seed` is None."""
    if isinstance(seed, torch.Generator):
        return seed
    seed = check_seed(seed)
    g = torch.Generator(device=device)
    g.manual_seed(secrets.randbits(63) if seed is None else seed)
    return g


def _shrink_toward(bound: Tensor, x0: Tensor, eps: float) -> Tensor:
    """Move `bound` one ulp toward `x0` wherever rounding put it beyond `eps` (float64 check)."""
    over = (bound.double() - x0.double()).abs() > eps
    if bool(over.any()):
        bound = torch.where(over, torch.nextafter(bound, x0), bound)
    return bound


def linf_bounds(x0: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """`(lo, hi)`: the box `B_∞(x0, ε) ∩ [0, 1]`, exact in float64, in `x0`'s dtype.

    `x.clamp(lo, hi)` is the ℓ∞ `project` of `x`; an attack that projects many times
    around the same `x0` computes the bounds once.

    Raises:
        ValueError / TypeError: `eps` is not a finite float > 0.
    """
    eps = check_positive_float(eps, "eps")
    # bounds rounded from float64 overshoot by at most half an ulp, which one nudge undoes
    lo = _shrink_toward((x0.double() - eps).to(x0.dtype), x0, eps).clamp_min(0.0)
    hi = _shrink_toward((x0.double() + eps).to(x0.dtype), x0, eps).clamp_max(1.0)
    return lo, hi


def project(x: Tensor, x0: Tensor, eps: float, norm: Norm) -> Tensor:
    """Project `x` onto the ε-ball around `x0` intersected with `[0, 1]`, exactly.

    The result satisfies `distance(out, x0, norm) <= eps` when checked in float64, in `x`'s dtype.
    """
    if norm == "linf":
        lo, hi = linf_bounds(x0, eps)
        return x.clamp(lo, hi)
    # ℓ2: scale δ in float64, round to the dtype, and shrink the samples whose rounding overshot
    # (by a few ulps of the dtype, doubling) until every one is inside the ball.
    x0d = x0.double()
    delta = x.double() - x0d
    norm0 = delta.flatten(1).norm(dim=1)
    shape = (-1,) + (1,) * (x.ndim - 1)
    step = 4 * torch.finfo(x.dtype).eps
    shrink = torch.full_like(
        norm0, step
    )  # pre-shrunk by a few ulps: one pass is almost always enough
    out = x
    for _ in range(40):
        factor = (eps / norm0.clamp_min(1e-300) * (1 - shrink)).clamp(max=1.0)
        out = (x0d + delta * factor.view(shape)).clamp(0.0, 1.0).to(x.dtype)
        over = distance(out, x0, "l2") > eps
        if not bool(over.any()):
            return out
        shrink = torch.where(over, 2 * shrink, shrink)
    return torch.where(over.view(shape), x0, out)  # unreachable in practice: fall back to x0


class FarthestInBall:
    """Per sample, the queried point inside the ε-ball that lies farthest from `x0`.

    A decision attack's iterate is misclassified but usually outside the ball; for a sample it
    does not fool, it returns the most perturbed point it actually queried inside the ball (the
    one its search brought closest to the boundary), so that the returned point's label was seen
    by the attack: on a deterministic model, judging it afresh gives what the query gave. `x0`
    itself while no query fell inside the ball. The ball test is the oracle's (float64 distance
    `<= eps`); a cheap test in the points' dtype screens out the points far outside first.

    Args:
        x0: `[N, ...]` clean images.
        eps: the radius.
        norm: `"linf"` or `"l2"`.
    """

    def __init__(self, x0: Tensor, eps: float, norm: Norm) -> None:
        self.x0, self.eps, self.norm = x0, eps, norm
        self.best = x0.clone()
        self.dist = torch.full((x0.shape[0],), -1.0, dtype=torch.float64, device=x0.device)
        self._screen = eps * (1 + 1e-3)  # above any rounding of the dtype's distance

    def offer(self, x: Tensor, idx: Tensor) -> None:
        """Record the queried points `x: [n, ...]` of the distinct samples `idx: [n]`."""
        delta = (x - self.x0[idx]).flatten(1)
        near = delta.abs().amax(dim=1) if self.norm == "linf" else delta.norm(dim=1)
        rows = (near <= self._screen).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        d = distance(x[rows], self.x0[idx[rows]], self.norm)
        keep = (d <= self.eps) & (d > self.dist[idx[rows]])
        rows, d = rows[keep], d[keep]
        self.dist[idx[rows]] = d
        self.best[idx[rows]] = x[rows].to(self.best.dtype)

    def labels(self, oracle: Oracle, x: Tensor, idx: Tensor) -> Tensor:
        """`oracle.labels(x, idx)`, noting the queried points that fall inside the ball."""
        out = oracle.labels(x, idx)
        self.offer(x, idx)
        return out


class Attack(ABC):
    """What the grid, the registry and the user see of an attack: its ball and its `run`.

    Subclass [OracleAttack][randfeat.eval.attacks.base.OracleAttack] to write a search;
    [EOT][randfeat.eval.attacks.eot.EOT] subclasses this class directly and composes through
    `run`.

    Attributes:
        output: what the attack needs from the model: `"scores"` or `"labels"`.
        eps: the radius of the threat ball.
        norm: `"linf"` or `"l2"`.
    """

    output: ClassVar[Output] = "scores"
    eps: float
    norm: Norm

    def __init__(self, eps: float, norm: Norm = "linf") -> None:
        self.eps = check_positive_float(eps, "eps")
        self.norm = check_choice(norm, "norm", ("linf", "l2"))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"

    @abstractmethod
    def run(
        self,
        model: Model,
        x: Tensor,
        y: Tensor,
        budget: int = 1000,
        votes: int = 9,
        seed: int | torch.Generator | None = None,
        *,
        batch_size: int | None = None,
        samples: int = 1,
    ) -> AttackResult:
        """Attack the images `x: [N, C, H, W]` in $[0, 1]$ with labels `y: [N]`.

        Args:
            model: a callable from images to scores `[n, K]` (or labels for decision attacks).
            x: clean images in $[0, 1]$.
            y: true labels, int64.
            budget: queries allowed per image (`>= 1`).
            votes: forwards that judge an apparent success (appendix D.4); 1 = "lucky" setting.
            seed: an int or generator for a reproducible run; None draws from OS entropy.
            batch_size: forwards per model call (default: all at once).
            samples: forwards averaged per query (EOT); each query is charged `samples`.

        Returns:
            An [AttackResult][randfeat.eval.outcome.AttackResult].

        Raises:
            ValueError: on bad input (or TypeError on a wrong type), before any query is spent.
        """


class OracleAttack(Attack):
    """Base of every search: validation, the [Oracle][randfeat.eval.oracle.Oracle], the result.

    Subclasses set `output` and implement `_attack(oracle, generator) -> x_last`; everything
    they learn about the model comes through the oracle.
    """

    def run(
        self,
        model: Model,
        x: Tensor,
        y: Tensor,
        budget: int = 1000,
        votes: int = 9,
        seed: int | torch.Generator | None = None,
        *,
        batch_size: int | None = None,
        samples: int = 1,
    ) -> AttackResult:
        """Attack the images `x: [N, C, H, W]` in $[0, 1]$ with labels `y: [N]`.

        See [Attack.run][randfeat.eval.attacks.base.Attack.run] for the arguments.
        """
        x, y = validate_inputs(x, y, budget, votes)
        oracle = Oracle(
            model,
            x,
            y,
            budget=budget,
            eps=self.eps,
            norm=self.norm,
            votes=votes,
            output=self.output,
            batch_size=batch_size,
            samples=samples,
        )
        gen = make_generator(seed, x.device)
        try:
            x_last = self._attack(oracle, gen)
        except QueryRefused:  # the search ends where the owner refused it: what it won, it keeps
            x_last = oracle.x0
        return oracle.result(x_last)

    @abstractmethod
    def _attack(self, oracle: Oracle, generator: torch.Generator) -> Tensor:
        """Run the search through `oracle`; return the last iterate `[N, C, H, W]`."""


def validate_inputs(x: Tensor, y: Tensor, budget: int, votes: int) -> tuple[Tensor, Tensor]:
    """`x` (images in $[0, 1]$, finite) and `y` (labels on `x`'s device) checked, with `budget`
    and `votes`: what every `Attack.run` checks before any query."""
    x = check_batch(x)
    if not bool(torch.isfinite(x).all()) or bool(((x < 0) | (x > 1)).any()):
        raise ValueError(
            f"Expected argument `x` to lie in [0, 1], but got values in "
            f"[{float(x.min()):.4g}, {float(x.max()):.4g}]. Fold normalisation into the model."
        )
    y = check_labels(y, x.shape[0])
    check_positive_int(budget, "budget")
    check_positive_int(votes, "votes")
    return x, y.to(device=x.device)
