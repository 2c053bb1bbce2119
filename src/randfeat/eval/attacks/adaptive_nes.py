"""The adaptive NES of Feng et al.: the detector's rejection used as an oracle.

Feng, Hooda, Mangaokar, Fawaz, Jha and Prakash, "Stateful Defenses for Machine Learning Models Are
Not Yet Secure Against Black-box Attacks", CCS 2023 (OARS). Written after their code
(`nmangaokar/ccs_23_oars_stateful_attacks`, `attacks/adaptive/NESScore.py`:
`binary_search_gradient_estimation_variance`, `binary_search_minimum_step_size`,
`estimate_gradient`, `attack_untargeted`, and the NES configurations under `configs/`), itself
the NES of Ilyas, Engstrom, Athalye and Lin (ICML 2018) with momentum and plateau annealing.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from randfeat.checks import check_int, check_positive_float, check_probability, expected
from randfeat.eval.attacks.base import OracleAttack, linf_bounds, project
from randfeat.eval.attacks.stateful import (
    Banned,
    Blinding,
    ImageQueries,
    check_blinding,
    check_bounds,
    check_search,
    rate_search,
)
from randfeat.eval.oracle import Norm, Oracle
from randfeat.losses import margin_loss

__all__ = ["AdaptiveNES"]

logger = logging.getLogger(__name__)


class AdaptiveNES(OracleAttack):
    r"""NES against a stateful detector, after Feng et al. (OARS, CCS 2023).

    Each image is attacked on its own, one image per model call (as in their code). For image
    $x_0$:

    1. one query of $x_0$ (their `loss_orig`); a random start $x \sim U(B_\varepsilon(x_0))$ (ℓ∞:
       uniform per pixel; ℓ2: a random direction of length $U(0, 1)\,\varepsilon$), not queried;
    2. the probe scale σ (their "variance", a per-pixel standard deviation): a binary search
       on `sigma_range` (theirs $[0.01, 0.5]$), `sigma_steps` (10) halvings of `sigma_samples`
       (20) probes $\mathrm{clip}(x_0 + \sigma u)$, $u \sim \mathcal N(0, I)$; the smallest σ
       tried whose probes were refused at a rate $\le$ `sigma_rate` (0.05) is kept;
    3. the minimum step $\eta_{\min}$: the same search on `step_range` (theirs
       $[5 \cdot 10^{-5}, 0.1]$ at ε = 0.05: $[0.001\,\varepsilon, 2\,\varepsilon]$) with
       probes $x_0 + \eta s$, $s$ random signs (ℓ2: $s / \lVert s \rVert_2$), target
       `step_rate` (0.13);
    4. NES: the antithetic estimate $\hat g = \frac{1}{k}\sum_i [\mathcal L(x + \sigma u_i)
       u_i - \mathcal L(x - \sigma u_i) u_i]$ from `samples` (50) probes; a pair with a
       refused probe is dropped and the missing directions are drawn again, at most
       `grad_attempts` (5) rounds, a partial estimate accepted (zero directions give the
       image up); momentum 0.9 (not on a retried step); plateau annealing of the step η
       (halved, down to `min_lr`, when the mean probe loss rose over `plateau_length` (5)
       estimates); $\eta \leftarrow \max(\eta, \eta_{\min})$; the step
       $x \leftarrow \Pi(x - \eta \operatorname{sign}(\hat g))$ (ℓ2: $\hat g / \lVert \hat g
       \rVert_2$), queried; a refused step is undone and retried with a fresh estimate, at
       most `step_attempts` (5) sends in a row before the image is given up.

    Every probe of the searches and every refused query is a real query, charged by the oracle;
    any answered query can fool the model (the oracle judges the point it was sent). A ban
    (`key_banned`) ends the whole attack. Without detection both searches end at their lower
    ends (σ near 0.01, $\eta_{\min}$ near $0.001\,\varepsilon$) after
    `sigma_steps · sigma_samples + step_steps · step_samples` (400) queries.
    `search=False` skips them (σ = `sigma`, no minimum step).

    Defaults are the most common of their adaptive NES configurations (CIFAR-10, ImageNet,
    CelebA-HQ against Blacklight and PIHA: σ search $[0.01, 0.5]$ at 5%, step search at 13%,
    5 and 5 attempts); the NES settings (50 probes, η = 0.01 = 0.2 ε, `min_lr` = 5e-5 =
    0.001 ε, momentum 0.9, plateau 5, drop 2) are theirs at ε = 0.05, as fractions of ε.

    Deviations from their code: the loss is the margin $f_y - \max_{i \ne y} f_i$ of the
    model's scores, descended (theirs: cross-entropy of probabilities, ascended), as the other
    score attacks here; probes are clipped to $[0, 1]$ (the oracle answers only images); the
    ℓ2 variant (theirs is ℓ∞ only) steps along $\hat g / \lVert \hat g \rVert_2$ and projects
    onto the ℓ2 ball; the budget is `oracle.n_calls` per image (theirs a query count with
    `max_iter`); the point returned for an image not fooled is its last answered iterate
    (theirs returns the iterate).

    Args:
        eps: radius ε of the threat ball.
        norm: `"linf"` or `"l2"`.
        samples: probes per gradient estimate, even (`samples / 2` antithetic pairs).
        lr: the initial step η (default `0.2 ε`).
        min_lr: the floor of the plateau annealing (default `0.001 ε`).
        momentum: the weight of the previous estimate.
        plateau_length: estimates in the plateau window.
        plateau_drop: the divisor of η on a plateau.
        sigma: the probe scale without the search.
        sigma_range: the σ search range.
        sigma_steps: the sigma search's halvings.
        sigma_samples: its probes per halving.
        sigma_rate: its target refusal rate.
        step_range: the minimum-step search range (default $[0.001\,\varepsilon, 2\,\varepsilon]$).
        step_steps: the step search's halvings.
        step_samples: its probes per halving.
        step_rate: its target refusal rate.
        grad_attempts: rounds of redrawing refused directions per estimate (`>= 1`).
        step_attempts: sends of one step before the image is given up (`>= 1`).
        search: run the two searches.
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
        norm: Norm = "linf",
        samples: int = 50,
        lr: float | None = None,
        *,
        min_lr: float | None = None,
        momentum: float = 0.9,
        plateau_length: int = 5,
        plateau_drop: float = 2.0,
        sigma: float = 0.001,
        sigma_range: tuple[float, float] = (0.01, 0.5),
        sigma_steps: int = 10,
        sigma_samples: int = 20,
        sigma_rate: float = 0.05,
        step_range: tuple[float, float] | None = None,
        step_steps: int = 10,
        step_samples: int = 20,
        step_rate: float = 0.13,
        grad_attempts: int = 5,
        step_attempts: int = 5,
        search: bool = True,
        blind: bool | Blinding = False,
    ) -> None:
        super().__init__(eps, norm)
        self.samples = check_int(samples, "samples", low=2, high=10**6)
        if self.samples % 2:
            raise ValueError(expected("samples", "an even int >= 2 (antithetic pairs)", samples))
        self.lr = 0.2 * self.eps if lr is None else check_positive_float(lr, "lr")
        self.min_lr = 0.001 * self.eps if min_lr is None else check_positive_float(min_lr, "min_lr")
        self.momentum = check_probability(momentum, "momentum", allow_zero=True)
        self.plateau_length = check_int(plateau_length, "plateau_length", low=1, high=10**6)
        self.plateau_drop = check_positive_float(plateau_drop, "plateau_drop")
        self.sigma = check_positive_float(sigma, "sigma")
        self.sigma_range = check_bounds(sigma_range, "sigma_range")
        self.sigma_steps, self.sigma_samples, self.sigma_rate = check_search(
            sigma_steps, sigma_samples, sigma_rate, "sigma"
        )
        default_range = (0.001 * self.eps, 2.0 * self.eps)
        self.step_range = check_bounds(step_range or default_range, "step_range")
        self.step_steps, self.step_samples, self.step_rate = check_search(
            step_steps, step_samples, step_rate, "step"
        )
        self.grad_attempts = check_int(grad_attempts, "grad_attempts", low=1, high=10**6)
        self.step_attempts = check_int(step_attempts, "step_attempts", low=1, high=10**9)
        if not isinstance(search, bool):
            raise TypeError(expected("search", "a bool", search))
        self.search = search
        self.blind = check_blinding(blind)

    # ------------------------------------------------------------------ the loop
    def _attack(self, oracle: Oracle, generator: torch.Generator) -> Tensor:
        x0 = oracle.x0
        x_last = x0.clone()
        try:
            for i in range(x0.shape[0]):
                q = ImageQueries(oracle, i, generator, self.blind)
                x_last[i] = self._attack_one(q, generator)[0]
        except Banned:
            logger.info("AdaptiveNES: the account is banned; the attack ends")
        return x_last

    def _project(self, x: Tensor, x0: Tensor, box: tuple[Tensor, Tensor]) -> Tensor:
        return x.clamp(*box) if self.norm == "linf" else project(x, x0, self.eps, self.norm)

    def _attack_one(self, q: ImageQueries, gen: torch.Generator) -> Tensor:
        """Steps 1-4 of the class docstring; returns the last answered iterate (as sent)."""
        x0, eps = q.x0, self.eps
        box = linf_bounds(x0, eps) if self.norm == "linf" else (x0, x0)
        kept = x0
        if q.done():
            return kept
        first = q.ask(x0)  # their loss_orig: one query of the clean image
        if first is not None:
            kept = first[1]
        # 1. the random start (not queried)
        if self.norm == "linf":
            noise = (torch.rand(x0.shape, generator=gen, device=x0.device) * 2 - 1) * eps
        else:
            u = torch.randn(x0.shape, generator=gen, device=x0.device)
            r = torch.rand((), generator=gen, device=x0.device)
            noise = u / u.norm().clamp_min(1e-12) * eps * r
        x = self._project(x0 + noise.to(x0.dtype), x0, box)

        # 2-3. the searches
        def gauss(s: float) -> bool:
            u = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
            return q.ask(x0 + s * u) is None

        def signs(s: float) -> bool:
            b = torch.rand(x0.shape, generator=gen, device=x0.device) < 0.5
            d = torch.where(b, -1.0, 1.0).to(x0.dtype)
            if self.norm == "l2":
                d = d / d.norm()
            return q.ask(x0 + s * d) is None

        if self.search:
            sigma = rate_search(
                self.sigma_range,
                self.sigma_steps,
                self.sigma_samples,
                self.sigma_rate,
                gauss,
                q.done,
            )
            min_step = rate_search(
                self.step_range, self.step_steps, self.step_samples, self.step_rate, signs, q.done
            )
        else:
            sigma, min_step = self.sigma, 0.0
        logger.debug("AdaptiveNES: image %d: sigma %.4g, min step %.4g", q.i, sigma, min_step)
        # 4. NES with momentum, plateau annealing, retries
        lr, prev, attempts = self.lr, None, 0
        history: list[float] = []
        while not q.done():
            est = self._estimate(q, x, sigma, gen)
            if est is None:
                logger.debug("AdaptiveNES: image %d: gradient estimation failure", q.i)
                break
            avg, g = est
            if attempts == 0 and prev is not None:
                g = self.momentum * prev + (1 - self.momentum) * g
            prev = g
            history = [*history, avg][-self.plateau_length :]
            if len(history) == self.plateau_length and history[-1] > history[0]:
                if lr > self.min_lr:
                    lr = max(lr / self.plateau_drop, self.min_lr)
                history = []
            lr = max(lr, min_step)
            if self.norm == "linf":
                direction = g.sign()
            else:
                direction = g / g.norm().clamp_min(torch.finfo(g.dtype).tiny)
            cand = self._project(x - lr * direction, x0, box)
            if q.done():
                break
            attempts += 1
            out = q.ask(cand)
            if out is None:
                if attempts >= self.step_attempts:
                    logger.debug("AdaptiveNES: image %d: step movement failure", q.i)
                    break
                continue
            attempts = 0
            x, kept = cand, out[1]
        return kept

    def _estimate(
        self, q: ImageQueries, x: Tensor, sigma: float, gen: torch.Generator
    ) -> tuple[float, Tensor] | None:
        """Their `estimate_gradient`: the mean probe loss and the antithetic estimate at `x`,
        from the pairs whose two probes were answered; `None` when none was."""
        g = torch.zeros_like(x)
        losses: list[float] = []
        want = self.samples
        for _ in range(self.grad_attempts):
            for _ in range(want // 2):
                if q.done():
                    break
                u = sigma * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
                plus = q.ask(x + u)
                if plus is None or q.done():
                    continue
                minus = q.ask(x - u)
                if minus is None:
                    continue
                lp = float(margin_loss(plus[0], q.y)[0])
                lm = float(margin_loss(minus[0], q.y)[0])
                losses += [lp, lm]
                g += (lp - lm) * u
            want = self.samples - len(losses)
            if want < 2 or q.done():
                break
        if not losses:
            return None
        return sum(losses) / len(losses), g / len(losses)
