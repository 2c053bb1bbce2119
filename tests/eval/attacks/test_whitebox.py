"""White-box route (Table 13): torchattacks runs on the wrapper as it is.

The wrapper is an nn.Module with gradients through the noise, so the ecosystem's white-box attacks
need no adapter. Randomness is no shield against a white-box attacker who averages over it (EOT).
"""

from __future__ import annotations

import math

import pytest
import torch

import randfeat

torchattacks = pytest.importorskip("torchattacks")


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if isinstance(model, randfeat.RandomizedFeatureWrapper):
        return (model.predict(x, votes=9) == y).double().mean().item()
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def test_pgd_drives_the_undefended_digits_model_down(digits, digits_model) -> None:  # type: ignore[no-untyped-def]
    x, y = digits.x_test[:200], digits.y_test[:200]
    torch.manual_seed(0)  # torchattacks draws its random start from the global RNG
    adv = torchattacks.PGD(digits_model, eps=0.2, alpha=0.05, steps=10, random_start=True)(x, y)
    assert (adv - x).abs().max() <= 0.2 + 1e-6
    assert _accuracy(digits_model, x, y) > 0.97
    assert _accuracy(digits_model, adv, y) < 0.15  # measured 0.03


@pytest.mark.slow
def test_eotpgd_is_at_least_as_strong_as_pgd_on_the_defended_model(digits, digits_model) -> None:  # type: ignore[no-untyped-def]
    """Robust accuracy (9-vote majority) under EOTPGD must not exceed PGD's beyond noise.

    n = 200 images; the SE of a difference of two accuracies near 0.6 is
    sqrt(2 · 0.6 · 0.4 / 200) ≈ 0.049; we allow 2 SE. Measured: PGD 0.645, EOTPGD 0.570.
    """
    x, y = digits.x_test[:200], digits.y_test[:200]
    defended = randfeat.wrap(digits_model, ["head.pre"], nu=32.0, seed=0)
    try:
        torch.manual_seed(0)
        pgd = torchattacks.PGD(defended, eps=0.1, alpha=0.025, steps=10, random_start=True)(x, y)
        torch.manual_seed(0)
        eot = torchattacks.EOTPGD(
            defended, eps=0.1, alpha=0.025, steps=10, eot_iter=10, random_start=True
        )(x, y)
        acc_pgd = _accuracy(defended, pgd, y)
        acc_eot = _accuracy(defended, eot, y)
        se = math.sqrt(2 * 0.6 * 0.4 / 200)
        assert acc_eot <= acc_pgd + 2 * se
        assert acc_pgd < _accuracy(defended, x, y) - 0.2  # white-box PGD still hurts a lot
    finally:
        defended.unwrap()
