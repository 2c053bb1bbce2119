"""The adaptive HopSkipJump of Feng et al. (OARS): refusals charged and survived, the δ search,
bans, detection evaded, and no loss without detection."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch import Tensor, nn

from randfeat.detect import DEFAULT, DETECTORS
from randfeat.eval.attacks.adaptive import adaptive
from randfeat.eval.attacks.adaptive_hsja import AdaptiveHSJA
from randfeat.eval.attacks.hsja import HopSkipJump
from randfeat.eval.attacks.rays import RayS
from randfeat.eval.attacks.signflip import SignFlip
from randfeat.eval.data.loaders import Digits
from randfeat.eval.errors import QueryRefused
from randfeat.eval.guarded import Guarded, KeyBanned


def _half_plane(x: Tensor, level: float = 0.6) -> Tensor:
    """Labels: 1 where the mean pixel exceeds `level` (about half of uniform-noise images at
    0.5; at 0.6, no point of an ℓ2 ball of radius < 0.8 around the grey 8×8 image)."""
    return (x.flatten(1).mean(dim=1) > level).long()


class _Flaky:
    """`_half_plane`, refusing each call with probability 1/3 (a seeded draw)."""

    def __init__(self) -> None:
        self.calls, self.refused = 0, 0
        self.gen = torch.Generator().manual_seed(1)

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        if float(torch.rand((), generator=self.gen)) < 1 / 3:
            self.refused += 1
            raise QueryRefused("flagged")
        return _half_plane(x)


def test_it_keeps_attacking_after_refusals_and_every_query_is_charged() -> None:
    x, y = torch.full((2, 1, 8, 8), 0.5), torch.zeros(2, dtype=torch.long)
    model = _Flaky()
    attack = AdaptiveHSJA(0.1, init_num_evals=10, step_attempts=30)
    res = attack.run(model, x, y, budget=500, votes=1, seed=0)
    # a third of the calls refused: the start redrawn, probes redrawn, steps retried; both
    # images spend their whole budget, and every call, refused or not, is charged
    assert res.queries.tolist() == [500, 500]
    assert model.calls == 1000 and 250 < model.refused < 420


def test_a_ban_ends_the_attack() -> None:
    x, y = torch.full((2, 1, 8, 8), 0.5), torch.zeros(2, dtype=torch.long)
    calls = []

    def banned_after_three(z: Tensor) -> Tensor:
        calls.append(1)
        if len(calls) > 3:
            raise KeyBanned("attacker", 10, z.shape[0])
        return _half_plane(z)

    res = AdaptiveHSJA(0.1).run(banned_after_three, x, y, budget=500, votes=1, seed=0)
    assert res.queries.tolist() == [4, 0]  # no query after the ban, no second image


class _L2Detector:
    """Refuses a query closer than `t` (ℓ2) to the grey image; else `_half_plane` at 0.52."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self, x: Tensor) -> Tensor:
        if float((x - 0.5).norm()) < self.t:
            raise QueryRefused("flagged")
        return _half_plane(x, 0.52)


def _delta(caplog: pytest.LogCaptureFixture, t: float) -> float:
    x, y = torch.full((1, 1, 8, 8), 0.5), torch.zeros(1, dtype=torch.long)
    with caplog.at_level(logging.DEBUG, logger="randfeat.eval.attacks.adaptive_hsja"):
        AdaptiveHSJA(0.5).run(_L2Detector(t), x, y, budget=300, votes=1, seed=0)
    found = re.findall(r"delta ([\d.e-]+)", caplog.text)
    caplog.clear()
    return float(found[-1])


def test_the_delta_search_moves_up_only_when_probes_are_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # no refusal: δ ends at the lower end (within the last halving, 5 / 2**10)
    assert _delta(caplog, 0.0) < 0.001 + 5 / 512
    # probes closer than ℓ2 1 to x0 are refused: δ settles just above 1
    assert 1.0 <= _delta(caplog, 1.0) < 1.0 + 5 / 512


