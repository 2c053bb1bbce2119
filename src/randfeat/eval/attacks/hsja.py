"""HopSkipJump (HSJA): a decision-based attack in ℓ2 or ℓ∞ that sees predicted labels only.

Chen, Jordan and Wainwright, "HopSkipJumpAttack: A Query-Efficient Decision-Based Adversarial
Attack", IEEE S&P 2020 (official code: `Jianbo-Lab/HSJA`, `hsja.py`, commit `6a914564`).

HSJA walks along the decision boundary toward the clean image `x0`. Let
$\\phi(x) = 1$ when the model misclassifies `x`, $-1$ otherwise. From a misclassified start:

1. *binary search* between `x0` and the current point to a boundary point $x_t$, to a threshold $\\theta$ ($\\theta = \\gamma / d^{3/2}$ in ℓ2,
   $\\gamma / d^2$ in ℓ∞, $d = C \\cdot H \\cdot W$);
2. *gradient-direction estimate* at $x_t$ (Monte Carlo, with a baseline): with $B$ probes $u_b$ (Gaussian for ℓ2,
   uniform in $[-1, 1]^d$ for ℓ∞, each normalised to unit ℓ2 length),
   $\\widetilde{\\nabla S}(x_t, \\delta) = \\frac{1}{B} \\sum_b (\\phi(x_t + \\delta u_b) - \\bar\\phi)\\, u_b$
   with $\\bar\\phi = \\frac{1}{B} \\sum_b \\phi(x_t + \\delta u_b)$,
   the *baseline subtraction* $\\bar\\phi$ that reduces the variance of the estimate; with
   $B_t = B_0 \\sqrt{t}$ probes at iteration $t$ (capped) and a probe radius $\\delta_t$ tied to
   the distance;
3. *geometric step-size search*: from $\\xi_t = \\lVert x_t - x_0 \\rVert / \\sqrt{t}$, halve
   until $x_t + \\xi_t v_t$ is misclassified, where $v_t$ is the estimate (ℓ2) or its sign (ℓ∞);
   then binary search back to the boundary.

Every model evaluation is a query, counted by the [Oracle][randfeat.eval.oracle.Oracle]: the
uniform-noise draws of the initial search, every binary-search step, every probe and every step of
the step-size search. HSJA is a minimum-norm attack; as for RayS and SignFlip, an image counts as
fooled when a queried point inside the ε-ball is misclassified (the oracle verifies it), and the
attack stops querying it then, or when its budget is spent.
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar

import torch
from torch import Tensor

from randfeat.checks import check_positive_float, check_positive_int
from randfeat.eval.attacks.base import FarthestInBall, OracleAttack
from randfeat.eval.oracle import Norm, Oracle, Output, distance

__all__ = [
    "HopSkipJump",
    "baseline_direction",
    "binary_search_threshold",
    "num_evals",
    "select_delta",
]

_log = logging.getLogger(__name__)

INIT_DRAWS = 10_000
"""Uniform-noise draws allowed per image for the initial search (official: gives up at 1e4)."""
INIT_BLEND_TOL = 1e-3
"""The initial blend search stops when its bracket is at most this wide (official `0.001`)."""
FIRST_DELTA = 0.1
"""The probe radius of the first iteration, `0.1 · (clip_max - clip_min)` (official)."""
PROBE_ELEMENTS = 1 << 23
"""Pixels of probes drawn at once (64 MiB in float64): the gradient estimate is streamed."""
WORK = torch.float64
"""The attack computes in float64, as the official NumPy code does, and queries the model in the
images' dtype. In float32, the ℓ∞ binary search (bracket width θ · dist ≈ 1.6e-7 at d = 784) and
the probes (δ ≈ dist / d) sit at a few ulps of the pixel values: on the Fashion-MNIST CNN at ℓ∞
ε = 0.1 and 1,000 queries, a float32 version fooled 0.516 of 100 images, this one 0.551 (means
over seeds 0-8, per-seed sd about 0.025), the official code 0.527 (seeds 0-2)."""


def _ask(oracle: Oracle, seen: FarthestInBall, x: Tensor, idx: Tensor) -> Tensor:
    """Query the points `x: [n, ...]` (cast to the images' dtype) of the samples `idx`: `[n]`
    bool, misclassified."""
    return seen.labels(oracle, x.to(oracle.x0.dtype), idx) != oracle.y[idx]


# ---------------------------------------------------------------------------------- the formulas
def binary_search_threshold(norm: Norm, dim: int, gamma: float = 1.0) -> float:
    """$\\theta$: $\\gamma / d^{3/2}$ for ℓ2, $\\gamma / d^2$ for ℓ∞ (official `params['theta']`)."""
    return gamma / (math.sqrt(dim) * dim) if norm == "l2" else gamma / dim**2


def select_delta(
    norm: Norm, dim: int, theta: float, iteration: int, dist_post_update: Tensor
) -> Tensor:
    """The probe radius $\\delta_t$ per sample (official `select_delta`), float64 `[n]`.

    $\\delta_1 = 0.1$ (a tenth of the pixel range); then $\\sqrt{d}\\,\\theta\\,d_{t-1}$ (ℓ2) or
    $d\\,\\theta\\,d_{t-1}$ (ℓ∞), where, as in the official code, $d_{t-1}$ is the distance to `x0`
    of the point the last binary search started from (`dist_post_update`).
    """
    if iteration == 1:
        return torch.full_like(dist_post_update, FIRST_DELTA, dtype=torch.float64)
    scale = math.sqrt(dim) * theta if norm == "l2" else dim * theta
    return scale * dist_post_update.double()


def num_evals(iteration: int, init_num_evals: int, max_num_evals: int) -> int:
    """Probes of iteration $t$: $\\min(\\lfloor B_0 \\sqrt{t} \\rfloor, B_{max})$ (official)."""
    return min(int(init_num_evals * math.sqrt(iteration)), max_num_evals)


def baseline_direction(sum_u: Tensor, sum_phi_u: Tensor, sum_phi: Tensor, count: Tensor) -> Tensor:
    """The unit gradient direction with baseline subtraction, from sums over the probes, `[n, D]`.

    With $k$ probes $u_b$ and answers $\\phi_b = \\pm 1$, the estimate is
    $\\frac{1}{k}\\sum_b (\\phi_b - \\bar\\phi) u_b
    = \\frac{1}{k}\\bigl(\\sum_b \\phi_b u_b - \\bar\\phi \\sum_b u_b\\bigr)$. When every answer
    agrees the baseline would cancel the estimate; the official code then takes
    $\\bar\\phi \\cdot \\frac{1}{k}\\sum_b u_b$ (step away from, or toward, the probes' mean).
    The result is normalised to unit ℓ2 length (zero where the estimate is zero).

    Args:
        sum_u: `[n, D]` $\\sum_b u_b$.
        sum_phi_u: `[n, D]` $\\sum_b \\phi_b u_b$.
        sum_phi: `[n]` $\\sum_b \\phi_b$ (an integer count in any dtype).
        count: `[n]` the number of probes $k \\ge 1$.
    """
    k = count.to(sum_u.dtype).view(-1, 1)
    mean_phi = sum_phi.to(sum_u.dtype).view(-1, 1) / k
    unanimous = (sum_phi.abs() == count).view(-1, 1)
    grad = torch.where(unanimous, mean_phi * sum_u, sum_phi_u - mean_phi * sum_u) / k
    return grad / grad.norm(dim=1, keepdim=True).clamp_min(torch.finfo(grad.dtype).tiny)


class HopSkipJump(OracleAttack):
    r"""HopSkipJump (Chen, Jordan & Wainwright, 2020), untargeted, ℓ2 or ℓ∞, labels only.

    The official algorithm (`hsja.py`), step by step, vectorised over the images:

    * *initial search* (`initialize`): uniform noise in $[0, 1]^d$ redrawn until misclassified (at
      most 10,000 draws, one query each), then a binary search of the blend
      $(1 - \alpha) x_0 + \alpha \cdot \text{noise}$ until the bracket on $\alpha$ is at most 0.001
      wide (10 queries), in both norms;
    * *binary search* (`binary_search_batch`): ℓ2 on the blend weight in $[0, 1]$, ℓ∞ on the
      radius of the box around $x_0$ in $[0, \lVert x - x_0 \rVert_\infty]$, until the bracket is
      at most $\theta$ (ℓ2) or $\min(\theta \lVert x - x_0 \rVert_\infty, \theta)$ (ℓ∞) wide;
      the adversarial end is kept;
    * per iteration $t = 1, 2, \dots$: the probe radius $\delta_t$
      ([select_delta][randfeat.eval.attacks.hsja.select_delta]), $B_t = \min(\lfloor 100
      \sqrt{t} \rfloor, 10^4)$ probes ([num_evals][randfeat.eval.attacks.hsja.num_evals]),
      each clipped to $[0, 1]$ with $u_b$ replaced by the clipped difference over $\delta_t$, the
      baseline-subtracted estimate
      ([baseline_direction][randfeat.eval.attacks.hsja.baseline_direction]); the update is the
      estimate (ℓ2) or its sign (ℓ∞); the geometric step-size search from
      $\lVert x_t - x_0 \rVert / \sqrt{t}$, halving until misclassified; then the binary search.

    Defaults (official): `gamma = 1.0`, `init_num_evals = 100`, `max_num_evals = 10_000`,
    `stepsize_search = 'geometric_progression'` (the grid search is not implemented). The
    official `num_iterations` is replaced by the budget: iterations run until success or budget.

    Query accounting and deviations from the official code:

    * Every model evaluation is charged (the official code counts none): the noise draws, the
      blend search, every binary-search step, every probe, every step of the step-size search.
    * The label is the given `y`; the official code spends one model evaluation on `x0` to get it.
    * The budget is per image; a sample with fewer queries left than an iteration's probes spends
      what it has left on probes (each is still a chance to land in the ball) and stops.
    * Success is decided by the oracle at any queried point inside the ε-ball (as RayS and
      SignFlip); the attack stops querying an image as soon as the oracle reports it fooled.
    * For an image it does not fool, it returns the point it queried inside the ε-ball that lies
      farthest from `x0` ([FarthestInBall][randfeat.eval.attacks.base.FarthestInBall]; `x0` when
      none was), not its boundary point, which is outside the ball.
    * The phases run in lockstep across the images (every image is at the same iteration), so
      each image makes exactly the queries a one-image run would make; images that finish a
      phase early (the noise search, the step-size search) wait for the others.
    * The arithmetic is float64 (as the official NumPy code); queries are cast to the images'
      dtype, and the label and the success are those of the cast point.
    * Untargeted only.

    Args:
        eps: radius ε of the threat ball (only decides success), ℓ2 or ℓ∞ on the `[0, 1]` scale.
        norm: `"l2"` (default, the paper's main setting) or `"linf"`.
        gamma: $\gamma$ of the binary-search threshold $\theta$ (> 0).
        init_num_evals: probes $B_0$ of the first iteration (>= 1).
        max_num_evals: the cap on the probes of one iteration (>= `init_num_evals`).

    Raises:
        ValueError / TypeError: on an invalid `eps`, `norm`, `gamma` or numbers of probes.

    References:
        Jianbo Chen, Michael I. Jordan, Martin J. Wainwright. "HopSkipJumpAttack: A
        Query-Efficient Decision-Based Adversarial Attack." IEEE S&P 2020.
        https://github.com/Jianbo-Lab/HSJA
    """

    output: ClassVar[Output] = "labels"

    def __init__(
        self,
        eps: float,
        norm: Norm = "l2",
        *,
        gamma: float = 1.0,
        init_num_evals: int = 100,
        max_num_evals: int = 10_000,
    ) -> None:
        super().__init__(eps, norm)
        self.gamma = check_positive_float(gamma, "gamma")
        self.init_num_evals = check_positive_int(init_num_evals, "init_num_evals")
        self.max_num_evals = check_positive_int(max_num_evals, "max_num_evals")
        if self.max_num_evals < self.init_num_evals:
            raise ValueError(
                f"Expected argument `max_num_evals` to be >= `init_num_evals` = "
                f"{self.init_num_evals}, but got {self.max_num_evals}."
            )

    # ------------------------------------------------------------------ the attack
    def _attack(self, oracle: Oracle, generator: torch.Generator) -> Tensor:
        x0 = oracle.x0.to(WORK)
        dim = x0[0].numel()
        theta = binary_search_threshold(self.norm, dim, self.gamma)
        seen = FarthestInBall(oracle.x0, self.eps, self.norm)  # in the images' dtype
        noise, found = self._init_noise(oracle, seen, generator)
        start = self._init_blend(oracle, seen, noise, found)
        every = found.nonzero().squeeze(1)
        x_t, dist_post = self._binary_search(oracle, seen, every, start[every], theta)
        point = x0.clone()  # the current boundary point x_t of each image
        point[every] = x_t
        dist_post_update = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
        dist_post_update[every] = dist_post
        dist = distance(point, x0, self.norm)
        iteration = 0
        while True:
            act = found & oracle.active(1)
            if not bool(act.any()):
                break
            iteration += 1
            idx = act.nonzero().squeeze(1)
            delta = select_delta(self.norm, dim, theta, iteration, dist_post_update[idx])
            k = num_evals(iteration, self.init_num_evals, self.max_num_evals)
            grad = self._gradient(oracle, seen, idx, point[idx], delta, k, generator)
            update = grad.sign() if self.norm == "linf" else grad
            update = update.view(-1, *x0.shape[1:])
            step, ok = self._geometric(
                oracle, seen, idx, point[idx], update, dist[idx] / math.sqrt(iteration)
            )
            idx, step, update = idx[ok], step[ok], update[ok]
            if idx.numel() == 0:
                continue
            shift = step.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1))) * update
            moved = (point[idx] + shift).clamp(0.0, 1.0)
            x_t, dist_post = self._binary_search(oracle, seen, idx, moved, theta)
            point[idx] = x_t
            dist_post_update[idx] = dist_post
            dist[idx] = distance(x_t, x0[idx], self.norm)
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "HSJA %s: %d iterations, %d/%d fooled, median boundary distance %.4g",
                self.norm,
                iteration,
                int(oracle.success.sum()),
                x0.shape[0],
                float(dist[found].median()) if bool(found.any()) else math.nan,
            )
        return seen.best  # queried in the ball; the oracle returns the fooling point if any

    # ------------------------------------------------------------------ the phases
    def _init_noise(
        self, oracle: Oracle, seen: FarthestInBall, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Uniform noise redrawn until misclassified (official `initialize`): noise, found `[N]`."""
        x0 = oracle.x0
        noise = torch.zeros(x0.shape, dtype=WORK, device=x0.device)
        found = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
        for _ in range(INIT_DRAWS):
            todo = ~found & oracle.active(1)
            if not bool(todo.any()):
                break
            idx = todo.nonzero().squeeze(1)
            draw = torch.rand(
                (idx.shape[0], *x0.shape[1:]), generator=generator, dtype=WORK, device=x0.device
            )
            noise[idx] = draw
            found[idx] = _ask(oracle, seen, draw, idx)
        return noise, found

    def _init_blend(
        self, oracle: Oracle, seen: FarthestInBall, noise: Tensor, found: Tensor
    ) -> Tensor:
        """Binary search of the blend weight toward `x0` (official, both norms): the start `[N]`."""
        x0 = oracle.x0.to(WORK)
        shape = (-1, *([1] * (x0.ndim - 1)))
        low = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
        high = torch.ones_like(low)
        while True:
            act = found & (high - low > INIT_BLEND_TOL) & oracle.active(1)
            if not bool(act.any()):
                break
            idx = act.nonzero().squeeze(1)
            mid = (high[idx] + low[idx]) / 2
            m = mid.to(x0.dtype).view(shape)
            adv = _ask(oracle, seen, ((1 - m) * x0[idx] + m * noise[idx]).clamp(0.0, 1.0), idx)
            high[idx] = torch.where(adv, mid, high[idx])
            low[idx] = torch.where(adv, low[idx], mid)
        h = high.to(x0.dtype).view(shape)
        return ((1 - h) * x0 + h * noise).clamp(0.0, 1.0)

    def _project(self, x0: Tensor, x: Tensor, alpha: Tensor) -> Tensor:
        """ℓ2: $(1 - \\alpha) x_0 + \\alpha x$; ℓ∞: `x` clipped to the box of radius α (official)."""
        a = alpha.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        if self.norm == "l2":
            return ((1 - a) * x0 + a * x).clamp(0.0, 1.0)
        return torch.minimum(torch.maximum(x, x0 - a), x0 + a).clamp(0.0, 1.0)

    def _binary_search(
        self, oracle: Oracle, seen: FarthestInBall, idx: Tensor, x: Tensor, theta: float
    ) -> tuple[Tensor, Tensor]:
        """Binary search from the misclassified `x: [n, ...]` toward `x0[idx]` to the boundary.

        Official `binary_search_batch` for one image: the bracket `[low, high]` on the blend
        weight (ℓ2, `[0, 1]`, threshold θ) or the box radius (ℓ∞, `[0, ||x - x0||_∞]`, threshold
        `min(θ ||x - x0||_∞, θ)`) shrinks while `(high - low) / threshold > 1`; `high` always
        indexes a misclassified point.

        Returns:
            The boundary points `[n, ...]` (at `high`) and, as the official code returns it, the
            distance of the *starting* points `x` to `x0` (`dist_post_update`, float64 `[n]`).
        """
        x0 = oracle.x0[idx].to(WORK)
        dist_start = distance(x, x0, self.norm)
        if self.norm == "linf":
            high = dist_start.clone()
            threshold = torch.clamp(dist_start * theta, max=theta)
        else:
            high = torch.ones_like(dist_start)
            threshold = torch.full_like(dist_start, theta)
        low = torch.zeros_like(high)
        rows = torch.arange(idx.shape[0], device=idx.device)
        while True:
            # (high - low) / threshold is NaN for a start at x0 (threshold 0): such a row stops
            live = ((high - low) / threshold > 1) & oracle.active(1)[idx]
            if not bool(live.any()):
                break
            r = rows[live]
            mid = (high[r] + low[r]) / 2
            adv = _ask(oracle, seen, self._project(x0[r], x[r], mid), idx[r])
            high[r] = torch.where(adv, mid, high[r])
            low[r] = torch.where(adv, low[r], mid)
        return self._project(x0, x, high), dist_start

    def _gradient(
        self,
        oracle: Oracle,
        seen: FarthestInBall,
        idx: Tensor,
        x_t: Tensor,
        delta: Tensor,
        k: int,
        generator: torch.Generator,
    ) -> Tensor:
        """The baseline-subtracted Monte-Carlo direction at the boundary points `x_t`, `[n, D]`.

        Official `approximate_gradient`: `k` probes per image (fewer where its budget has fewer
        left), each $u / \\lVert u \\rVert_2$ with $u$ standard normal (ℓ2) or uniform in
        $[-1, 1]^d$ (ℓ∞), clipped as $\\mathrm{clip}(x_t + \\delta u)$ and replaced by the
        clipped difference over δ. Probes are drawn and queried in chunks of about
        `PROBE_ELEMENTS` pixels; the sums of the estimate are accumulated across chunks.
        """
        x0 = oracle.x0
        n, dim, dt = idx.shape[0], x0[0].numel(), WORK
        counts = torch.clamp(oracle.remaining[idx], max=k)  # probes each image can afford
        flat = x_t.flatten(1)
        sum_u = torch.zeros(n, dim, dtype=dt, device=x0.device)
        sum_phi_u = torch.zeros_like(sum_u)
        sum_phi = torch.zeros(n, dtype=torch.long, device=x0.device)
        done = torch.zeros(n, dtype=torch.long, device=x0.device)
        per_chunk = max(1, PROBE_ELEMENTS // max(1, n * dim))
        rows = torch.arange(n, device=x0.device)
        d_rows = delta.to(dt).view(-1, 1, 1)
        for first in range(0, k, per_chunk):
            size = min(per_chunk, k - first)
            # images still open that can afford probe `first` (success ends an image's probes)
            open_ = (counts > first) & oracle.active(1)[idx]
            if not bool(open_.any()):
                break
            r = rows[open_]
            valid = (first + torch.arange(size, device=x0.device)).view(1, -1) < counts[r].view(
                -1, 1
            )  # [m, size]
            shape = (r.shape[0], size, dim)
            if self.norm == "l2":
                u = torch.randn(shape, generator=generator, dtype=dt, device=x0.device)
            else:
                u = torch.rand(shape, generator=generator, dtype=dt, device=x0.device) * 2 - 1
            u = u / u.norm(dim=2, keepdim=True)
            probes = (flat[r].unsqueeze(1) + d_rows[r] * u).clamp(0.0, 1.0)
            u = (probes - flat[r].unsqueeze(1)) / d_rows[r]  # the clipped direction (official)
            owner = r.view(-1, 1).expand(-1, size)[valid]
            pts = probes[valid].view(-1, *x0.shape[1:])
            adv = _ask(oracle, seen, pts, idx[owner])
            phi = torch.zeros(r.shape[0], size, dtype=dt, device=x0.device)
            phi[valid] = adv.to(dt) * 2 - 1
            u = u * valid.unsqueeze(2).to(dt)
            sum_u[r] += u.sum(dim=1)
            sum_phi_u[r] += (phi.unsqueeze(2) * u).sum(dim=1)
            sum_phi[r] += phi.sum(dim=1).round().long()
            done[r] += valid.sum(dim=1)
        return baseline_direction(sum_u, sum_phi_u, sum_phi, done.clamp_min(1))

    def _geometric(
        self,
        oracle: Oracle,
        seen: FarthestInBall,
        idx: Tensor,
        x_t: Tensor,
        update: Tensor,
        step: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Geometric step-size search (official `geometric_progression_for_stepsize`).

        From `step` ($\\lVert x_t - x_0 \\rVert / \\sqrt{t}$), halve until
        $\\mathrm{clip}(x_t + \\xi v_t)$ is misclassified. Returns the steps (float64 `[n]`) and
        whether each image found one (`False` when its budget ran out or it was fooled first).
        """
        step = step.clone()
        accepted = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        rows = torch.arange(idx.shape[0], device=idx.device)
        view = (-1, *([1] * (update.ndim - 1)))
        while True:
            live = ~accepted & oracle.active(1)[idx]
            if not bool(live.any()):
                break
            r = rows[live]
            cand = (x_t[r] + step[r].to(x_t.dtype).view(view) * update[r]).clamp(0.0, 1.0)
            adv = _ask(oracle, seen, cand, idx[r])
            accepted[r] = adv
            step[r] = torch.where(adv, step[r], step[r] / 2)
        # an image fooled during the search is done; the others keep their accepted step
        return step, accepted & ~oracle.success[idx]
