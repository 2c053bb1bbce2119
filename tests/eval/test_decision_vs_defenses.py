"""Decision-based attacks against the defenses (paper Tables 5, 10, 11).

AAA keeps every label, so a label-only attacker sees exactly the same answers with or without it;
randomized features do change the labels an attacker sees near the boundary, and slow it down.
"""

from __future__ import annotations

import pytest
import torch

from randfeat.eval.attacks import RayS, SignFlip
from randfeat.eval.defenses import AAA


@pytest.mark.parametrize("attack", [RayS(0.2), SignFlip(0.2)], ids=["rays", "signflip"])
def test_aaa_leaves_decision_attacks_exactly_as_strong(digits, digits_model, attack) -> None:  # type: ignore[no-untyped-def]
    x, y = digits.x_test[:24], digits.y_test[:24]
    base = attack.run(digits_model, x, y, budget=1000, votes=9, seed=0)
    aaa = attack.run(AAA(digits_model), x, y, budget=1000, votes=9, seed=0)
    assert torch.equal(base.success, aaa.success)
    assert torch.equal(base.queries, aaa.queries)
    assert torch.equal(base.x_adv, aaa.x_adv)
    assert base.robust_accuracy() < 0.5  # and the attack does succeed on most digits
