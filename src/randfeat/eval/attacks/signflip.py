"""Sign Flip Attack (SFA): a decision-based ℓ∞ attack that sees predicted labels only.

Chen, Zhang, Hu, Wu, "Boosting decision-based black-box adversarial attacks with random sign
flip", ECCV 2020 (official code: `wubaoyuan/Sign-Flip-Attack`, `SFA.py`, commit `6b32333e`).

SFA starts from a misclassified point far from the clean image `x0` and walks it into the ε-ball
while keeping it misclassified. Each iteration makes two label queries per unfinished image:

1. *projection step*: add a random ±α sign pattern η to the perturbation δ and project the result
   onto the ℓ∞ ball of radius `||δ||_∞ - α` (a smaller ball); keep it if still misclassified;
2. *random sign flip*: flip the signs of a few random entries of δ (each kept with probability
   `prob`, flipped with `1 - prob`); keep the flipped δ if still misclassified.

α and the keep probabilities adapt to the acceptance rates. The iterate is misclassified but
outside the ε-ball most of the time, so those queries are exploration: the oracle decides success
when a queried point inside the ball is misclassified (and passes the majority vote of D.4).
"""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from randfeat.checks import check_float, check_int, check_positive_float
from randfeat.eval.attacks.base import FarthestInBall, OracleAttack
from randfeat.eval.oracle import Oracle, Output

__all__ = ["SignFlip"]

logger = logging.getLogger(__name__)

ALPHA_OFFICIAL = 0.004
"""The official initial step α (`SFA.py`: `alpha = 0.004`), on the `[0, 1]` pixel scale."""
EPS_OFFICIAL = 0.031
"""The official ℓ∞ threshold (`SFA(..., linf=0.031)`), at which α = 0.004."""
ALPHA_FRACTION = ALPHA_OFFICIAL / EPS_OFFICIAL
"""Default initial α as a fraction of ε (≈ 0.129): official α = 0.004 at official ε = 0.031."""
PROB_MIN, PROB_MAX = 0.99, 0.9999
"""Clamp of the keep-sign probability (flip probability in `[1e-4, 1e-2]`), as official."""
PROB_STEP = 1e-4
"""Per-coordinate update of the keep probability after an accepted flip, as official."""
PROB_ADAPT = 1e-3
"""Update of every keep probability of an image by the periodic adaptation, as official."""
ALPHA_FACTOR = 1.5
"""α is multiplied or divided by this factor by the periodic adaptation, as official."""
ADAPT_EVERY = 10
"""Iterations between adaptations of α and the keep probabilities, as official."""
RATE_HIGH, RATE_LOW = 0.7, 0.3
"""Acceptance rates above / below which the adaptation grows / shrinks the step, as official."""
INIT_REDRAWS = 10_000
"""Uniform-noise redraws allowed per image before it gives up (the official give-up count)."""


def _project_radius(x: Tensor, x0: Tensor, radius: Tensor) -> Tensor:
    """Project `x` onto the ℓ∞ ball of radius `radius: [n]` around `x0`, then `[0, 1]`."""
    r = radius.view(-1, *([1] * (x.ndim - 1)))
    return torch.minimum(torch.maximum(x, x0 - r), x0 + r).clamp(0.0, 1.0)


