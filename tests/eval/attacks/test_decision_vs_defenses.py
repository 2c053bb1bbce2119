"""Decision-based attacks against the defenses (paper Tables 5, 10, 11).

AAA keeps every label, so a label-only attacker sees exactly the same answers with or without it;
randomized features do change the labels an attacker sees near the boundary, and slow it down.
"""

from __future__ import annotations

import pytest
import torch

from randfeat.eval.attacks import RayS, SignFlip
from randfeat.eval.defenses import AAA

pytestmark = pytest.mark.slow  # whole attacks on trained models: seconds of CPU each


@pytest.mark.parametrize("attack", [RayS(0.2), SignFlip(0.2)], ids=["rays", "signflip"])
def test_aaa_leaves_decision_attacks_exactly_as_strong(digits, digits_model, attack) -> None:  # type: ignore[no-untyped-def]
    x, y = digits.x_test[:24], digits.y_test[:24]
    base = attack.run(digits_model, x, y, budget=1000, votes=9, seed=0)
    aaa = attack.run(AAA(digits_model), x, y, budget=1000, votes=9, seed=0)
    assert torch.equal(base.success, aaa.success)
    assert torch.equal(base.queries, aaa.queries)
    assert torch.equal(base.x_adv, aaa.x_adv)
    assert base.robust_accuracy() < 0.5  # and the attack does succeed on most digits


@pytest.mark.parametrize("attack", [RayS(0.2), SignFlip(0.2)], ids=["rays", "signflip"])
def test_randomized_features_raise_robust_accuracy_under_decision_attacks(
    digits, digits_model, attack
) -> None:  # type: ignore[no-untyped-def]
    """Feature noise at a calibrated 2-point drop slows hard-label attacks (Tables 5, 10, 11).

    Measured on 100 digits at ε = 0.2, 1000 queries (noise seeds 1-3): RayS 0.02 -> 0.32-0.37,
    SignFlip 0.27 -> 0.83-0.90. We require +0.15 (about 2 SE of a difference at n = 100 near 0.4).
    """
    import randfeat

    x_cal, y_cal = digits.x_test[100:], digits.y_test[100:]
    x, y = digits.x_test[:100], digits.y_test[:100]
    cal = randfeat.calibrate_nu(
        digits_model, (x_cal, y_cal), ["head.pre"], target_drop=0.02, seed=0, progress=False
    )
    defended = randfeat.wrap(digits_model, ["head.pre"], nu=cal.nu, seed=3)
    try:
        base = attack.run(digits_model, x, y, budget=1000, votes=9, seed=0)
        feature = attack.run(defended, x, y, budget=1000, votes=9, seed=0)
    finally:
        defended.unwrap()
    assert feature.robust_accuracy() >= base.robust_accuracy() + 0.15
