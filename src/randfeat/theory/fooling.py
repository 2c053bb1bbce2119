r"""Theorem 1 (Eq. 26): the probability that the defense reverses an attacker's comparison.

With the model split at a layer as $f = g \circ h$, proposals $u \sim \mathcal{N}(0, \mu I)$ at
the input and the defense's noise $\delta \sim \mathcal{N}(0, \nu I)$ on $h(x)$:

$$
P = \frac{1}{2} + \frac{1}{\pi} \arctan\left(-R^{-1/2}\right), \qquad
R = \frac{2\nu \|\nabla_{h(x)}(\mathcal{L} \circ g)\|_2^2}{\mu \|\nabla_x(\mathcal{L} \circ f)\|_2^2}.
$$

The Monte-Carlo estimate of the probability of Eq. 15 checks it on a real model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from randfeat.checks import (
    check_nonnegative_float,
    check_positive_float,
    check_positive_int,
    check_seed,
)
from randfeat.losses import Loss, sample_loss
from randfeat.outputs import logits_of
from randfeat.theory.gradients import check_inputs, gradient_norms
from randfeat.wrapper import wrap

__all__ = [
    "fooling_probability_from_ratio",
    "monte_carlo_fooling_probability",
    "theorem1_fooling_probability",
]


def fooling_probability_from_ratio(r: Tensor) -> Tensor:
    r"""Eq. 26 from the ratio $R$: $1/2 + \arctan(-R^{-1/2})/\pi$ (R = 0 -> 0, R = ∞ -> 1/2)."""
    r = r.double()
    return 0.5 + torch.atan(-torch.rsqrt(r)) / math.pi


def theorem1_fooling_probability(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    layer: str = "penultimate",
    *,
    nu: float,
    mu: float,
    loss: Loss = "margin",
) -> Tensor:
    r"""Theorem 1 (Eq. 26): per-sample probability that the attacker's step is reversed.

    $$
    P = \frac{1}{2} + \frac{1}{\pi}\arctan\left(-R^{-1/2}\right),\quad
    R = \frac{2\nu\|\nabla_{h(x)}(\mathcal{L}\circ g)\|_2^2}{\mu\|\nabla_x(\mathcal{L}\circ f)\|_2^2}
    $$

    Args:
        model: the classifier `f = g ∘ h`, split at `layer`.
        x: `[N, ...]` inputs.
        y: `[N]` labels.
        layer: one layer spec (`"input"` gives `R = 2ν/μ`).
        nu: the defense's variance ν (≥ 0).
        mu: the attacker's proposal variance μ (> 0).
        loss: `"margin"` (Eq. 3) or `"ce"`.

    Returns:
        `[N]` float64 probabilities in `[0, 1/2]`.
    """
    nu_ = check_nonnegative_float(nu, "nu")
    mu_ = check_positive_float(mu, "mu")
    if not isinstance(layer, str):
        raise TypeError(f"Expected argument `layer` to be one layer spec (a str), got {layer!r}.")
    g = gradient_norms(model, x, y, [layer], loss=loss)
    key = next(iter(g.layers))
    r = 2 * nu_ * g.layers[key].double() ** 2 / (mu_ * g.input.double() ** 2)
    return fooling_probability_from_ratio(r)


def monte_carlo_fooling_probability(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    layer: str = "penultimate",
    *,
    nu: float,
    mu: float,
    samples: int = 1000,
    seed: int | None = None,
    loss: Loss = "margin",
) -> tuple[Tensor, Tensor]:
    """Monte-Carlo estimate of the probability of Eq. 15, to check Theorem 1 on a real model.

    For each sample, draws `u ~ N(0, μI)` at the input and independent `δ1, δ2 ~ N(0, νI)` at
    `layer` and counts how often the noisy loss difference
    `L(g(h(x+u)+δ1)) - L(g(h(x)+δ2))` has the opposite sign of the clean one `L(f(x+u)) - L(f(x))`.

    Returns:
        `(p, se)`: `[N]` estimated probabilities and their binomial standard errors.
    """
    nu_ = check_nonnegative_float(nu, "nu")
    mu_ = check_positive_float(mu, "mu")
    samples = check_positive_int(samples, "samples")
    seed = check_seed(seed)
    x, y = check_inputs(model, x, y)
    n = x.shape[0]
    gen = torch.Generator(device=x.device)
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    defended = wrap(
        model,
        [layer],
        nu=nu_,
        seed=int(torch.randint(0, 2**62, (1,), generator=gen, device=x.device)),
    )
    rep = x.repeat_interleave(samples, dim=0)
    yr = y.repeat_interleave(samples)
    u = torch.randn(rep.shape, generator=gen, device=x.device, dtype=x.dtype) * math.sqrt(mu_)
    try:
        with torch.no_grad():
            clean_u = sample_loss(logits_of(model(rep + u)), yr, loss)
            clean_0 = sample_loss(logits_of(model(x)), y, loss).repeat_interleave(samples)
            noisy_u = sample_loss(logits_of(defended(rep + u)), yr, loss)
            noisy_0 = sample_loss(logits_of(defended(rep)), yr, loss)
    finally:
        defended.unwrap()
    flipped = ((noisy_u - noisy_0) * (clean_u - clean_0) < 0).view(n, samples).double()
    p = flipped.mean(dim=1)
    se = (p * (1 - p) / samples).sqrt()
    return p, se
