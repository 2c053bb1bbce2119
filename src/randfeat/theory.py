"""The theory of the paper as tools: Theorem 1 (Eq. 26), gradient ratios, robustness magnitude.

Notation (paper, sections 3.3-3.5): the model splits at a layer as :math:`f = g \\circ h`; the attacker
proposes :math:`u \\sim \\mathcal{N}(0, \\mu I)` at the input; the defense adds
:math:`\\delta \\sim \\mathcal{N}(0, \\nu I)` to :math:`h(x)`; :math:`\\mathcal{L}` is the margin loss of
Eq. 3, :math:`\\mathcal{L}(f(x), y) = f_y(x) - \\max_{i \\neq y} f_i(x)`.

Theorem 1 (Eq. 26): the probability that a score-based attacker's comparison is reversed is

.. math::

    P = \\frac{1}{2} + \\frac{1}{\\pi} \\arctan\\left(-R^{-1/2}\\right), \\qquad
    R = \\frac{2\\nu \\|\\nabla_{h(x)}(\\mathcal{L} \\circ g)\\|_2^2}{\\mu \\|\\nabla_x(\\mathcal{L} \\circ f)\\|_2^2}.

Gradients come from autograd with temporary hooks at the layer (no model surgery): the model's
parameters, their ``requires_grad`` flags, their ``.grad`` and its train/eval mode are left as they
were. Per-sample gradients are taken from the gradient of the summed loss, which is exact when samples
do not interact in the forward pass (true in eval mode; batch norm in train mode couples them).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from randfeat.checks import (
    check_batch,
    check_choice,
    check_labels,
    check_nonnegative_float,
    check_positive_float,
    check_positive_int,
    check_probability,
    check_seed,
)
from randfeat.hooks import Hooks
from randfeat.layers import resolve_layers
from randfeat.losses import Loss, sample_loss
from randfeat.outputs import logits_of

__all__ = [
    "GradientNorms",
    "LayerReport",
    "LayerRow",
    "fooling_probability_from_ratio",
    "gradient_norms",
    "gradient_ratio_before_after_step",
    "layer_report",
    "monte_carlo_fooling_probability",
    "predicted_nu",
    "theorem1_fooling_probability",
]


def _check_xy(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"Expected argument `model` to be an nn.Module, but got {type(model).__name__}."
        )
    x = check_batch(x, "x")
    return x, check_labels(y, n=x.shape[0]).to(x.device)


@dataclass(frozen=True)
class GradientNorms:
    """Per-sample loss and gradient norms at the input and at each layer.

    Attributes:
        loss: ``[N]`` :math:`\\mathcal{L}(f(x), y)`.
        input: ``[N]`` :math:`\\|\\nabla_x(\\mathcal{L} \\circ f)\\|_2`.
        layers: layer key -> ``[N]`` :math:`\\|\\nabla_{h(x)}(\\mathcal{L} \\circ g)\\|_2`.
        x_grad: ``[N, ...]`` the input gradient itself (for the one-step experiment).
    """

    loss: Tensor
    input: Tensor
    layers: dict[str, Tensor]
    x_grad: Tensor

    def ratio(self, layer: str) -> Tensor:
        """``[N]`` :math:`\\|\\nabla_{h(x)}(\\mathcal{L} \\circ g)\\| / \\|\\nabla_x(\\mathcal{L} \\circ f)\\|`."""
        return self.layers[layer] / self.input


def gradient_norms(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    layers: str | Sequence[str] = ("penultimate",),
    *,
    loss: Loss = "margin",
) -> GradientNorms:
    """Loss and gradient norms at the input and at every layer, from one forward and one backward.

    Args:
        model: the classifier; it is not modified (mode, parameters, flags and ``.grad`` untouched).
        x: ``[N, ...]`` inputs.
        y: ``[N]`` labels.
        layers: layer specs as for :func:`randfeat.wrap` (``"input"`` gives the input gradient).
        loss: ``"margin"`` (Eq. 3, the default) or ``"ce"`` (log-probability of the true class).

    Raises:
        ValueError / TypeError: bad shapes or dtypes, unknown layers, a layer never reached or reached
            twice in the forward pass.
    """
    x, y = _check_xy(model, x, y)
    points = resolve_layers(model, layers)
    feats: dict[str, list[Tensor]] = {p.key: [] for p in points}

    def capture(key: str, t: object) -> Tensor:
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"The feature at {key!r} is not a floating tensor.")
        t = t.clone()
        feats[key].append(t)
        return t

    with Hooks() as hooks:
        for p in points:
            if p.key != "input":
                hooks.attach(p.module, functools.partial(capture, p.key), pre=p.where == "input")
        with torch.inference_mode(False), torch.enable_grad():
            xr = x.detach().clone().requires_grad_(True)
            logits = logits_of(model(xr))
            if logits.ndim != 2:
                raise ValueError(
                    f"Expected the model to return logits [N, K], got {tuple(logits.shape)}."
                )
            if bool((y >= logits.shape[1]).any()) or bool((y < 0).any()):
                raise ValueError(
                    f"Expected labels `y` in [0, {logits.shape[1] - 1}], got range [{int(y.min())}, {int(y.max())}]."
                )
            value = sample_loss(logits, y, loss)
            keys = [p.key for p in points if p.key != "input"]
            for k in keys:
                if len(feats[k]) != 1:
                    raise ValueError(
                        f"Layer {k!r} was reached {len(feats[k])} times in the forward pass; "
                        "gradient norms need a layer that runs exactly once."
                    )
            inputs = [xr] + [feats[k][0] for k in keys]
            grads = torch.autograd.grad(value.sum(), inputs, allow_unused=True)
    n = x.shape[0]

    def norm(g: Tensor | None) -> Tensor:
        if g is None:
            return torch.zeros(n, device=x.device)
        return g.detach().reshape(n, -1).norm(dim=1)

    gx = grads[0]
    per_layer = {k: norm(g) for k, g in zip(keys, grads[1:], strict=True)}
    if any(p.key == "input" for p in points):
        per_layer["input"] = norm(gx)
    x_grad = gx.detach() if gx is not None else torch.zeros_like(x)
    return GradientNorms(loss=value.detach(), input=norm(gx), layers=per_layer, x_grad=x_grad)


def fooling_probability_from_ratio(r: Tensor) -> Tensor:
    """Eq. 26 from the ratio :math:`R`: :math:`1/2 + \\arctan(-R^{-1/2})/\\pi` (R = 0 -> 0, R = ∞ -> 1/2)."""
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
    """Theorem 1 (Eq. 26): per-sample probability that the attacker's step is reversed.

    .. math::

        P = \\frac{1}{2} + \\frac{1}{\\pi}\\arctan\\left(-R^{-1/2}\\right),\\quad
        R = \\frac{2\\nu\\|\\nabla_{h(x)}(\\mathcal{L}\\circ g)\\|_2^2}{\\mu\\|\\nabla_x(\\mathcal{L}\\circ f)\\|_2^2}

    Args:
        model: the classifier ``f = g ∘ h``, split at ``layer``.
        x: ``[N, ...]`` inputs.
        y: ``[N]`` labels.
        layer: one layer spec (``"input"`` gives ``R = 2ν/μ``).
        nu: the defense's variance ν (≥ 0).
        mu: the attacker's proposal variance μ (> 0).
        loss: ``"margin"`` (Eq. 3) or ``"ce"``.

    Returns:
        ``[N]`` float64 probabilities in ``[0, 1/2]``.
    """
    nu_ = check_nonnegative_float(nu, "nu")
    mu_ = check_positive_float(mu, "mu")
    if not isinstance(layer, str):
        raise TypeError(f"Expected argument `layer` to be one layer spec (a str), got {layer!r}.")
    g = gradient_norms(model, x, y, [layer], loss=loss)
    key = next(iter(g.layers))
    r = 2 * nu_ * g.layers[key].double() ** 2 / (mu_ * g.input.double() ** 2)
    return fooling_probability_from_ratio(r)


def gradient_ratio_before_after_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    layers: str | Sequence[str],
    *,
    step: float,
    norm: Literal["l2", "linf"] = "linf",
    loss: Loss = "margin",
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The Figure 1 experiment: the ratio ``‖∇_h L‖ / ‖∇_x L‖`` before and after one gradient step.

    The step simulates an attacker moving toward the adversarial direction (decreasing the margin):
    ``x' = clip(x - step · sign(∇_x L))`` for ``"linf"``, ``x - step · ∇_x L / ‖∇_x L‖`` for ``"l2"``,
    clipped to ``[0, 1]``.

    Returns:
        ``(before, after)``: layer key -> ``[N]`` ratios.
    """
    step = check_positive_float(step, "step")
    norm = check_choice(norm, "norm", ("linf", "l2"))
    g0 = gradient_norms(model, x, y, layers, loss=loss)
    gx = g0.x_grad
    if norm == "linf":
        direction = gx.sign()
    else:
        direction = gx / g0.input.clamp_min(1e-12).view(-1, *([1] * (x.ndim - 1)))
    x1 = (x - step * direction).clamp(0, 1).detach()
    g1 = gradient_norms(model, x1, y, layers, loss=loss)
    return {k: g0.ratio(k) for k in g0.layers}, {k: g1.ratio(k) for k in g1.layers}


