"""The adaptive NES of Feng et al. (OARS): refusals charged and survived, searches, bans,
detection evaded, and no loss without detection."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch import Tensor, nn

from randfeat.detect import DEFAULT, DETECTORS
from randfeat.eval.attacks.adaptive import adaptive
from randfeat.eval.attacks.adaptive_nes import AdaptiveNES
from randfeat.eval.attacks.eot import EOT
from randfeat.eval.attacks.nes import NES
from randfeat.eval.attacks.signhunter import SignHunter
from randfeat.eval.data.loaders import Digits
from randfeat.eval.errors import QueryRefused
from randfeat.eval.guarded import Guarded, KeyBanned


class _Flaky:
    """Refuses each call with probability 1/3 (a seeded draw); answers scores that never fool
    it (class 0 far ahead)."""

    def __init__(self) -> None:
        self.calls, self.refused = 0, 0
        self.gen = torch.Generator().manual_seed(1)

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        if float(torch.rand((), generator=self.gen)) < 1 / 3:
            self.refused += 1
            raise QueryRefused("flagged")
        return torch.tensor([[10.0, 0.0]]).expand(x.shape[0], 2) + x.flatten(1)[:, :2]


def test_it_keeps_attacking_after_refusals_and_every_query_is_charged() -> None:
    x, y = torch.full((2, 1, 8, 8), 0.5), torch.zeros(2, dtype=torch.long)
    model = _Flaky()
    res = AdaptiveNES(0.1, samples=4, step_attempts=30).run(
        model, x, y, budget=600, votes=1, seed=0
    )
    # a third of the calls refused, yet both images spend their whole budget (the searches,
    # then NES with redrawn pairs and retried steps), and every call, refused or not, is charged
    assert res.queries.tolist() == [600, 600]
    assert model.calls == 1200 and 300 < model.refused < 500
    # with one send per step, the first refused step gives the image up
    res = AdaptiveNES(0.1, samples=4, step_attempts=1).run(
        _Flaky(), x, y, budget=600, votes=1, seed=0
    )
    assert bool((res.queries < 600).all())


def test_a_ban_ends_the_attack() -> None:
    x, y = torch.full((2, 1, 8, 8), 0.5), torch.zeros(2, dtype=torch.long)
    calls = []

    def banned_after_three(z: Tensor) -> Tensor:
        calls.append(1)
        if len(calls) > 3:
            raise KeyBanned("attacker", 10, z.shape[0])
        return torch.tensor([[10.0, 0.0]]).expand(z.shape[0], 2)

    res = AdaptiveNES(0.1).run(banned_after_three, x, y, budget=500, votes=1, seed=0)
    assert res.queries.tolist() == [4, 0]  # no query after the ban, no second image


class _RmsDetector:
    """Refuses a query whose RMS distance to the first query it saw is below `t`."""

    def __init__(self, t: float) -> None:
        self.t = t
        self.first: Tensor | None = None

    def __call__(self, x: Tensor) -> Tensor:
        if self.first is None:
            self.first = x.clone()
        elif float((x - self.first).pow(2).mean().sqrt()) < self.t:
            raise QueryRefused("flagged")
        return torch.tensor([[10.0, 0.0]]).expand(x.shape[0], 2)


def _sigma(caplog: pytest.LogCaptureFixture, t: float) -> tuple[float, float]:
    x, y = torch.full((1, 1, 8, 8), 0.5), torch.zeros(1, dtype=torch.long)
    with caplog.at_level(logging.DEBUG, logger="randfeat.eval.attacks.adaptive_nes"):
        AdaptiveNES(0.2).run(_RmsDetector(t), x, y, budget=420, votes=1, seed=0)
    found = re.findall(r"sigma ([\d.e-]+), min step ([\d.e-]+)", caplog.text)
    caplog.clear()
    return float(found[-1][0]), float(found[-1][1])


def test_the_searches_move_up_only_when_probes_are_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # no refusal: both end at their lower ends, within the last halvings (0.49 / 2**10 and
    # 0.4 / 2**10 above them; the log rounds to 4 digits)
    sigma, step = _sigma(caplog, 0.0)
    assert sigma < 0.01 + 0.49 / 512 and step < 0.0002 + 0.4 / 512
    # probes must move an RMS of 0.15: σ (the RMS of a Gaussian probe, a little less after
    # clipping) and the sign step (its RMS is the step) settle just above it
    sigma, step = _sigma(caplog, 0.15)
    assert 0.15 <= sigma < 0.3 and 0.15 <= step < 0.16


def test_adaptive_maps_nes_and_refuses_what_it_cannot_adapt() -> None:
    a = adaptive(NES(0.1, "l2", samples=20, fd_eta=0.01, lr=0.05))
    assert isinstance(a, AdaptiveNES)
    assert (a.eps, a.norm, a.samples, a.lr, a.sigma) == (0.1, "l2", 20, 0.05, 0.01)
    assert adaptive(a) is a
    for attack in (SignHunter(0.1), EOT(NES(0.1), 2)):
        with pytest.raises(TypeError, match="adaptive-nes-linf"):
            adaptive(attack)
    with pytest.raises(ValueError, match="samples"):
        AdaptiveNES(0.1, samples=3)
    with pytest.raises(ValueError, match="sigma_range"):
        AdaptiveNES(0.1, sigma_range=(0.5, 0.1))
    with pytest.raises(ValueError, match="step_rate"):
        AdaptiveNES(0.1, step_rate=1.5)
    with pytest.raises(ValueError, match="step_attempts"):
        AdaptiveNES(0.1, step_attempts=0)


def _guarded(model: nn.Module, on_detect: str, threshold: float) -> Guarded:
    return Guarded(model, DETECTORS[DEFAULT](seed=0, threshold=threshold), on_detect=on_detect)  # type: ignore[arg-type]


@pytest.mark.slow
def test_the_adaptive_nes_evades_detection_where_nes_is_stopped(
    digits: Digits, digits_model: nn.Module
) -> None:
    """On the digits default (ε = 0.2, 1000 queries, 10 digits, seed 0), against the default
    detector calibrated to 0.1% benign false positives on the training digits (threshold 0.812):
    plain NES has 6462 of its 6472 queries flagged when answered (99.8%; `log`), and, refused
    (`reject`), has its first estimate (one call for all 10 digits) refused and fools none; the adaptive NES has
    612 of its 7102 queries refused (8.6%) and fools 6 of 10.

    Tolerances: 612 / 7102 has a standard error of about sqrt(612) / 7102 ≈ 0.0035, so 0.2 is
    far above it and 0.9 far below 0.998; fooled 6/10 vs 0/10: the binomial standard error of
    6/10 is sqrt(0.24 / 10) ≈ 0.15, so >= 3 is 2 SE below the measurement.
    """
    eps, budget, n = 0.2, 1000, 10
    threshold = DETECTORS[DEFAULT](seed=0).calibrate(digits.x_train, 1e-3)
    x, y = digits.x_test[:n], digits.y_test[:n]

    logged = _guarded(digits_model, "log", threshold)
    free = NES(eps).run(logged, x, y, budget=budget, votes=1, seed=0)
    plain_flagged = logged.stats.flagged / int(free.queries.sum())
    rejecting = _guarded(digits_model, "reject", threshold)
    plain = NES(eps).run(rejecting, x, y, budget=budget, votes=1, seed=0)
    assert rejecting.stats.rejected > 0 and not bool(plain.success.any())

    guard = _guarded(digits_model, "reject", threshold)
    res = AdaptiveNES(eps).run(guard, x, y, budget=budget, votes=1, seed=0)
    assert int(res.queries.sum()) == guard.stats.queries  # every observed row was charged
    adaptive_rejected = guard.stats.rejected / int(res.queries.sum())
    assert plain_flagged > 0.9
    assert 0 < adaptive_rejected < 0.2  # refused, and attacked on after the refusals
    assert int(res.success.sum()) >= 3


@pytest.mark.slow
def test_without_detection_it_fools_as_often_as_nes(
    digits: Digits, digits_model: nn.Module
) -> None:
    """Undefended digits CNN, ℓ∞ ε = 0.1, 1000 queries, 20 digits, seed 0: plain NES fools 6,
    the adaptive NES 6 (its searches spend 400 queries, its random start and momentum make up).

    Tolerance: two proportions near 0.3 over 20 images differ with a standard error of
    sqrt(2 · 0.21 / 20) ≈ 0.145, about 3 images; a shortfall of more than 4 (1.4 SE) fails.
    """
    x, y = digits.x_test[:20], digits.y_test[:20]
    plain = NES(0.1).run(digits_model, x, y, budget=1000, votes=1, seed=0)
    res = AdaptiveNES(0.1).run(digits_model, x, y, budget=1000, votes=1, seed=0)
    assert int(res.success.sum()) >= int(plain.success.sum()) - 4
