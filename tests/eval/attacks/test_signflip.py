"""Tests for :class:`randfeat.eval.attacks.signflip.SignFlip` (Chen et al., ECCV 2020)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from randfeat.eval.attacks.signflip import ALPHA_FRACTION, SignFlip
from randfeat.eval.oracle import distance

# ---------------------------------------------------------------------------------------- helpers


class Recorder:
    """Wraps a model and counts every row it forwards (and every call)."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn
        self.rows = 0
        self.calls = 0

    def __call__(self, x: Tensor) -> Tensor:
        self.rows += int(x.shape[0])
        self.calls += 1
        return self.fn(x)


def corner_model(x: Tensor) -> Tensor:
    """Labels: 1 where the first pixel exceeds 0.9, else 0.

    Uniform noise is "misclassified" (for y = 0) with probability 0.1, so the noise initialisation
    takes ~10 draws; a clean image with first pixel 0.2 cannot be fooled within ε = 0.2.
    """
    return (x[:, 0, 0, 0] > 0.9).long()


def tiny_linear(shape: tuple[int, int, int], classes: int, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    d = shape[0] * shape[1] * shape[2]
    lin = nn.Linear(d, classes).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(classes, d, generator=g, dtype=torch.float64))
        lin.bias.copy_(0.1 * torch.randn(classes, generator=g, dtype=torch.float64))
    return nn.Sequential(nn.Flatten(), lin).eval()


def corner_batch(n: int, first: float) -> tuple[Tensor, Tensor]:
    x = torch.full((n, 1, 4, 4), 0.5, dtype=torch.float64)
    x[:, 0, 0, 0] = first
    return x, torch.zeros(n, dtype=torch.long)


# ---------------------------------------------------------------------------------------- defaults


def test_defaults_reproduce_official_values_at_official_eps() -> None:
    a = SignFlip(0.031)  # official SFA(linf=0.031): alpha 0.004
    assert math.isclose(a.alpha, 0.004)
    assert (a.prob, a.resize_factor, a.binary_steps, a.norm) == (0.999, 1.0, 10, "linf")
    assert SignFlip.output == "labels"
    b = SignFlip(0.2)  # digits: scaled with ε
    assert math.isclose(b.alpha, 0.2 * 0.004 / 0.031) and math.isclose(
        ALPHA_FRACTION, 0.004 / 0.031
    )
    c = SignFlip(0.2, alpha=0.01, prob=0.99, resize_factor=2, binary_steps=0)
    assert (c.alpha, c.prob, c.resize_factor, c.binary_steps) == (0.01, 0.99, 2.0, 0)


# ---------------------------------------------------------------------------------------- digits


@pytest.mark.slow
def test_undefended_digits_robust_accuracy_drops(digits, digits_model) -> None:
    n = 60
    x, y = digits.x_test[:n], digits.y_test[:n]
    with torch.no_grad():
        clean = (digits_model(x).argmax(1) == y).double().mean().item()
    res = SignFlip(0.2).run(digits_model, x, y, budget=1000, seed=0)
    ra = res.robust_accuracy()
    # Measured on these 60 images: 0.183 / 0.183 / 0.133 (seeds 0 / 1 / 2); on 100 images
    # 0.13 / 0.15 / 0.17. With p ≈ 0.17 the standard error is sqrt(0.17 * 0.83 / 60) ≈ 0.048, so
    # 0.40 is ~4.5 SE above, while a broken attack (e.g. one that never accepts a projection step)
    # stays near the clean accuracy (0.98 here).
    assert clean >= 0.95
    assert ra <= 0.40, f"robust accuracy {ra:.3f} (clean {clean:.3f})"
    # successes are verified in-ball misclassified points; everything stays in the budget.
    ok = res.success
    assert bool((res.queries <= 1000).all())
    assert bool((res.success_query[ok] == res.queries[ok]).all())
    assert bool((distance(res.x_adv, x, "linf") <= 0.2).all())
    with torch.no_grad():
        assert bool((digits_model(res.x_adv[ok]).argmax(1) != y[ok]).all())