def predicted_nu(ratio: Tensor, target_drop: float, n_total: int | None = None) -> float:
    """The ν predicted to cost ``target_drop`` accuracy, from per-sample ``r_i = L_i / ‖∇_h L_i‖``.

    Linearising at the layer (Eq. 13-14), a correctly classified sample (``r_i > 0``) is misclassified
    under ``δ ~ N(0, ν I)`` with probability ``Φ(-r_i / √ν)``, so the expected drop is
    ``(1/N) Σ_{r_i > 0} Φ(-r_i / √ν)``; this solves ``drop(ν) = target_drop`` by bisection in log ν.
    (The paper's shortcut, the ``target_drop``-quantile of ``r`` squared, is the same idea without the
    Gaussian tails.)

    Args:
        ratio: ``[N]`` values of ``L / ‖∇_h L‖`` (non-positive for misclassified samples).
        target_drop: the absolute drop, in ``(0, accuracy)``.
        n_total: the data-set size N (default: ``len(ratio)``).
    """
    target_drop = check_probability(target_drop, "target_drop")
    r = ratio.double().flatten()
    n = n_total or r.numel()
    pos = r[r > 0]
    acc = pos.numel() / n
    if not (0 < target_drop < acc):
        raise ValueError(
            f"Expected argument `target_drop` in (0, {acc:.4f}) (the clean accuracy), got {target_drop!r}."
        )
    normal = torch.distributions.Normal(0.0, 1.0)

    def drop(log_nu: float) -> float:
        return float(normal.cdf(-pos / math.exp(0.5 * log_nu)).sum()) / n

    lo, hi = math.log(float(pos.min()) ** 2) - 20, math.log(float(pos.max()) ** 2) + 20
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if drop(mid) < target_drop:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-9:
            break
    return math.exp(0.5 * (lo + hi))


