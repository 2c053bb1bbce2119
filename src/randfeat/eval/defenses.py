"""Baseline defenses against query-based attacks: AAA and RND.

* **AAA** (Adversarial Attack on Attackers; Chen, Huang, Tao, Wu, Xie, Huang, NeurIPS 2022,
  "Adversarial Attack on Attackers: Post-Process to Mitigate Black-Box Score-Based Query Attacks").
  A post-processing of the logits of every query: the predicted label is kept, but the top-1 margin
  is moved so that, inside each "attractor" interval of width τ, the reported margin falls when the
  true margin rises. A score-based attacker that follows the reported loss is led the wrong way.
  Official code: `Sizhe-Chen/AAA` (`victim.py`: `AAALinear`, `AAASine`; `square.py`: the
  run path and its defaults). See `AAA`.
* **RND** (Random Noise Defense; Qin, Fan, Zha, Wu, NeurIPS 2021, "Random Noise Defense Against
  Query-Based Black-Box Attacks"): Gaussian noise added to every query's input. In randfeat it is
  the randomized feature defense at the layer `"input"`: see `rnd`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from randfeat.checks import (
    check_choice,
    check_float,
    check_nonnegative_float,
    check_positive_float,
    check_positive_int,
)

if TYPE_CHECKING:
    from randfeat.wrapper import RandomizedFeatureWrapper

__all__ = ["AAA", "aaa_logits", "rnd"]

Variant = Literal["linear", "sine"]

# The sine variant's amplitude, as a fraction of τ (official `AAASine.forward`: 0.7 * interval).
_SINE_AMPLITUDE = 0.7


def _validate_aaa(
    tau: float,
    dev: float,
    kappa: float,
    beta: float,
    steps: int,
    lr: float,
    temperature: float,
    variant: str,
) -> tuple[float, float, float, float, int, float, float, Variant]:
    return (
        check_positive_float(tau, "tau"),
        check_float(dev, "dev"),
        check_nonnegative_float(kappa, "kappa"),
        check_nonnegative_float(beta, "beta"),
        check_positive_int(steps, "steps"),
        check_positive_float(lr, "lr"),
        check_positive_float(temperature, "temperature"),
        check_choice(variant, "variant", ("linear", "sine")),
    )


def _target_margin(m0: Tensor, tau: float, dev: float, kappa: float, variant: Variant) -> Tensor:
    """The margin AAA reports for the true top-1 margin `m0: [N]` (official formulas)."""
    # Attractor of m0's interval: (round(m0/τ + dev) - dev)·τ. With dev = 0.5 the attractors sit
    # at τ/2 + kτ. torch.round rounds half to even, exactly as the official code.
    attractor = (torch.round(m0 / tau + dev) - dev) * tau
    if variant == "linear":
        # Reflect about the attractor (κ = 1): the loss trend is reversed inside each interval.
        return attractor - kappa * (m0 - attractor)
    phase = (1.0 - 2.0 / tau * (m0 - attractor)) * math.pi
    return m0 - _SINE_AMPLITUDE * tau * torch.sin(phase)


def _loss_grad(z: Tensor, c1: Tensor, target: Tensor, p0: Tensor, beta: float) -> Tensor:
    """Gradient of the per-row AAA loss, summed over rows, with respect to `z: [N, K]`.

    The loss of a row is `|z_(1) - z_(2) - t| + β |softmax(z)_{c1} - p0|`. Its gradient is what
    autograd gives (the test suite checks it against autograd): `sign(z_(1) - z_(2) - t)` at the
    current top-1 index, minus it at the top-2 index (`topk`'s indices), plus
    `β sign(p_c - p0) p_c (e_c - p)` from the softmax (`sign(0) = 0`, as `abs`'s backward).
    """
    p = F.softmax(z, dim=1)
    p_c = p.gather(1, c1)
    values, index = z.topk(2, dim=1)
    s_m = torch.sign(values[:, :1] - values[:, 1:] - target)
    coef = beta * torch.sign(p_c - p0) * p_c
    grad = p * -coef
    grad.scatter_add_(1, c1, coef)
    grad.scatter_add_(1, index, torch.cat([s_m, -s_m], dim=1))
    return grad


def _adam_step(
    z: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, lr: float
) -> None:
    """One in-place step of `torch.optim.Adam` with its defaults (β 0.9, 0.999; ε 1e-8).

    The same arithmetic, in the same order, as torch's single-tensor Adam.
    """
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    z.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def aaa_logits(
    logits: Tensor,
    *,
    tau: float = 6.0,
    dev: float = 0.5,
    kappa: float = 1.0,
    beta: float = 5.0,
    steps: int = 100,
    lr: float = 0.1,
    temperature: float = 1.0,
    variant: Variant = "linear",
) -> Tensor:
    r"""AAA's post-processing of a batch of logits (the defense without the model).

    With $z^0$ the clean logits of a row, $c_1 = \arg\max_i z^0_i$, the top-1
    margin $m_0 = z^0_{(1)} - z^0_{(2)}$ and the confidence
    $p_0 = \max_i \mathrm{softmax}(z^0/T)_i$:

    $$
    a = \big(\mathrm{round}(m_0/\tau + \mathrm{dev}) - \mathrm{dev}\big)\,\tau, \qquad
    t = a - \kappa\,(m_0 - a) \quad\text{(linear)}, \qquad
    t = m_0 - 0.7\,\tau \sin\!\big((1 - 2 (m_0 - a)/\tau)\,\pi\big) \quad\text{(sine)},
    $$

    then `steps` Adam steps (learning rate `lr`) on $z$ from $z^0$ minimise

    $$
    L(z) = \big|\, z_{(1)} - z_{(2)} - t \,\big|
           + \beta\, \big|\, \mathrm{softmax}(z)_{c_1} - p_0 \,\big|,
    $$

    where $z_{(1)} - z_{(2)}$ is the top-1 minus runner-up of the *current* $z$.

    Args:
        logits: `[N, K]` float logits. Not modified.
        tau: attractor interval τ (official run path: 6).
        dev: attractor offset (official: 0.5, attractors at τ/2 + kτ).
        kappa: reverse step κ of the linear variant (official: 1); unused by `"sine"`.
        beta: weight β of the calibration term (official: 5).
        steps: Adam steps (official: 100).
        lr: Adam learning rate (official: 0.1).
        temperature: T of the calibration target $p_0$ (official run path: 1).
        variant: `"linear"` (`AAALinear`) or `"sine"` (`AAASine`).

    Returns:
        `[N, K]` reshaped logits, detached, in `logits`' dtype and device, with
        `argmax` per row equal to `logits.argmax(dim=1)` (guaranteed, see below).

    Raises:
        TypeError / ValueError: on a bad hyperparameter or logits that are not `[N, K]` floats.

    The official code gets the gradient of $L$ from autograd and steps
    `torch.optim.Adam`; here both are written out (`_loss_grad`, `_adam_step`),
    with the same arithmetic (checked against autograd + `torch.optim.Adam` in the tests). That
    is about 2.5x faster on small batches (no graph, no optimizer object) and needs no autograd, so
    it runs unchanged under `torch.no_grad()` and `torch.inference_mode()`.

    Departures from the official code (`victim.py`), each deliberate:

    * **Loss summed, not averaged, over the batch**, so that each row's output is the official
      result for that row alone (the official code at batch size 1) and does not depend on the
      other rows of the batch (the oracle and users split batches freely). The official output
      does depend on its batch: the loss is a batch mean, and Adam's ε = 1e-8 is then comparable
      to the tiny calibration gradients of low logits, which barely move in a batch of 128 but
      move by up to `lr` per step alone. On random logits (K = 10, scale 4) the official margins
      at batch sizes 8 to 128 differ from the batch-of-one margins by up to 0.3-0.5.
    * **The label is enforced.** The official code only monitors `prd_maintain_rate`. Here, after
      every step, each row whose iterate still has `argmax == c_1` (in the output dtype, finite)
      is remembered; the returned row is the final iterate where it keeps the label, else the last
      iterate that did (at worst the original logits, iterate 0).
    * $c_1$ is `argmax` of the original logits (first index on ties); the official code
      uses the `topk` index, which may differ on exact ties.
    * Rows with a non-finite logit, `K = 1` (no runner-up) and empty batches are returned
      unchanged (a copy). Half-precision logits are optimised in float32 and cast back.
    """
    tau, dev, kappa, beta, steps, lr, temperature, variant = _validate_aaa(
        tau, dev, kappa, beta, steps, lr, temperature, variant
    )
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(
            f"Expected argument `logits` to be a float tensor [N, K], but got "
            f"{getattr(logits, 'dtype', type(logits))!r}."
        )
    if logits.ndim != 2:
        raise ValueError(
            f"Expected argument `logits` to have shape [N, K], but got {tuple(logits.shape)}."
        )
    out_dtype = logits.dtype
    work = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float32
    with torch.no_grad():
        # A fresh tensor: the caller's logits stay untouched (and may be inference tensors).
        orig = logits.detach().clone()
        n, k = orig.shape
        if n == 0 or k < 2:
            return orig
        z0_raw = orig.to(work)
        finite = torch.isfinite(z0_raw).all(dim=1, keepdim=True)
        z = torch.where(finite, z0_raw, torch.zeros_like(z0_raw))
        c1 = z0_raw.argmax(dim=1, keepdim=True)  # [N, 1]
        top = z.topk(2, dim=1).values
        target = _target_margin(top[:, 0] - top[:, 1], tau, dev, kappa, variant).unsqueeze(1)
        p0 = F.softmax(z / temperature, dim=1).gather(1, c1)  # [N, 1]
        best = z.clone()
        exp_avg = torch.zeros_like(z)
        exp_avg_sq = torch.zeros_like(z)
        for step in range(1, steps + 1):
            grad = _loss_grad(z, c1, target, p0, beta)
            _adam_step(z, grad, exp_avg, exp_avg_sq, step, lr)
            cast = z.to(out_dtype)
            keeps = (cast.argmax(dim=1, keepdim=True) == c1) & torch.isfinite(cast).all(
                dim=1, keepdim=True
            )
            best = torch.where(keeps, z, best)
        out = torch.where(finite, best.to(out_dtype), orig)
    return out


class AAA(nn.Module):
    """AAA (Chen et al., NeurIPS 2022): a model whose logits are post-processed by AAA.

    `AAA(model)(x)` runs `model` once (no gradient) on `x: [N, C, H, W] in [0, 1]` and
    returns `aaa_logits` of its scores `[N, K]`: same predicted labels, reshaped margins.
    It has the contract of a model, so it is attacked like one: `attack.run(AAA(model), ...)`.

    Defaults are the official run path (`square.py`: `--attractor_interval 6`, `--lr 1`
    (= κ), `--calibration_loss_weight 5`, `--aaa_iter 100`, `--aaa_optimizer_lr 0.1`;
    `victim.py`: dev 0.5, temperature 1). Note that the classes' own default τ is 4, which the CLI
    overrides with 6 for every run; the RFD code's AAA baseline also uses τ = 6, κ = 1.

    The model's parameters are never touched: the model runs once under `torch.no_grad`, the
    inner optimisation works on a copy of its logits with a closed-form gradient (no autograd; see
    `aaa_logits`), so AAA works the same whether the caller uses `torch.no_grad()`,
    `torch.inference_mode()` or neither, and no gradient ever reaches the model. The output is
    not differentiable (it is detached, as in the official code).

    Not reproduced: the official forward first rounds inputs down to the 1/255 grid
    (`floor(255 x) / 255`). That is part of the official data pipeline for every victim (not of
    AAA), and here it would make AAA's labels differ from `model`'s.

    Args:
        model: the classifier, images `[N, C, H, W]` in `[0, 1]` to logits `[N, K]`.
        tau: attractor period τ (see `aaa_logits` for this and the following).
        dev: attractor offset.
        kappa: reversal slope κ of the linear variant.
        beta: weight β of the calibration loss.
        steps: Adam steps on the logits.
        lr: Adam learning rate.
        temperature: softmax temperature T of the calibration target.
        variant: `"linear"` or `"sine"`.

    References:
        Chen, Huang, Tao, Wu, Xie, Huang. "Adversarial Attack on Attackers: Post-Process to
        Mitigate Black-Box Score-Based Query Attacks". NeurIPS 2022.
        Code: github.com/Sizhe-Chen/AAA.
    """

    def __init__(
        self,
        model: Callable[[Tensor], Tensor],
        *,
        tau: float = 6.0,
        dev: float = 0.5,
        kappa: float = 1.0,
        beta: float = 5.0,
        steps: int = 100,
        lr: float = 0.1,
        temperature: float = 1.0,
        variant: Variant = "linear",
    ) -> None:
        super().__init__()
        if not callable(model):
            raise TypeError(f"Expected argument `model` to be callable, but got {type(model)!r}.")
        (
            self.tau,
            self.dev,
            self.kappa,
            self.beta,
            self.steps,
            self.lr,
            self.temperature,
            self.variant,
        ) = _validate_aaa(tau, dev, kappa, beta, steps, lr, temperature, variant)
        self.model = model

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant!r}, tau={self.tau}, dev={self.dev}, kappa={self.kappa}, "
            f"beta={self.beta}, steps={self.steps}, lr={self.lr}, temperature={self.temperature}"
        )

    def forward(self, x: Tensor) -> Tensor:
        """Reshaped logits `[N, K]` for images `x: [N, C, H, W]` in `[0, 1]`."""
        with torch.no_grad():
            logits = self.model(x)
        if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.ndim != 2:
            raise TypeError(
                "Expected argument `model` to return float logits [N, K], but it returned "
                f"{getattr(logits, 'dtype', type(logits))!r} of shape "
                f"{tuple(getattr(logits, 'shape', ()))}."
            )
        return aaa_logits(
            logits,
            tau=self.tau,
            dev=self.dev,
            kappa=self.kappa,
            beta=self.beta,
            steps=self.steps,
            lr=self.lr,
            temperature=self.temperature,
            variant=self.variant,
        )


def rnd(
    model: nn.Module, nu: float, *, seed: int | torch.Generator | None = None
) -> RandomizedFeatureWrapper:
    r"""RND (Qin et al., NeurIPS 2021): Gaussian noise on every query's input.

    Exactly `randfeat.wrap(model, layers=["input"], nu=nu, seed=seed)`: each forward adds fresh
    $\delta \sim \mathcal{N}(0, \nu I)$ to the input image (independent draws for every
    image and every call, as in every RND implementation: the two members of a finite-difference
    pair get independent noise). The noisy input is not clipped to `[0, 1]`, as in the paper's
    own code (RFD `input_noise`); BlackboxBench's score path and the AAA repository clip it.

    **ν is a variance here**, as everywhere in randfeat. RND's paper and code use the *standard
    deviation*: the RND paper writes ν for it, and BlackboxBench's `sigma` (`noise_size`) and
    the AAA repository's `n_in` multiply `randn` by it. Convert with `nu = sigma ** 2`:
    RND's σ = 0.02 (its main setting; the AAA repository's `n_in` for standard models) is
    `nu = 4e-4`, and σ = 0.05 (AAA repository, robust models) is `nu = 2.5e-3`.

    Args:
        model: the classifier, images `[N, C, H, W]` in `[0, 1]` to scores `[N, K]`.
        nu: noise variance ν `>= 0` on the `[0, 1]` pixel scale (`sigma ** 2`).
        seed: seed or generator of the wrapper's noise (None: OS entropy).

    Returns:
        The `RandomizedFeatureWrapper` that `randfeat.wrap` returns.

    Raises:
        TypeError / ValueError: from `randfeat.wrap` on a bad `model`, `nu` or `seed`.

    References:
        Qin, Fan, Zha, Wu. "Random Noise Defense Against Query-Based Black-Box Attacks".
        NeurIPS 2021.
    """
    from randfeat import wrap  # lazily: importing randfeat.eval must not need the core's hooks

    return wrap(model, layers=["input"], nu=nu, seed=seed)