def test_float64_ball_and_box_hold(digits, digits_model) -> None:
    model = copy.deepcopy(digits_model).double()
    x, y = digits.x_test[:12].double(), digits.y_test[:12]
    res = SignFlip(0.2).run(model, x, y, budget=200, seed=3)
    assert res.x_adv.dtype == torch.float64
    assert bool((distance(res.x_adv, x, "linf") <= 0.2).all())  # float64 distance
    assert bool(((res.x_adv >= 0) & (res.x_adv <= 1)).all())
    assert bool(torch.isfinite(res.x_adv).all())
    assert 0 < int(res.success.sum()) < 12  # a mixed case: both branches of x_adv exercised


def test_labels_function_and_scores_give_identical_runs(digits, digits_model) -> None:
    x, y = digits.x_test[:8], digits.y_test[:8]

    def labels_only(z: Tensor) -> Tensor:
        return digits_model(z).argmax(1)

    a = SignFlip(0.2).run(digits_model, x, y, budget=150, seed=7)
    b = SignFlip(0.2).run(labels_only, x, y, budget=150, seed=7)
    assert int(a.success.sum()) > 0
    assert torch.equal(a.queries, b.queries) and torch.equal(a.success, b.success)
    assert torch.equal(a.x_adv, b.x_adv)


def test_seeds_reproduce(digits, digits_model) -> None:
    x, y = digits.x_test[:8], digits.y_test[:8]
    a = SignFlip(0.2).run(digits_model, x, y, budget=150, seed=11)
    b = SignFlip(0.2).run(digits_model, x, y, budget=150, seed=11)
    c = SignFlip(0.2).run(digits_model, x, y, budget=150, seed=12)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)
    assert torch.equal(a.success_query, b.success_query)
    assert not torch.equal(a.x_adv, c.x_adv)


# ---------------------------------------------------------------------------------------- schedule


