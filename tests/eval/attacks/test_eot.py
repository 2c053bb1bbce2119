"""Tests of EOT: every evaluation averages m forwards and is charged m queries."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from randfeat.eval.attacks.base import Attack
from randfeat.eval.attacks.eot import EOT
from randfeat.eval.attacks.signhunter import SignHunter
from randfeat.eval.oracle import distance
from randfeat.eval.outcome import AttackResult

FIELDS = ("x_adv", "success", "queries", "success_query", "verify_forwards")


class Recorder:
    """Counts (and keeps) every row the model is shown."""

    def __init__(self, fn: object) -> None:
        self.fn = fn
        self.rows: list[Tensor] = []

    def __call__(self, x: Tensor) -> Tensor:
        self.rows.extend(x.detach().clone())
        return self.fn(x)  # type: ignore[operator]


def never_fooled(x: Tensor) -> Tensor:
    """Scores in which class 0 wins by 10 whatever the input (y = 0: never fooled)."""
    out = torch.zeros(x.shape[0], 3)
    out[:, 0] = 10.0
    return out


def linear_scores(w: Tensor, bias: float) -> object:
    def fn(x: Tensor) -> Tensor:
        z = bias + (x.flatten(1).double() @ w.flatten().double()).float()
        return torch.stack([z, torch.zeros_like(z)], dim=1)

    return fn


class AlternatingNoise:
    """``base(x) ± c``: the sign alternates with the row and with the call, so any two
    consecutive rows of one call cancel exactly, but a single row sees ±c by call parity."""

    def __init__(self, base: object, c: float) -> None:
        self.base = base
        self.c = c
        self.calls = 0

    def __call__(self, x: Tensor) -> Tensor:
        out = self.base(x)  # type: ignore[operator]
        sign = (-1.0) ** (torch.arange(x.shape[0]) + self.calls)
        self.calls += 1
        return out + self.c * sign.unsqueeze(1) * torch.tensor([1.0, -1.0])


class NoisyLogits(nn.Module):
    """A randomized model with its own seeded generator: logits + N(0, sigma^2)."""

    def __init__(self, model: nn.Module, sigma: float, seed: int) -> None:
        super().__init__()
        self.model = model
        self.sigma = sigma
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor) -> Tensor:
        z = self.model(x)
        return z + self.sigma * torch.randn(z.shape, generator=self.gen)


def assert_same(a: AttackResult, b: AttackResult) -> None:
    for field in FIELDS:
        assert torch.equal(getattr(a, field), getattr(b, field)), field


# ----------------------------------------------------------------------------- accounting
def test_each_evaluation_is_m_forwards_charged_m() -> None:
    x = torch.full((3, 1, 2, 2), 0.5)
    y = torch.zeros(3, dtype=torch.long)
    model = Recorder(never_fooled)
    m, budget = 3, 20  # 20 // 3 = 6 evaluations = 18 queries; 2 queries cannot buy one more
    res = EOT(SignHunter(0.1), m).run(model, x, y, budget=budget, votes=1)
    assert res.queries.tolist() == [18, 18, 18]
    assert len(model.rows) == int(res.queries.sum()) == 3 * 18
    assert int(res.verify_forwards.sum()) == 0
    # the m forwards of one evaluation are m copies of the same point, one after the other
    rows = torch.stack(model.rows).view(-1, m, 1, 2, 2)
    assert bool((rows == rows[:, :1]).all())


def test_forwards_equal_charged_queries_plus_votes_on_digits(digits, digits_model) -> None:
    x, y = digits.x_test[:32], digits.y_test[:32]
    model = Recorder(NoisyLogits(digits_model, 2.0, seed=0))
    m, budget = 4, 101  # m does not divide the budget: 25 evaluations, 100 queries at most
    res = EOT(SignHunter(0.15), m).run(model, x, y, budget=budget, votes=3)
    assert len(model.rows) == int(res.queries.sum() + res.verify_forwards.sum())
    assert bool((res.queries <= 100).all())
    assert bool((res.queries % m == 0).all())
    assert bool((res.queries[~res.success] == 100).all())  # SignHunter spends every evaluation
    assert torch.equal(res.queries[res.success], res.success_query[res.success])
    # the test has teeth: some samples succeed (so votes were spent) and some do not (measured:
    # 16-18 of 32 succeed over three noise seeds)
    assert 0 < int(res.success.sum()) < 32
    assert bool((distance(res.x_adv, x, "linf") <= 0.15).all())


def test_budget_below_m_buys_nothing() -> None:
    x = torch.full((2, 1, 2, 2), 0.5)
    model = Recorder(never_fooled)
    res = EOT(SignHunter(0.1), 5).run(model, x, torch.zeros(2, dtype=torch.long), budget=4)
    assert model.rows == [] and res.queries.tolist() == [0, 0]
    assert torch.equal(res.x_adv, x)


def test_nested_eot_multiplies_m() -> None:
    x = torch.full((1, 1, 2, 2), 0.5)
    model = Recorder(never_fooled)
    res = EOT(EOT(SignHunter(0.1), 2), 3).run(
        model, x, torch.zeros(1, dtype=torch.long), budget=20, votes=1
    )
    assert int(res.queries[0]) == 18  # 20 // 6 = 3 evaluations of 6 forwards
    assert len(model.rows) == 18


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 3),
    m=st.integers(1, 5),
    budget=st.integers(1, 40),
    eps=st.floats(0.01, 0.5),
    norm=st.sampled_from(["linf", "l2"]),
    seed=st.integers(0, 2**16),
)
def test_properties(n, m, budget, eps, norm, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 3, 2, generator=g)
    w = torch.randn(1, 3, 2, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    model = Recorder(linear_scores(w, bias=float(torch.randn(1, generator=g)) * 0.3))
    res = EOT(SignHunter(eps, norm), m).run(model, x, y, budget=budget, votes=3)
    assert bool((res.queries <= budget).all())
    assert bool((res.queries % m == 0).all())
    assert bool((res.queries[~res.success] == (budget // m) * m).all())
    assert len(model.rows) == int(res.queries.sum() + res.verify_forwards.sum())
    assert bool((distance(res.x_adv, x, norm) <= eps).all())


# ----------------------------------------------------------------------------- semantics
def test_scores_are_averaged_over_the_m_forwards() -> None:
    """With noise that cancels over 2 consecutive forwards, EOT(m=2) follows the noiseless
    trajectory exactly, at twice the queries; the plain attack does not."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1, 3, 3, generator=g)
    x = torch.rand(2, 1, 3, 3, generator=g) * 0.6 + 0.2
    y = torch.zeros(2, dtype=torch.long)
    clean = linear_scores(w, bias=50.0)  # never fooled: only the search decisions matter
    attack = SignHunter(0.1)
    kw = {"votes": 1, "batch_size": 10_000}
    ref = attack.run(clean, x, y, budget=60, **kw)
    eot = EOT(attack, 2).run(AlternatingNoise(clean, c=0.5), x, y, budget=120, **kw)
    plain = attack.run(AlternatingNoise(clean, c=0.5), x, y, budget=60, **kw)
    assert torch.equal(eot.x_adv, ref.x_adv)
    assert torch.equal(eot.queries, 2 * ref.queries)
    assert not torch.equal(plain.x_adv, ref.x_adv)  # the noise does change the search


