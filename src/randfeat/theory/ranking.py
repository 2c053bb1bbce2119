r"""Layers ranked by the robustness they are predicted to give at equal clean-accuracy cost (§3.5).

For each candidate layer: the ν predicted to cost a target drop (linearising at the layer, Eq.
13–14), the robustness magnitude $\nu \|\nabla_h \mathcal{L}\|^2$ (Figure 2), the gradient-norm ratio
(Figure 1) and the Eq. 26 probability at that ν. No attack is run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from randfeat.checks import check_positive_float, check_probability
from randfeat.layers import find_classifier
from randfeat.losses import Loss
from randfeat.theory.fooling import fooling_probability_from_ratio
from randfeat.theory.gradients import gradient_norms

__all__ = ["LayerReport", "LayerRow", "layer_report", "predicted_nu"]


def predicted_nu(ratio: Tensor, target_drop: float, n_total: int | None = None) -> float:
    """The ν predicted to cost `target_drop` accuracy, from per-sample `r_i = L_i / ‖∇_h L_i‖`.

    Linearising at the layer (Eq. 13-14), a correctly classified sample (`r_i > 0`) is misclassified
    under `δ ~ N(0, ν I)` with probability `Φ(-r_i / √ν)`, so the expected drop is
    `(1/N) Σ_{r_i > 0} Φ(-r_i / √ν)`; this solves `drop(ν) = target_drop` by bisection in log ν.
    (The paper's shortcut, the `target_drop`-quantile of `r` squared, is the same idea without the
    Gaussian tails.)

    Args:
        ratio: `[N]` values of `L / ‖∇_h L‖` (non-positive for misclassified samples).
        target_drop: the absolute drop, in `(0, accuracy)`.
        n_total: the data-set size N (default: `len(ratio)`).
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
    """One layer of a [`LayerReport`][randfeat.theory.ranking.LayerReport].

    Attributes:
        layer: canonical layer key.
        nu: the ν predicted to cost the target drop at this layer.
        magnitude: median over correctly classified samples of `ν · ‖∇_h L‖²` (the robustness
            magnitude of section 3.5 / Figure 2): the variance of the noise the defense induces on
            the loss, at equal clean-accuracy cost.
        ratio: median of `‖∇_h L‖ / ‖∇_x L‖` (Figure 1).
        fooling_probability: median Eq. 26 probability at that ν for `mu` (section 3.3).
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

    For each layer: the ν predicted to cost `target_drop` ([`predicted_nu`][randfeat.theory.ranking.predicted_nu]), the median
    robustness magnitude `ν‖∇_h L‖²` over correctly classified samples (section 3.5, Figure 2), the
    median gradient-norm ratio and the median Eq. 26 probability at that ν for proposals of variance
    `mu`. No attack is run. Layers where the magnitude is larger are better places for the noise.

    Args:
        model: the classifier (eval mode recommended).
        data: an `(x, y)` pair or an iterable of batches.
        layers: layer specs (default: `"input"`, the model's direct children and `"penultimate"`).
        target_drop: the clean-accuracy cost at which layers are compared.
        mu: the attacker's proposal variance for the Eq. 26 column.
        loss: `"margin"` or `"ce"`.
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
