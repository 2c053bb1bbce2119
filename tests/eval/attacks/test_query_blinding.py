"""Query blinding (Feng et al., OARS): each query sent through a small random affine map,
projected into the ε-ball, and success judged on the point actually sent."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from randfeat.eval.attacks.adaptive import AdaptiveSquare
from randfeat.eval.attacks.adaptive_hsja import AdaptiveHSJA
from randfeat.eval.attacks.adaptive_nes import AdaptiveNES
from randfeat.eval.attacks.base import OracleAttack
from randfeat.eval.attacks.stateful import Blinding, blind
from randfeat.eval.data.loaders import Digits
from randfeat.eval.oracle import distance


def test_the_transform_is_random_small_and_the_identity_at_zero() -> None:
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    still = blind(x, Blinding(angle=0.0, translate=0.0, scale=1.0), gen)
    assert torch.allclose(still, x, atol=1e-6)
    a = blind(x, Blinding(), gen)
    b = blind(x, Blinding(), gen)
    assert a.shape == x.shape and not torch.equal(a, b)  # a fresh map per call
    assert 0 < float((a - x).abs().mean()) < 0.2  # small: ≤ 2 degrees, ≤ 5% shift
    assert not torch.allclose(a[0] - x[0], a[1] - x[1])  # a fresh map per row


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="angle"):
        Blinding(angle=-1.0)
    with pytest.raises(ValueError, match="translate"):
        Blinding(translate=1.5)
    with pytest.raises(TypeError, match="blind"):
        AdaptiveNES(0.1, blind="yes")  # type: ignore[arg-type]


class _Recorder:
    """The digits CNN, recording every point it is sent."""

    def __init__(self, model: nn.Module, labels: bool) -> None:
        self.model, self.labels, self.seen = model, labels, list[Tensor]()

    def __call__(self, x: Tensor) -> Tensor:
        self.seen.extend(x.clone())
        out = self.model(x)
        return out.argmax(dim=1) if self.labels else out


ATTACKS = {
    "square": lambda: AdaptiveSquare(0.2, search=False, blind=True),
    "nes": lambda: AdaptiveNES(0.2, search=False, blind=True),
    "hsja": lambda: AdaptiveHSJA(1.5, search=False, blind=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ATTACKS))
def test_what_is_sent_is_blinded_in_the_ball_and_judged(
    name: str, digits: Digits, digits_model: nn.Module
) -> None:
    attack: OracleAttack = ATTACKS[name]()
    x, y = digits.x_test[:4], digits.y_test[:4]
    model = _Recorder(digits_model, attack.output == "labels")
    res = attack.run(model, x, y, budget=200, votes=1, seed=0)
    sent = torch.stack(model.seen)
    # every point sent is an image, some inside the ball (a point inside it is projected back
    # after the transform; HopSkipJump's probes outside it stay outside)
    assert float(sent.min()) >= 0.0 and float(sent.max()) <= 1.0
    near = distance(sent, x[:1].expand_as(sent), attack.norm) <= attack.eps
    assert bool(near.any())
    # the returned points, fooled or not, are points the model was sent (success judged on
    # them), or x0 for an image with no answered point in the ball (HopSkipJump's rule)
    for i in range(4):
        returned = res.x_adv[i]
        assert any(torch.equal(returned, s) for s in sent) or (
            name == "hsja" and not bool(res.success[i]) and torch.equal(returned, x[i])
        ), i
    assert bool((distance(res.x_adv, x, attack.norm) <= attack.eps).all())
    # blinding changed the queries: unblinded, the same seed sends other points
    plain = _Recorder(digits_model, attack.output == "labels")
    attack.blind = None  # type: ignore[attr-defined]
    attack.run(plain, x, y, budget=200, votes=1, seed=0)
    assert not torch.equal(torch.stack(plain.seen[:50]), sent[:50])