def test_m1_reproduces_the_inner_attack(digits, digits_model) -> None:
    from randfeat.eval.attacks.square import Square  # draws random numbers: tests the seed path

    x, y = digits.x_test[:16], digits.y_test[:16]
    for attack in (SignHunter(0.1), Square(0.1)):
        a = attack.run(NoisyLogits(digits_model, 1.0, 7), x, y, budget=60, votes=3, seed=4)
        b = EOT(attack, 1).run(NoisyLogits(digits_model, 1.0, 7), x, y, budget=60, votes=3, seed=4)
        assert_same(a, b)
    # the comparison can fail: another seed changes Square's run
    c = Square(0.1).run(NoisyLogits(digits_model, 1.0, 7), x, y, budget=60, votes=3, seed=5)
    d = Square(0.1).run(NoisyLogits(digits_model, 1.0, 7), x, y, budget=60, votes=3, seed=4)
    assert not torch.equal(c.x_adv, d.x_adv)


def test_mirrors_the_inner_attack() -> None:
    from randfeat.eval.attacks.rays import RayS

    inner = SignHunter(0.3, "l2")
    eot = EOT(inner, 5)
    assert (eot.eps, eot.norm, eot.output, eot.m) == (0.3, "l2", "scores", 5)
    assert eot.attack is inner
    assert repr(eot) == "EOT(SignHunter(eps=0.3, norm='l2', layout='nhwc'), m=5)"
    rays = EOT(RayS(0.05), 2)
    assert (rays.output, rays.eps, rays.norm) == ("labels", 0.05, "linf")
    assert isinstance(eot, Attack)


def test_labels_attack_is_charged_m_per_query() -> None:
    from randfeat.eval.attacks.rays import RayS

    x = torch.full((2, 1, 2, 2), 0.5)
    model = Recorder(never_fooled)
    res = EOT(RayS(0.1), 3).run(model, x, torch.zeros(2, dtype=torch.long), budget=31, votes=1)
    assert len(model.rows) == int(res.queries.sum())
    assert bool((res.queries % 3 == 0).all()) and bool((res.queries <= 31).all())


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("m", "error"),
    [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError), ("3", TypeError)],
)
def test_bad_m(m: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="`m`"):
        EOT(SignHunter(0.1), m)  # type: ignore[arg-type]


@pytest.mark.parametrize("attack", [None, "square", SignHunter])
def test_bad_attack(attack) -> None:
    with pytest.raises(TypeError, match="`attack`"):
        EOT(attack, 2)


def test_bad_inputs_raise_before_any_query() -> None:
    model = Recorder(never_fooled)
    with pytest.raises(ValueError):
        EOT(SignHunter(0.1), 2).run(model, torch.full((1, 1, 2, 2), 2.0), torch.zeros(1).long())
    with pytest.raises(ValueError):
        EOT(SignHunter(0.1), 2).run(model, torch.rand(1, 1, 2, 2), torch.zeros(1).long(), budget=0)
    assert model.rows == []