def test_adaptive_maps_hopskipjump_and_refuses_what_it_cannot_adapt() -> None:
    a = adaptive(HopSkipJump(0.5, "linf", gamma=2.0, init_num_evals=20, max_num_evals=40))
    assert isinstance(a, AdaptiveHSJA)
    assert (a.eps, a.norm, a.gamma, a.init_num_evals, a.max_num_evals) == (0.5, "linf", 2.0, 20, 40)
    for attack in (RayS(0.1), SignFlip(0.1)):
        with pytest.raises(TypeError, match="adaptive-hsja-l2"):
            adaptive(attack)
    with pytest.raises(ValueError, match="delta_range"):
        AdaptiveHSJA(0.1, delta_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="grad_attempts"):
        AdaptiveHSJA(0.1, grad_attempts=0)


def _guarded(model: object, on_detect: str, threshold: float) -> Guarded:
    return Guarded(model, DETECTORS[DEFAULT](seed=0, threshold=threshold), on_detect=on_detect)  # type: ignore[arg-type]


@pytest.mark.slow
def test_the_adaptive_hsja_evades_detection_where_hsja_is_stopped(
    digits: Digits, digits_model: nn.Module
) -> None:
    """Digits, ℓ2 ε = 1.5, 1000 queries, 10 digits, seed 0, the default detector calibrated to
    0.1% benign false positives on the training digits (threshold 0.812): plain HopSkipJump has
    1807 of its 1877 queries flagged when answered (96%; `log`) and, refused (`reject`), has its
    first call refused and fools none; the adaptive HopSkipJump has 221 of its 5900 queries
    refused (3.7%) and fools 6 of 10.

    Tolerances: 221 / 5900 has a standard error of about sqrt(221) / 5900 ≈ 0.0025, so 0.2 is
    far above it and 0.9 below 0.96 by > 6 SE (sqrt(70) / 1877 ≈ 0.0045); fooled 6/10: the
    binomial standard error is sqrt(0.24 / 10) ≈ 0.15, so >= 3 is 2 SE below the measurement.
    """
    eps, budget, n = 1.5, 1000, 10
    threshold = DETECTORS[DEFAULT](seed=0).calibrate(digits.x_train, 1e-3)
    x, y = digits.x_test[:n], digits.y_test[:n]

    def labels(z: Tensor) -> Tensor:
        return digits_model(z).argmax(dim=1)

    logged = _guarded(labels, "log", threshold)
    free = HopSkipJump(eps).run(logged, x, y, budget=budget, votes=1, seed=0)
    plain_flagged = logged.stats.flagged / int(free.queries.sum())
    rejecting = _guarded(labels, "reject", threshold)
    plain = HopSkipJump(eps).run(rejecting, x, y, budget=budget, votes=1, seed=0)

    guard = _guarded(labels, "reject", threshold)
    res = AdaptiveHSJA(eps).run(guard, x, y, budget=budget, votes=1, seed=0)
    assert int(res.queries.sum()) == guard.stats.queries  # every observed row was charged
    adaptive_rejected = guard.stats.rejected / int(res.queries.sum())
    assert plain_flagged > 0.9
    assert rejecting.stats.rejected > 0 and not bool(plain.success.any())
    assert 0 < adaptive_rejected < 0.2  # refused, and attacked on after the refusals
    assert int(res.success.sum()) >= 3


@pytest.mark.slow
def test_without_detection_it_fools_as_often_as_hsja(
    digits: Digits, digits_model: nn.Module
) -> None:
    """Undefended digits CNN, ℓ2 ε = 1.0, 1000 queries, 20 digits, seed 0: plain HopSkipJump
    fools 17, the adaptive one 14 (its δ search spends 200 of the 1000 queries, and the fixed
    δ near 0.006 replaces the official schedule).

    Tolerance: two proportions near 0.8 over 20 images differ with a standard error of
    sqrt(2 · 0.16 / 20) ≈ 0.13, about 2.5 images; a shortfall of more than 4 (1.6 SE) fails.
    """
    x, y = digits.x_test[:20], digits.y_test[:20]

    def labels(z: Tensor) -> Tensor:
        return digits_model(z).argmax(dim=1)

    plain = HopSkipJump(1.0).run(labels, x, y, budget=1000, votes=1, seed=0)
    res = AdaptiveHSJA(1.0).run(labels, x, y, budget=1000, votes=1, seed=0)
    assert int(res.success.sum()) >= int(plain.success.sum()) - 4
