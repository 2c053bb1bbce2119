"""The adaptive HopSkipJump of Feng et al.: the detector's rejection used as an oracle.

Feng, Hooda, Mangaokar, Fawaz, Jha and Prakash, "Stateful Defenses for Machine Learning Models Are
Not Yet Secure Against Black-box Attacks", CCS 2023 (OARS). Written after their code
(`nmangaokar/ccs_23_oars_stateful_attacks`, `attacks/adaptive/HSJA.py`:
`binary_search_to_boundary`, `binary_search_gradient_estimation_variance`, `attack_untargeted`,
and the HSJA configurations under `configs/`), itself HopSkipJump of Chen, Jordan and
Wainwright (IEEE S&P 2020).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor

from randfeat.checks import check_int, expected
from randfeat.eval.attacks.base import FarthestInBall
from randfeat.eval.attacks.hsja import (
    INIT_BLEND_TOL,
    INIT_DRAWS,
    WORK,
    HopSkipJump,
    baseline_direction,
    binary_search_threshold,
    num_evals,
    select_delta,
)
from randfeat.eval.attacks.stateful import (
    Banned,
    Blinding,
    ImageQueries,
    check_blinding,
    check_bounds,
    check_search,
    rate_search,
)
from randfeat.eval.oracle import Norm, Oracle, distance

__all__ = ["AdaptiveHSJA"]

logger = logging.getLogger(__name__)


class AdaptiveHSJA(HopSkipJump):
    r"""HopSkipJump against a stateful detector, after Feng et al. (OARS, CCS 2023).

    Each image is attacked on its own, one image per model call (as in their code):

    1. the start: uniform noise redrawn until misclassified (a refused draw is redrawn), then
       the blend search toward $x_0$ to a bracket of 0.001; a refused step of a boundary search
       ends that search where it stands (their `bs_boundary_end_on_hit = false`);
    2. the probe radius δ (ℓ2 length): a binary search on `delta_range` (default
       $[0.001, 5]$, the widest of their ends: their ranges run from $[1, 2]$ on CIFAR-10 to
       $[1.5, 5]$ on ImageNet and $[0.001, 20]$ on their IoT data), `delta_steps` (10) halvings of
       `delta_samples` (20) probes $\mathrm{clip}(x_0 + \delta u / \lVert u \rVert_2)$,
       $u \sim \mathcal N(0, I)$; the smallest δ tried whose probes were refused at a rate
       $\le$ `delta_rate` (0.05) is kept for the whole attack;
    3. per iteration $t$: $B_t = \min(\lfloor B_0 \sqrt{t} \rfloor, B_{\max})$ probes at the
       boundary point; refused probes are dropped and the missing ones drawn again, at most
       `grad_attempts` (20) rounds, a partial estimate accepted (zero directions give the image
       up); the baseline-subtracted direction; the geometric step search from
       $\lVert x_t - x_0 \rVert / \sqrt{t}$; a refused step rolls the iteration back (the next
       iteration estimates afresh, with more probes), at most `step_attempts` (5) sends in a
       row before the image is given up; then the binary search back to the boundary.

    Every probe of the search and every refused query is a real query, charged by the oracle;
    any answered query inside the ε-ball can fool the model (the oracle judges the point it was
    sent). A ban (`key_banned`) ends the whole attack. Without detection the δ search ends at
    its lower end after `delta_steps · delta_samples` (200) queries. `search=False` keeps
    HopSkipJump's own δ schedule ([select_delta][randfeat.eval.attacks.hsja.select_delta]).

    Deviations from their code: the ℓ∞ variant (theirs is ℓ2) uses HopSkipJump's ℓ∞ choices
    (uniform probes, the sign of the estimate, the box-radius binary search); the step candidates are clipped to $[0, 1]$ (the
    oracle answers only images); success is the oracle's (a misclassified answered point inside
    the ball), and the point returned for an image not fooled is the farthest answered point in
    the ball, as [HopSkipJump][randfeat.eval.attacks.hsja.HopSkipJump]; the budget is
    `oracle.n_calls` per image (theirs a query count with `max_iter`); the δ search range
    $[0.001, 5]$ spans the ends of their configurations (CIFAR-10 $[1, 2]$, ImageNet $[1.5, 5]$,
    IoT $[0.001, 20]$), because their CIFAR-10 range, shrunk to 8×8 images, falls below the
    change the default detector lets through on the digits (about ℓ2 1, measured).

    Args:
        eps: radius ε of the threat ball.
        norm: `"l2"` (theirs) or `"linf"`.
        gamma: $\gamma$ of the binary-search threshold θ.
        init_num_evals: probes $B_0$ (theirs 100).
        max_num_evals: the cap $B_{\max}$ (theirs 10,000).
        delta_range: the δ search range.
        delta_steps: the delta search's halvings.
        delta_samples: its probes per halving.
        delta_rate: its target refusal rate.
        grad_attempts: rounds of redrawing refused probes per estimate (`>= 1`).
        step_attempts: sends of one step before the image is given up (`>= 1`).
        search: run the δ search.
        blind: query blinding: `False`, `True` (default transform) or a
            [Blinding][randfeat.eval.attacks.stateful.Blinding].

    Raises:
        ValueError: a bad range, count or rate (or TypeError on a wrong type).

    References:
        Feng, R., Hooda, A., Mangaokar, N., Fawaz, K., Jha, S., Prakash, A. "Stateful Defenses
        for Machine Learning Models Are Not Yet Secure Against Black-box Attacks." ACM CCS 2023.
        Code: https://github.com/nmangaokar/ccs_23_oars_stateful_attacks
    """

    def __init__(
        self,
        eps: float,
        norm: Norm = "l2",
        *,
        gamma: float = 1.0,
        init_num_evals: int = 100,
        max_num_evals: int = 10_000,
        delta_range: tuple[float, float] = (0.001, 5.0),
        delta_steps: int = 10,
        delta_samples: int = 20,
        delta_rate: float = 0.05,
        grad_attempts: int = 20,
        step_attempts: int = 5,
        search: bool = True,
        blind: bool | Blinding = False,
    ) -> None:
        super().__init__(
            eps, norm, gamma=gamma, init_num_evals=init_num_evals, max_num_evals=max_num_evals
        )
        self.delta_range = check_bounds(delta_range, "delta_range")
        self.delta_steps, self.delta_samples, self.delta_rate = check_search(
            delta_steps, delta_samples, delta_rate, "delta"
        )
        self.grad_attempts = check_int(grad_attempts, "grad_attempts", low=1, high=10**6)
        self.step_attempts = check_int(step_attempts, "step_attempts", low=1, high=10**9)
        if not isinstance(search, bool):
            raise TypeError(expected("search", "a bool", search))
        self.search = search
        self.blind = check_blinding(blind)

    # ------------------------------------------------------------------ the loop
    def _attack(self, oracle: Oracle, generator: torch.Generator) -> Tensor:
        seen = FarthestInBall(oracle.x0, self.eps, self.norm)
        try:
            for i in range(oracle.x0.shape[0]):
                self._attack_one(ImageQueries(oracle, i, generator, self.blind, seen), generator)
        except Banned:
            logger.info("AdaptiveHSJA: the account is banned; the attack ends")
        return seen.best

    def _attack_one(self, q: ImageQueries, gen: torch.Generator) -> None:
        """Steps 1-3 of the class docstring for one image."""
        x0 = q.x0.to(WORK)
        dim = x0.numel()
        theta = binary_search_threshold(self.norm, dim, self.gamma)

        def adv(x: Tensor) -> bool | None:
            out = q.ask(x)
            return None if out is None else bool(out[0][0] != q.y[0])

        # 1. the start
        start = None
        for _ in range(INIT_DRAWS):
            if q.done():
                return
            draw = torch.rand(x0.shape, generator=gen, dtype=WORK, device=x0.device)
            if adv(draw):
                start = draw
                break
        if start is None:
            return
        x_t, _ = self._boundary(q, adv, x0, start, "blend", INIT_BLEND_TOL)
        # 2. the δ search
        if self.search:

            def probe(s: float) -> bool:
                u = torch.randn(x0.shape, generator=gen, dtype=WORK, device=x0.device)
                return adv((x0 + s * u / u.norm()).clamp(0.0, 1.0)) is None

            searched = rate_search(
                self.delta_range,
                self.delta_steps,
                self.delta_samples,
                self.delta_rate,
                probe,
                q.done,
            )
            logger.debug("AdaptiveHSJA: image %d: delta %.4g", q.i, searched)
        dist_post = distance(x_t, x0, self.norm)
        attempts, t = 0, 0
        while not q.done():
            t += 1
            if self.search:
                delta = searched
            else:
                delta = float(select_delta(self.norm, dim, theta, t, dist_post)[0])
            grad = self._estimate(
                q, adv, x_t, delta, num_evals(t, self.init_num_evals, self.max_num_evals), gen
            )
            if grad is None:
                logger.debug("AdaptiveHSJA: image %d: gradient estimation failure", q.i)
                return
            update = (grad.sign() if self.norm == "linf" else grad).view(x0.shape)
            # the geometric step search; a refused step rolls the iteration back
            attempts += 1
            eta = float(distance(x_t, x0, self.norm)[0]) / math.sqrt(t)
            while True:
                if q.done():
                    return
                ok = adv((x_t + eta * update).clamp(0.0, 1.0))
                if ok is None:
                    if attempts >= self.step_attempts:
                        logger.debug("AdaptiveHSJA: image %d: step movement failure", q.i)
                        return
                    break
                if ok:
                    break
                eta /= 2
            if ok is None:
                continue
            attempts = 0
            moved = (x_t + eta * update).clamp(0.0, 1.0)
            x_t, dist_post = self._boundary(q, adv, x0, moved, self.norm, theta)

    def _boundary(
        self,
        q: ImageQueries,
        adv: Callable[[Tensor], bool | None],
        x0: Tensor,
        x: Tensor,
        how: str,
        theta: float,
    ) -> tuple[Tensor, Tensor]:
        """Binary search from the misclassified `x` toward `x0` (their
        `binary_search_to_boundary`: the ℓ2 blend; ℓ∞ the box radius, as HopSkipJump); a
        refused query ends it where it stands. Returns the adversarial end and the distance of
        `x` to `x0` (`dist_post_update`)."""
        dist_start = distance(x, x0, self.norm)
        if how == "linf":
            high, threshold = float(dist_start[0]), min(float(dist_start[0]) * theta, theta)
            norm: Norm = "linf"
        else:
            high, threshold, norm = 1.0, theta, "l2"
        low = 0.0
        while threshold > 0 and (high - low) / threshold > 1 and not q.done():
            mid = (high + low) / 2
            ok = adv(self._blend(x0, x, mid, norm))
            if ok is None:
                break
            high, low = (mid, low) if ok else (high, mid)
        return self._blend(x0, x, high, norm), dist_start

    @staticmethod
    def _blend(x0: Tensor, x: Tensor, alpha: float, norm: Norm) -> Tensor:
        """ℓ2: $(1 - \\alpha) x_0 + \\alpha x$; ℓ∞: `x` clipped to the box of radius α."""
        if norm == "l2":
            return ((1 - alpha) * x0 + alpha * x).clamp(0.0, 1.0)
        return torch.minimum(torch.maximum(x, x0 - alpha), x0 + alpha).clamp(0.0, 1.0)

    def _estimate(
        self,
        q: ImageQueries,
        adv: Callable[[Tensor], bool | None],
        x_t: Tensor,
        delta: float,
        k: int,
        gen: torch.Generator,
    ) -> Tensor | None:
        """The baseline-subtracted direction from the answered probes, `[1, D]`; `None` when
        none was answered."""
        flat = x_t.flatten()
        sum_u = torch.zeros_like(flat)
        sum_phi_u = torch.zeros_like(flat)
        sum_phi, got, want = 0, 0, k
        for _ in range(self.grad_attempts):
            for _ in range(want):
                if q.done():
                    break
                if self.norm == "l2":
                    u = torch.randn(flat.shape, generator=gen, dtype=WORK, device=flat.device)
                else:
                    u = torch.rand(flat.shape, generator=gen, dtype=WORK, device=flat.device)
                    u = u * 2 - 1
                probe = (flat + delta * u / u.norm()).clamp(0.0, 1.0)
                ok = adv(probe.view(x_t.shape))
                if ok is None:
                    continue
                u = (probe - flat) / delta  # the clipped direction (theirs and official)
                phi = 1 if ok else -1
                sum_u += u
                sum_phi_u += phi * u
                sum_phi += phi
                got += 1
            want = k - got
            if want == 0 or q.done():
                break
        if got == 0:
            return None
        return baseline_direction(
            sum_u.view(1, -1),
            sum_phi_u.view(1, -1),
            torch.tensor([sum_phi], device=flat.device),
            torch.tensor([got], device=flat.device),
        )
