"""The qualitative claim of Tables 1-2 on the digits default: calibrated feature noise at a 2-point
clean-accuracy cost keeps most digits correct under Square at 1000 queries, where the undefended
model loses almost all of them."""

from __future__ import annotations

import pytest

import randfeat
from randfeat.eval.attacks import Square

pytestmark = pytest.mark.slow  # whole attacks on trained models: seconds of CPU each


def test_feature_defense_at_two_points_keeps_most_digits_under_square(digits, digits_model) -> None:  # type: ignore[no-untyped-def]
    x_cal, y_cal = digits.x_test[100:], digits.y_test[100:]  # calibration images, disjoint
    x, y = digits.x_test[:100], digits.y_test[:100]  # attacked images
    cal = randfeat.calibrate_nu(
        digits_model, (x_cal, y_cal), ["head.pre"], target_drop=0.02, seed=0, progress=False
    )
    assert abs(cal.drop - 0.02) < 0.005
    defended = randfeat.wrap(digits_model, ["head.pre"], nu=cal.nu, seed=1)
    try:
        undefended = Square(0.2).run(digits_model, x, y, budget=1000, votes=9, seed=0)
        feature = Square(0.2).run(defended, x, y, budget=1000, votes=9, seed=0)
    finally:
        defended.unwrap()
    # measured: undefended 0.07, defended 0.60-0.61 (seeds 0, 1); SE at n=100 is <= 0.05
    assert undefended.robust_accuracy() <= 0.2
    assert feature.robust_accuracy() >= 0.5
    assert feature.robust_accuracy() >= undefended.robust_accuracy() + 0.3