@dataclass(frozen=True)
class LayerRow:
    """One layer of a :class:`LayerReport`.

    Attributes:
        layer: canonical layer key.
        nu: the ν predicted to cost the target drop at this layer.
        magnitude: median over correctly classified samples of ``ν · ‖∇_h L‖²`` (the robustness
            magnitude of section 3.5 / Figure 2): the variance of the noise the defense induces on
            the loss, at equal clean-accuracy cost.
        ratio: median of ``‖∇_h L‖ / ‖∇_x L‖`` (Figure 1).
        fooling_probability: median Eq. 26 probability at that ν for ``mu`` (section 3.3).
    """

    layer: str
    nu: float
    magnitude: float
    ratio: float
    fooling_probability: float


@dataclass(frozen=True)
class LayerReport:
    """Candidate layers ranked by predicted robustness at equal clean-accuracy cost (best first)."""

    rows: tuple[LayerRow, ...]
    target_drop: float
    mu: float
    n: int

    @property
    def best(self) -> str:
        """The layer with the largest predicted robustness magnitude."""
        return self.rows[0].layer

    def to_markdown(self) -> str:
        """The report as a Markdown table."""
        lines = [
            f"Layers ranked by robustness magnitude at a {100 * self.target_drop:.1f}-point drop "
            f"({self.n} images, μ = {self.mu:g}):",
            "",
            "| rank | layer | predicted ν | magnitude ν‖∇_h L‖² | ‖∇_h L‖/‖∇_x L‖ | Eq. 26 P |",
            "|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(self.rows, 1):
            lines.append(
                f"| {i} | {r.layer} | {r.nu:.4g} | {r.magnitude:.4g} | {r.ratio:.4g} | {r.fooling_probability:.3f} |"
            )
        return "\n".join(lines)


def _default_layers(model: nn.Module) -> list[str]:
    from randfeat.layers import find_classifier

    try:
        clf, _ = find_classifier(model)
    except ValueError:
        clf = None
    kids = [n for n, _ in model.named_children() if n != clf]
    return ["input", *kids, "penultimate"] if clf else ["input", *kids]


def layer_report(
    model: nn.Module,
    data: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]],
    layers: Sequence[str] | None = None,
    target_drop: float = 0.01,
    *,
    mu: float = 1e-4,
    loss: Loss = "margin",
) -> LayerReport:
    """Rank candidate layers by the robustness they are predicted to give at equal accuracy cost.

    For each layer: the ν predicted to cost ``target_drop`` (:func:`predicted_nu`), the median
    robustness magnitude ``ν‖∇_h L‖²`` over correctly classified samples (section 3.5, Figure 2), the
    median gradient-norm ratio and the median Eq. 26 probability at that ν for proposals of variance
    ``mu``. No attack is run. Layers where the magnitude is larger are better places for the noise.

    Args:
        model: the classifier (eval mode recommended).
        data: an ``(x, y)`` pair or an iterable of batches.
        layers: layer specs (default: ``"input"``, the model's direct children and ``"penultimate"``).
        target_drop: the clean-accuracy cost at which layers are compared.
        mu: the attacker's proposal variance for the Eq. 26 column.
        loss: ``"margin"`` or ``"ce"``.
    """
    mu_ = check_positive_float(mu, "mu")
    specs = list(layers) if layers is not None else _default_layers(model)
    batches = [data] if isinstance(data, tuple) else data
    acc: dict[str, list[Tensor]] = {}
    loss_all: list[Tensor] = []
    inp: list[Tensor] = []
    for xb, yb in batches:
        g = gradient_norms(model, xb, yb, specs, loss=loss)
        loss_all.append(g.loss)
        inp.append(g.input)
        for k, v in g.layers.items():
            acc.setdefault(k, []).append(v)
    if not loss_all:
        raise ValueError("Expected argument `data` to hold at least one batch, but it was empty.")
    value = torch.cat(loss_all).double()
    gin = torch.cat(inp).double()
    correct = value > 0
    rows = []
    for k, parts in acc.items():
        gh = torch.cat(parts).double()
        ratio = torch.where(gh > 0, value / gh.clamp_min(1e-300), torch.full_like(value, math.inf))
        ratio = torch.where(correct, ratio, torch.zeros_like(ratio))
        nu = predicted_nu(ratio, target_drop, n_total=value.numel())
        mag = nu * gh[correct] ** 2
        p = fooling_probability_from_ratio(2 * nu * gh[correct] ** 2 / (mu_ * gin[correct] ** 2))
        rows.append(
            LayerRow(
                layer=k,
                nu=nu,
                magnitude=float(mag.median()),
                ratio=float((gh[correct] / gin[correct]).median()),
                fooling_probability=float(p.median()),
            )
        )
    rows.sort(key=lambda r: -r.magnitude)
    return LayerReport(rows=tuple(rows), target_drop=target_drop, mu=mu_, n=value.numel())


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

    For each sample, draws ``u ~ N(0, μI)`` at the input and independent ``δ1, δ2 ~ N(0, νI)`` at
    ``layer`` and counts how often the noisy loss difference
    ``L(g(h(x+u)+δ1)) - L(g(h(x)+δ2))`` has the opposite sign of the clean one ``L(f(x+u)) - L(f(x))``.

    Returns:
        ``(p, se)``: ``[N]`` estimated probabilities and their binomial standard errors.
    """
    from randfeat.wrapper import wrap  # local: theory needs the wrapper only for this check

    nu_ = check_nonnegative_float(nu, "nu")
    mu_ = check_positive_float(mu, "mu")
    samples = check_positive_int(samples, "samples")
    seed = check_seed(seed)
    x, y = _check_xy(model, x, y)
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