class QueryLog:
    """Records every queried batch (float64 copies) of a model that sees the images only."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn
        self.batches: list[Tensor] = []

    def __call__(self, x: Tensor) -> Tensor:
        self.batches.append(x.detach().double().clone())
        return self.fn(x)


def radius_from_half(x: Tensor) -> Tensor:
    """ℓ∞ distance of each row from the constant image 0.5 (the clean image below)."""
    return (x - 0.5).abs().flatten(1).amax(dim=1)


def schedule_run(threshold: float, eps: float, binary_steps: int, iters: int) -> QueryLog:
    """Attack 4 constant-0.5 images [1, 32, 32] with "fooled iff ||x - x0||_∞ > threshold"."""
    x = torch.full((4, 1, 32, 32), 0.5, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    log = QueryLog(lambda z: (radius_from_half(z) > threshold).long())
    budget = 1 + binary_steps + 2 * iters  # one noise draw suffices: it is > threshold away
    res = SignFlip(eps, binary_steps=binary_steps).run(log, x, y, budget=budget, seed=0)
    assert not bool(res.success.any()) and len(log.batches) == budget
    return log


def test_alpha_grows_by_1_5_every_10_iterations_when_projections_are_accepted() -> None:
    # Every nonzero perturbation fools, so each projection step is accepted and the radius
    # shrinks by exactly α: α_k = r_{k-1} - r_k. Official: rate 1 > 0.7 → α *= 1.5 every 10.
    eps, iters = 1e-3, 40
    log = schedule_run(0.0, eps, 0, iters)
    radii = torch.stack([radius_from_half(b) for b in log.batches])  # [queries, 4]
    proj = radii[1::2]  # init draw, then (projection, flip) pairs
    prev = torch.cat([radii[:1], radii[2::2][:-1]])  # radius before each projection
    alpha = prev - proj  # [iters, 4]
    k = torch.arange(iters, dtype=torch.float64)
    expected = ALPHA_FRACTION * eps * 1.5 ** torch.div(k, 10, rounding_mode="floor")
    torch.testing.assert_close(alpha, expected.view(-1, 1).expand(-1, 4), rtol=1e-6, atol=1e-12)


def test_alpha_shrinks_by_1_5_every_10_iterations_when_projections_are_rejected() -> None:
    # Fooled iff farther than 0.3: the binary search stops just above 0.3 (within 0.5 / 2^10),
    # every smaller ball is rejected and sign flips (same radius) are accepted. The projection
    # query's radius is l - α_k, so α_k = l - r_k; official: rate 0 < 0.3 → α /= 1.5 every 10.
    eps, iters = 0.1, 30
    log = schedule_run(0.3, eps, 10, iters)
    radii = torch.stack([radius_from_half(b) for b in log.batches])
    ell = radii[12::2]  # flip queries keep the accepted radius l
    assert bool((ell > 0.3).all()) and bool((ell < 0.3 + 0.5 / 2**10).all())
    alpha = ell - radii[11::2]
    k = torch.arange(iters, dtype=torch.float64)
    expected = ALPHA_FRACTION * eps / 1.5 ** torch.div(k, 10, rounding_mode="floor")
    torch.testing.assert_close(alpha, expected.view(-1, 1).expand(-1, 4), rtol=1e-6, atol=1e-12)


def test_flip_probability_grows_to_its_clamp_when_flips_are_accepted() -> None:
    # Every flip is accepted: kept entries lose 1e-4 of keep-probability per flip and the
    # adaptation removes 0.001 every 10 iterations, so p goes 0.999 → 0.99 (clamp) in ~45
    # iterations. Flipped entries per query, of D = 1024:
    #   iterations 1-10: mean flip prob ≈ 0.001 + 4.5e-4 → 1.48 per query; over 40 queries
    #     SE ≈ sqrt(1.48 / 40) ≈ 0.19, so <= 2.5 is > 5 SE above;
    #   iterations 61-70: p = 0.99 → 10.24 per query, SE ≈ sqrt(10.1 / 40) ≈ 0.50: [8.5, 12]
    #     is ±3.5 SE. A fixed p (no schedule) would give ~1.0 in both windows.
    log = schedule_run(0.0, 1e-3, 0, 70)
    proj, flip = log.batches[1::2], log.batches[2::2]
    changed = torch.stack(
        [
            (f - 0.5).sign().ne((p - 0.5).sign()).flatten(1).sum(1)
            for p, f in zip(proj, flip, strict=True)
        ]
    ).double()  # [iters, 4]
    early, late = changed[:10].mean().item(), changed[60:70].mean().item()
    assert early <= 2.5, early
    assert 8.5 <= late <= 12.0, late


# ------------------------------------------------------------------------------------- accounting


def test_init_queries_are_charged() -> None:
    # With the corner model, each noise draw fools with probability 0.1: at budget 5, an image
    # finds no start with probability 0.9^5 ≈ 0.59 and then has spent all 5 queries on noise
    # draws (the official code would report 0 queries for them).
    x, y = corner_batch(20, 0.2)
    rec = Recorder(corner_model)
    res = SignFlip(0.2).run(rec, x, y, budget=5, seed=0)
    assert bool((res.queries == 5).all())
    assert not bool(res.success.any())
    assert rec.rows == int(res.queries.sum() + res.verify_forwards.sum())


@pytest.mark.parametrize("votes", [1, 9])
def test_forwards_equal_charged_plus_verification(digits, digits_model, votes: int) -> None:
    x, y = digits.x_test[:10], digits.y_test[:10]
    rec = Recorder(digits_model)
    res = SignFlip(0.2).run(rec, x, y, budget=120, votes=votes, seed=1)
    assert int(res.success.sum()) > 0
    assert rec.rows == int(res.queries.sum() + res.verify_forwards.sum())
    assert int(res.verify_forwards.sum()) == (0 if votes == 1 else votes * int(res.success.sum()))


@pytest.mark.parametrize("budget", [1, 2, 11, 12, 13, 57, 100])
def test_unfoolable_images_spend_exactly_their_budget(budget: int) -> None:
    # First pixel 0.2, ε = 0.2: no point of the ball has it above 0.9. Each image spends its whole
    # budget, odd remainders included (the projection step alone uses the last query).
    x, y = corner_batch(6, 0.2)
    rec = Recorder(corner_model)
    res = SignFlip(0.2).run(rec, x, y, budget=budget, seed=2)
    assert bool((res.queries == budget).all())
    assert not bool(res.success.any())
    assert rec.rows == 6 * budget
    assert bool((distance(res.x_adv, x, "linf") <= 0.2).all())


def test_misclassified_clean_image_is_found_by_the_binary_search() -> None:
    # First pixel 0.95 > 0.9: the clean image is already "misclassified". No clean query is
    # made; the binary search radii halve into the ball and the oracle verifies success.
    x, y = corner_batch(4, 0.95)
    res = SignFlip(0.2).run(corner_model, x, y, budget=100, seed=0)
    assert bool(res.success.all())
    assert bool((distance(res.x_adv, x, "linf") <= 0.2).all())


def test_resize_factor_runs_and_stays_in_ball(digits, digits_model) -> None:
    x, y = digits.x_test[:6], digits.y_test[:6]
    res = SignFlip(0.2, resize_factor=2).run(digits_model, x, y, budget=100, seed=0)
    assert bool((res.queries <= 100).all())
    assert bool((distance(res.x_adv, x, "linf") <= 0.2).all())


def test_randomized_model_keeps_budget_and_ball(digits, digits_model) -> None:
    g = torch.Generator().manual_seed(0)

    def noisy(z: Tensor) -> Tensor:  # a randomized model: fresh noise every forward
        s = digits_model(z)
        return s + 2.0 * torch.randn(s.shape, generator=g)

    x, y = digits.x_test[:8], digits.y_test[:8]
    rec = Recorder(noisy)
    res = SignFlip(0.2).run(rec, x, y, budget=100, seed=0)
    assert bool((res.queries <= 100).all())
    assert bool((distance(res.x_adv, x, "linf") <= 0.2).all())
    assert rec.rows == int(res.queries.sum() + res.verify_forwards.sum())


# ------------------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 3),
    h=st.integers(2, 6),
    w=st.integers(2, 6),
    eps=st.floats(0.01, 1.0),
    budget=st.integers(1, 60),
    votes=st.sampled_from([1, 3]),
    resize=st.sampled_from([1.0, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_property_budget_ball_and_accounting(
    n: int, c: int, h: int, w: int, eps: float, budget: int, votes: int, resize: float, seed: int
) -> None:
    model = tiny_linear((c, h, w), 4, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    rec = Recorder(model)
    res = SignFlip(eps, resize_factor=resize).run(rec, x, y, budget=budget, votes=votes, seed=seed)
    assert bool((res.queries <= budget).all())
    assert bool((distance(res.x_adv, x, "linf") <= eps).all())
    assert bool(((res.x_adv >= 0) & (res.x_adv <= 1)).all())
    assert bool(torch.isfinite(res.x_adv).all())
    assert rec.rows == int(res.queries.sum() + res.verify_forwards.sum())
    ok = res.success
    assert bool((res.queries[~ok] == budget).all())  # unsuccessful images spend it all
    assert bool((res.success_query[ok] >= 1).all())
    with torch.no_grad():
        assert bool((model(res.x_adv[ok]).argmax(1) != y[ok]).all())


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"eps": -0.1}, ValueError),
        ({"eps": float("nan")}, ValueError),
        ({"eps": 0.1, "norm": "l2"}, ValueError),
        ({"eps": 0.1, "alpha": 0.0}, ValueError),
        ({"eps": 0.1, "alpha": float("inf")}, ValueError),
        ({"eps": 0.1, "alpha": "big"}, TypeError),
        ({"eps": 0.1, "prob": 0.5}, ValueError),
        ({"eps": 0.1, "prob": 1.0}, ValueError),
        ({"eps": 0.1, "resize_factor": 0.5}, ValueError),
        ({"eps": 0.1, "binary_steps": -1}, ValueError),
        ({"eps": 0.1, "binary_steps": 2.5}, TypeError),
    ],
)
def test_bad_hyperparameters_raise(kwargs: dict[str, object], exc: type[Exception]) -> None:
    with pytest.raises(exc, match="Expected argument"):
        SignFlip(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("attack", "x", "y", "budget"),
    [
        (
            SignFlip(0.1, resize_factor=5),
            torch.rand(2, 1, 4, 4),
            torch.zeros(2, dtype=torch.long),
            10,
        ),
        (SignFlip(0.1), torch.rand(2, 16), torch.zeros(2, dtype=torch.long), 10),
        (SignFlip(0.1), torch.rand(2, 1, 4, 4) + 1.0, torch.zeros(2, dtype=torch.long), 10),
        (SignFlip(0.1), torch.rand(2, 1, 4, 4), torch.zeros(3, dtype=torch.long), 10),
        (SignFlip(0.1), torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), 0),
    ],
)
def test_bad_input_raises_before_any_query(
    attack: SignFlip, x: Tensor, y: Tensor, budget: int
) -> None:
    rec = Recorder(lambda z: torch.zeros(z.shape[0], dtype=torch.long))
    with pytest.raises(ValueError, match="Expected argument"):
        attack.run(rec, x, y, budget=budget, seed=0)
    assert rec.calls == 0
