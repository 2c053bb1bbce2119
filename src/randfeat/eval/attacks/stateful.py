"""What the adaptive attacks against stateful detection share (Feng et al., OARS, CCS 2023).

Feng, Hooda, Mangaokar, Fawaz, Jha and Prakash, "Stateful Defenses for Machine Learning Models Are
Not Yet Secure Against Black-box Attacks", CCS 2023. Written after their code
(`nmangaokar/ccs_23_oars_stateful_attacks`, MIT): `attacks/Attack.py` (`model`: the optional
query-blinding transform of every query), `utils/transforms.py` (`random_affine`), and the
`binary_search_*` functions of `attacks/adaptive/*.py`.

* [ImageQueries][randfeat.eval.attacks.stateful.ImageQueries]: one image's queries, one image
  per call, a refusal answered as `None`, a ban raised as
  [Banned][randfeat.eval.attacks.stateful.Banned], blinding applied before sending.
* [rate_search][randfeat.eval.attacks.stateful.rate_search]: their binary search of a
  hyperparameter to a target rejection rate.
* [Blinding][randfeat.eval.attacks.stateful.Blinding] and
  [blind][randfeat.eval.attacks.stateful.blind]: query blinding, a small random affine transform
  of each query.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from randfeat.checks import check_float, check_int, check_probability, expected
from randfeat.eval.attacks.base import FarthestInBall, project
from randfeat.eval.errors import QueryRefused
from randfeat.eval.oracle import Oracle, distance
from randfeat.serve.protocol import KEY_BANNED

__all__ = [
    "Banned",
    "Blinding",
    "ImageQueries",
    "blind",
    "check_blinding",
    "check_bounds",
    "check_search",
    "is_banned",
    "rate_search",
]


def is_banned(err: QueryRefused) -> bool:
    """Whether a refusal is a ban (in process `code`, over HTTP the server's `error`)."""
    return KEY_BANNED in (getattr(err, "code", None), getattr(err, "error", None))


class Banned(Exception):
    """The account is banned: no later query can be answered; the attack ends."""


@dataclass(frozen=True)
class Blinding:
    """Query blinding (OARS `query_blinding_transform`, `random_affine`): each query is sent
    through a fresh random affine map, a rotation by an angle uniform in
    $[-\\text{angle}, \\text{angle}]$ degrees, a shift uniform in $[-\\text{translate},
    \\text{translate}]$ of the width and height, and a zoom by `scale`, then projected onto
    the ε-ball around $x_0$ ∩ $[0, 1]$ when the point was inside it, so that a candidate sent
    stays a valid attack point (see [ImageQueries][randfeat.eval.attacks.stateful.ImageQueries]).

    Their code ships the transform with no configuration that enables it; the defaults here
    (2 degrees, 5% shift, no zoom) are ours: small enough that the sent point is near the
    attacker's, large enough to change a query's fingerprint.

    Attributes:
        angle: the largest rotation, in degrees (`[0, 180]`).
        translate: the largest shift, a fraction of the side (`[0, 1)`).
        scale: the zoom (`> 0`; 1 is none).
    """

    angle: float = 2.0
    translate: float = 0.05
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_float(self.angle, "angle", low=0.0, high=180.0)
        check_probability(self.translate, "translate", allow_zero=True)
        check_float(self.scale, "scale", low=0.0, low_open=True, high=10.0)


def check_blinding(value: object) -> Blinding | None:
    """`blind` as the adaptive attacks take it: `False`/`None` (off), `True` (the defaults) or a
    [Blinding][randfeat.eval.attacks.stateful.Blinding]."""
    if value is None or value is False:
        return None
    if value is True:
        return Blinding()
    if isinstance(value, Blinding):
        return value
    raise TypeError(expected("blind", "a bool or a Blinding", value, "Pass blind=True."))


def blind(x: Tensor, blinding: Blinding, generator: torch.Generator) -> Tensor:
    """Each row of `x: [n, C, H, W]` through its own random affine map (bilinear, zero fill).

    The sampled grid is that of `torchvision.transforms.RandomAffine(degrees=angle,
    translate=(t, t), scale=(s, s))`, with bilinear interpolation where theirs is nearest: a
    sub-pixel shift still changes the query. Not projected (see `ImageQueries`).
    """
    n = x.shape[0]
    u = torch.rand((n, 3), generator=generator, device=x.device, dtype=torch.float64) * 2 - 1
    a = u[:, 0] * math.radians(blinding.angle)
    t = u[:, 1:] * blinding.translate * 2  # a shift of t·side is 2t in normalised coordinates
    cos, sin = torch.cos(a) / blinding.scale, torch.sin(a) / blinding.scale
    theta = torch.stack(
        [torch.stack([cos, -sin, t[:, 0]], dim=1), torch.stack([sin, cos, t[:, 1]], dim=1)], dim=1
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class ImageQueries:
    """The queries of one image `i` through the oracle, one image per call (as OARS sends them).

    `ask(x)` blinds `x` if asked (a point inside the ε-ball is projected back onto the ball
    ∩ $[0, 1]$ after the transform, so that blinding never moves a candidate out of the threat
    model; a point outside it, a decision attack's probe, stays outside), sends it, and
    returns the answer with the point actually sent, or `None` when refused. The oracle charges
    every row, refused or not, and judges success on the point sent. A ban raises
    [Banned][randfeat.eval.attacks.stateful.Banned].

    Args:
        oracle: the run's oracle.
        i: the image.
        generator: the run's generator (for blinding).
        blinding: `None` (send `x` itself) or the transform.
        seen: where answered points are offered (a decision attack's returned point), or `None`.

    Attributes:
        left: queries this image may still make.
        sent: queries sent so far.
        refused: queries refused so far.
    """

    def __init__(
        self,
        oracle: Oracle,
        i: int,
        generator: torch.Generator,
        blinding: Blinding | None = None,
        seen: FarthestInBall | None = None,
    ) -> None:
        self.oracle, self.i, self.generator = oracle, i, generator
        self.blinding, self.seen = blinding, seen
        self.x0 = oracle.x0[i : i + 1]
        self.y = oracle.y[i : i + 1]
        self.idx = torch.tensor([i], device=self.x0.device)
        self.left = int(oracle.remaining[i])
        self.sent = 0
        self.refused = 0

    def done(self) -> bool:
        """No query left, or the image is fooled."""
        return self.left < 1 or bool(self.oracle.success[self.i])

    def ask(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """`(answer [1, ...], sent point [1, C, H, W])` for `x: [1, C, H, W]`, `None` if refused.

        Raises:
            Banned: the account is banned.
        """
        x = x.to(self.x0.dtype).clamp(0.0, 1.0)
        if self.blinding is not None:
            moved = blind(x, self.blinding, self.generator)
            inside = bool(distance(x, self.x0, self.oracle.norm)[0] <= self.oracle.eps)
            x = project(moved, self.x0, self.oracle.eps, self.oracle.norm) if inside else moved
        self.left -= 1
        self.sent += 1
        try:
            if self.oracle.output == "scores":
                out = self.oracle.scores(x, self.idx)
            else:
                out = self.oracle.labels(x, self.idx)
        except QueryRefused as err:
            if is_banned(err):
                raise Banned from err
            self.refused += 1
            return None
        if self.seen is not None:
            self.seen.offer(x, self.idx)
        return out, x


def rate_search(
    bounds: tuple[float, float],
    steps: int,
    samples: int,
    rate: float,
    refused: Callable[[float], bool],
    done: Callable[[], bool],
) -> float:
    """Their binary search (`binary_search_gradient_estimation_variance`,
    `binary_search_minimum_step_size`): the smallest value tried whose `samples` probes were
    refused at a rate $\\le$ `rate`; the upper end when none was.

    Each halving sends `samples` probes at the midpoint (`refused(mid)` sends one and says
    whether it was refused); a rate within the target moves the upper end down to the midpoint,
    else the lower end up. It stops early, keeping the best so far, once `done()`.
    """
    lower, upper = bounds
    best = upper
    for _ in range(steps):
        mid = (lower + upper) / 2
        hits = 0
        for _ in range(samples):
            if done():
                return best
            hits += refused(mid)
        if hits / samples <= rate:
            best = upper = mid
        else:
            lower = mid
    return best


def check_bounds(value: object, name: str) -> tuple[float, float]:
    """A pair `(low, high)` of finite floats with `0 < low <= high`."""
    ok = isinstance(value, tuple) and len(value) == 2
    if ok and isinstance(value, tuple):
        lo = check_float(value[0], f"{name}[0]", low=0.0, low_open=True)
        hi = check_float(value[1], f"{name}[1]", low=0.0, low_open=True)
        if lo <= hi:
            return lo, hi
    raise ValueError(expected(name, "a pair (low, high) of floats with 0 < low <= high", value))


def check_search(steps: object, samples: object, rate: object, name: str) -> tuple[int, int, float]:
    """A search's halvings (`[0, 64]`), probes per halving (`>= 1`) and target rate (`[0, 1]`)."""
    return (
        check_int(steps, f"{name}_steps", low=0, high=64),
        check_int(samples, f"{name}_samples", low=1, high=10_000),
        check_probability(rate, f"{name}_rate", allow_zero=True, allow_one=True),
    )