def _upsample(z: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of `z: [n, C, h, w]` to `size` (the official `resize`)."""
    if tuple(z.shape[-2:]) == size:
        return z
    return F.interpolate(z, size=list(size), mode="bilinear", align_corners=False)


class SignFlip(OracleAttack):
    r"""Sign Flip Attack (Chen et al., 2020), untargeted, ℓ∞, decision-based (labels only).

    With `δ = x - x0` the current (misclassified) perturbation and `l = ||δ||_∞`:

    $$
    δ_p = \Pi_{B_∞(0,\, l - α)}(δ + η), \quad η = α \cdot \mathrm{up}(z),
    \; z \sim \mathrm{Uniform}\{-1, 1\}^{[C, H/r, W/r]}
    $$

    $$
    δ_s = δ \odot \mathrm{sign}(\mathrm{up}(2 b - 1)), \quad b \sim \mathrm{Bernoulli}(p)
    $$

    (`up` is the bilinear upsampling to `[C, H, W]`; the official code draws `z` as the sign
    of a Gaussian, the same distribution), each accepted when `clip(x0 + δ_·, 0, 1)` is misclassified (one query each). After an
    accepted flip, `p ← clip(p - 10^{-4} (2b - 1), 0.99, 0.9999)` per coordinate. Every 10
    iterations, with the acceptance rates of the last 10: projection rate > 0.7 → α ← 1.5 α,
    < 0.3 → α ← α / 1.5; flip rate > 0.7 → p ← p - 0.001 (flip more), < 0.3 → p ← p + 0.001.

    Initialisation (official, untargeted): uniform noise images, redrawn until misclassified
    (at most 10,000 redraws), then 10 steps of ℓ∞ binary search of the radius toward `x0`.

    Defaults and their sources (official `SFA.py`, REFERENCES.md §5):

    * `alpha = (0.004 / 0.031) · ε ≈ 0.129 ε` (`ALPHA_FRACTION`): the official absolute
      α = 0.004 at the official ε = 0.031; e.g. α = 0.0258 at the digits ε = 0.2. α then adapts.
    * `prob = 0.999` initial keep-sign probability, clamped to `[0.99, 0.9999]`; updates
      ±1e-4 after an accepted flip; every 10 iterations α ×/÷ 1.5 and prob ∓ 0.001 at acceptance
      rates 0.7 / 0.3.
    * `binary_steps = 10` (official); `resize_factor = 1` (the `SFA` default; the ImageNet
      `test.py` uses 2): signs and probabilities live on a `[C, H // r, W // r]` grid,
      bilinearly upsampled.

    Query accounting and deviations from the official code:

    * Honest: every forward is charged, including the uniform-noise initialisation draws, which
      the official code does not count (it charges 10 for the binary search and 2 per
      iteration). The oracle's D.4 verification is the only uncharged forward.
    * Budgets are per image (`oracle.active`), not one counter per batch. The two steps of an
      iteration are budgeted separately, so an image with one query left still makes the
      projection step.
    * Success is decided by the oracle at any queried point inside the ε-ball (clipped to
      `[0, 1]`), not by the official `||δ||_∞ <= ε` on the unclipped δ. The unclipped δ is kept
      as the iterate, as official. An image whose in-ball query fails verification keeps going.
    * The official code queries `x0` first (uncharged) and refuses the batch if any is
      misclassified; here no such query is made: a misclassified `x0` is found by the binary
      search, whose radii reach the ball.
    * The shrunk radius `l - α` is floored at 0 (the official code does not guard it; a
      negative radius would flip the projection's sign).
    * With a randomized model, a single query's label is noisy; decisions (accepting a step, the
      binary search, the initial noise) still use that one label, as in the official code.

    For an image it does not fool, the attack returns the point it queried inside the ε-ball that
    lies farthest from `x0` ([FarthestInBall][randfeat.eval.attacks.base.FarthestInBall]; `x0`
    when none was), not `x0 + δ` projected onto the ball, which it never queried: so "verified"
    and "fresh" agree on a deterministic model.

    Args:
        eps: ℓ∞ radius ε of the threat ball, on the `[0, 1]` scale.
        norm: must be `"linf"` (SFA is an ℓ∞ attack).
        alpha: initial projection step α on the `[0, 1]` pixel scale (> 0); None (default):
            `ALPHA_FRACTION * eps`.
        prob: initial keep-sign probability, in `[0.99, 0.9999]`.
        resize_factor: dimensionality reduction `r >= 1` of the sign / probability grid.
        binary_steps: steps of the initial ℓ∞ binary search (>= 0).

    References:
        Chen, W., Zhang, Z., Hu, X., Wu, B. Boosting decision-based black-box adversarial attacks
        with random sign flip. ECCV 2020.
    """

    output: ClassVar[Output] = "labels"

    def __init__(
        self,
        eps: float,
        norm: Literal["linf"] = "linf",
        *,
        alpha: float | None = None,
        prob: float = 0.999,
        resize_factor: float = 1.0,
        binary_steps: int = 10,
    ) -> None:
        if norm != "linf":
            raise ValueError(
                f"Expected argument `norm` to be 'linf' (SignFlip is an ℓ∞ attack), but got "
                f"{norm!r}. For 'l2', use a score-based attack (Square, NES)."
            )
        super().__init__(eps, norm)
        self.alpha = (
            ALPHA_FRACTION * self.eps if alpha is None else check_positive_float(alpha, "alpha")
        )
        self.prob = check_float(prob, "prob", low=PROB_MIN, high=PROB_MAX)
        self.resize_factor = check_float(resize_factor, "resize_factor", low=1.0)
        self.binary_steps = check_int(binary_steps, "binary_steps", low=0)

    # ------------------------------------------------------------------ the attack
    def _attack(self, oracle: Oracle, generator: torch.Generator) -> Tensor:
        x0 = oracle.x0
        if x0.ndim != 4:
            raise ValueError(
                f"Expected argument `x` to be images [N, C, H, W], but got shape {tuple(x0.shape)}."
            )
        n, _, h, w = x0.shape
        h_dr, w_dr = int(h // self.resize_factor), int(w // self.resize_factor)
        if h_dr < 1 or w_dr < 1:
            raise ValueError(
                f"Expected argument `resize_factor` to be <= min(H, W) = {min(h, w)}, but got "
                f"{self.resize_factor!r}."
            )
        seen = FarthestInBall(x0, self.eps, "linf")
        x_a, found = self._init_noise(oracle, seen, generator)
        radius = self._binary_search(oracle, seen, x_a, found)
        delta = torch.where(
            found.view(-1, 1, 1, 1), _project_radius(x_a, x0, radius) - x0, torch.zeros_like(x0)
        )
        self._sign_flip(oracle, seen, generator, delta, found, (h_dr, w_dr))
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "SignFlip: %d/%d verified successes, %d without an adversarial start",
                int(oracle.success.sum()),
                n,
                int((~found).sum()),
            )
        return seen.best  # queried in the ball; the oracle returns the fooling point if any

    def _init_noise(
        self, oracle: Oracle, seen: FarthestInBall, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Uniform noise redrawn until misclassified: `x_a [N, C, H, W]`, `found [N]` bool.

        Every draw is a charged query (the official code charges none of them).
        """
        x0, y = oracle.x0, oracle.y
        x_a = x0.clone()
        found = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
        for _ in range(1 + INIT_REDRAWS):
            todo = ~found & oracle.active(1)
            if not bool(todo.any()):
                break
            idx = todo.nonzero().squeeze(1)
            noise = torch.rand(
                (idx.shape[0], *x0.shape[1:]), generator=generator, dtype=x0.dtype, device=x0.device
            )
            x_a[idx] = noise
            found[idx] = seen.labels(oracle, noise, idx) != y[idx]
        return x_a, found

    def _binary_search(
        self, oracle: Oracle, seen: FarthestInBall, x_a: Tensor, found: Tensor
    ) -> Tensor:
        """ℓ∞ binary search of the radius `u [N]` between 0 and `||x_a - x0||_∞` (official).

        The point tested at radius `mid` is `x_a` projected onto the ball of that radius; `u`
        shrinks to `mid` when it is misclassified, else the lower end rises to `mid`.
        """
        x0, y = oracle.x0, oracle.y
        lo = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
        hi = (x_a - x0).abs().flatten(1).amax(dim=1)
        for _ in range(self.binary_steps):
            act = found & oracle.active(1)
            if not bool(act.any()):
                break
            idx = act.nonzero().squeeze(1)
            mid = (lo[idx] + hi[idx]) / 2
            adv = seen.labels(oracle, _project_radius(x_a[idx], x0[idx], mid), idx) != y[idx]
            hi[idx] = torch.where(adv, mid, hi[idx])
            lo[idx] = torch.where(adv, lo[idx], mid)
        return hi

    def _sign_flip(
        self,
        oracle: Oracle,
        seen: FarthestInBall,
        generator: torch.Generator,
        delta: Tensor,
        found: Tensor,
        grid: tuple[int, int],
    ) -> Tensor:
        """The main loop: projection step and random sign flip, until success or budget."""
        x0, y = oracle.x0, oracle.y
        n, c, h, w = x0.shape
        size = (h, w)
        dt, dev = x0.dtype, x0.device
        alpha = torch.full((n,), self.alpha, dtype=dt, device=dev)
        prob = torch.full((n, c, *grid), self.prob, dtype=dt, device=dev)
        proj_hits = torch.zeros(n, dtype=torch.long, device=dev)
        flip_hits = torch.zeros(n, dtype=torch.long, device=dev)
        steps = torch.zeros(n, dtype=torch.long, device=dev)
        while True:
            # 1. projection step: random ±α signs, then the ball of radius ||δ||_∞ - α.
            act = found & oracle.active(1)
            if not bool(act.any()):
                break
            idx = act.nonzero().squeeze(1)
            m = idx.shape[0]
            a = alpha[idx].view(-1, 1, 1, 1)
            signs = torch.randint(0, 2, (m, c, *grid), generator=generator, device=dev)
            eta = _upsample((signs.to(dt) * 2 - 1) * a, size)
            d = delta[idx]
            radius = (d.abs().flatten(1).amax(dim=1) - alpha[idx]).clamp_min(0.0)
            r = radius.view(-1, 1, 1, 1)
            d_p = torch.minimum(torch.maximum(d + eta, -r), r)
            ok = seen.labels(oracle, (x0[idx] + d_p).clamp(0.0, 1.0), idx) != y[idx]
            delta[idx] = torch.where(ok.view(-1, 1, 1, 1), d_p, d)
            proj_hits[idx] += ok.long()
            steps[idx] += 1

            # 2. random sign flip: each grid entry flipped with probability 1 - prob.
            act2 = act & oracle.active(1)
            if bool(act2.any()):
                jdx = act2.nonzero().squeeze(1)
                s = torch.bernoulli(prob[jdx], generator=generator) * 2 - 1
                d = delta[jdx]
                d_s = d * _upsample(s, size).sign()
                ok = seen.labels(oracle, (x0[jdx] + d_s).clamp(0.0, 1.0), jdx) != y[jdx]
                okv = ok.view(-1, 1, 1, 1)
                # an accepted flip makes kept entries likelier to flip next, flipped ones less.
                prob[jdx] = torch.where(okv, prob[jdx] - s * PROB_STEP, prob[jdx]).clamp(
                    PROB_MIN, PROB_MAX
                )
                delta[jdx] = torch.where(okv, d_s, d)
                flip_hits[jdx] += ok.long()

            # 3. every ADAPT_EVERY iterations of an image: adapt α and its keep probabilities.
            due = act & (steps % ADAPT_EVERY == 0)
            if bool(due.any()):
                proj_rate = proj_hits.to(dt) / ADAPT_EVERY
                flip_rate = flip_hits.to(dt) / ADAPT_EVERY
                alpha = torch.where(due & (proj_rate > RATE_HIGH), alpha * ALPHA_FACTOR, alpha)
                alpha = torch.where(due & (proj_rate < RATE_LOW), alpha / ALPHA_FACTOR, alpha)
                shift = torch.where(flip_rate > RATE_HIGH, -PROB_ADAPT, 0.0)
                shift = torch.where(flip_rate < RATE_LOW, PROB_ADAPT, shift)
                shift = torch.where(due, shift, 0.0).to(dt)
                prob = (prob + shift.view(-1, 1, 1, 1)).clamp(PROB_MIN, PROB_MAX)
                proj_hits = torch.where(due, 0, proj_hits)
                flip_hits = torch.where(due, 0, flip_hits)
        return delta
