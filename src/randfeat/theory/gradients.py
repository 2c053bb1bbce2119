"""Gradient norms at the input and at any layer (paper §3.3–3.5, Figure 1), from one backward.

Gradients come from autograd with temporary hooks at the layer (no model surgery): the model's
parameters, their `requires_grad` flags, their `.grad` and its train/eval mode are left as they
were. Per-sample gradients are taken from the gradient of the summed loss, which is exact when samples
do not interact in the forward pass (true in eval mode; batch norm in train mode couples them).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from randfeat.checks import check_batch, check_choice, check_labels, check_positive_float
from randfeat.hooks import Hooks
from randfeat.layers import resolve_layers
from randfeat.losses import Loss, sample_loss
from randfeat.outputs import logits_of

__all__ = ["GradientNorms", "check_inputs", "gradient_norms", "gradient_ratio_before_after_step"]


def check_inputs(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Check the model, a float batch `x: [N, ...]` and labels `y: [N]`; return `(x, y)` (y as int64 on x's device)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"Expected argument `model` to be an nn.Module, but got {type(model).__name__}."
        )
    x = check_batch(x, "x")
    return x, check_labels(y, n=x.shape[0]).to(x.device)


@dataclass(frozen=True)
class GradientNorms:
    r"""Per-sample loss and gradient norms at the input and at each layer.

    Attributes:
        loss: `[N]` $\mathcal{L}(f(x), y)$.
        input: `[N]` $\|\nabla_x(\mathcal{L} \circ f)\|_2$.
        layers: layer key -> `[N]` $\|\nabla_{h(x)}(\mathcal{L} \circ g)\|_2$.
        x_grad: `[N, ...]` the input gradient itself (for the one-step experiment).
    """

    loss: Tensor
    input: Tensor
    layers: dict[str, Tensor]
    x_grad: Tensor

    def ratio(self, layer: str) -> Tensor:
        r"""`[N]` $\|\nabla_{h(x)}(\mathcal{L} \circ g)\| / \|\nabla_x(\mathcal{L} \circ f)\|$."""
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
        model: the classifier; it is not modified (mode, parameters, flags and `.grad` untouched).
        x: `[N, ...]` inputs.
        y: `[N]` labels.
        layers: layer specs as for [`randfeat.wrap`][randfeat.wrap] (`"input"` gives the input gradient).
        loss: `"margin"` (Eq. 3, the default) or `"ce"` (log-probability of the true class).

    Raises:
        ValueError / TypeError: bad shapes or dtypes, unknown layers, a layer never reached or reached
            twice in the forward pass.
    """
    x, y = check_inputs(model, x, y)
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
    """The Figure 1 experiment: the ratio `‖∇_h L‖ / ‖∇_x L‖` before and after one gradient step.

    The step simulates an attacker moving toward the adversarial direction (decreasing the margin):
    `x' = clip(x - step · sign(∇_x L))` for `"linf"`, `x - step · ∇_x L / ‖∇_x L‖` for `"l2"`,
    clipped to `[0, 1]`.

    Returns:
        `(before, after)`: layer key -> `[N]` ratios.
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
