"""Tests of randfeat.theory.fooling: Eq. 26 against Monte Carlo, its limits and monotonicity."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _theory_models import TwoLinear
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from randfeat.theory import (
    fooling_probability_from_ratio,
    monte_carlo_fooling_probability,
    theorem1_fooling_probability,
)


@settings(max_examples=12, deadline=None)
@given(
    d=st.integers(1, 20),
    m=st.integers(1, 10),
    log_nu=st.floats(-6, 1),
    log_mu=st.floats(-6, 1),
    seed=st.integers(0, 10_000),
)
def test_monte_carlo_matches_eq26_on_a_linear_model(
    d: int, m: int, log_nu: float, log_mu: float, seed: int
) -> None:
    """With a loss exactly linear in x and h(x), Eq. 26 is exact (a Cauchy tail); MC must agree.

    Each MC estimate over S = 4000 draws has SE = sqrt(p(1-p)/S) <= 0.0079; we require agreement
    within 4 SE (+1e-3 for p near 0 where the binomial SE vanishes), per sample.
    """
    model = TwoLinear(d, m, seed).double().eval()
    x = torch.rand(3, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y = torch.tensor([0, 1, 0])
    nu, mu = 10.0**log_nu, 10.0**log_mu
    p_theory = theorem1_fooling_probability(model, x, y, layer="head.pre", nu=nu, mu=mu)
    p_mc, se = monte_carlo_fooling_probability(
        model, x, y, layer="head.pre", nu=nu, mu=mu, samples=4000, seed=seed
    )
    assert torch.all((p_mc - p_theory).abs() <= 4 * se + 1e-3), (p_mc, p_theory, se)


def test_input_layer_gives_r_equal_two_nu_over_mu() -> None:
    model = TwoLinear(5, 3, 0).double()
    x = torch.rand(4, 5, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    p = theorem1_fooling_probability(model, x, y, layer="input", nu=0.3, mu=0.2)
    expected = 0.5 + math.atan(-((2 * 0.3 / 0.2) ** -0.5)) / math.pi
    assert torch.allclose(p, torch.full((4,), expected, dtype=torch.float64))


def test_limits_and_monotonicity() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    ).eval()
    x = torch.rand(6, 8)
    y = torch.arange(6) % 4
    nus = [1e-12, 1e-4, 1e-2, 1.0, 1e12]
    ps = [theorem1_fooling_probability(model, x, y, layer="2", nu=v, mu=1e-3) for v in nus]
    assert torch.all(ps[0] < 1e-4)  # P -> 0 as ν -> 0
    assert torch.all((ps[-1] - 0.5).abs() < 1e-4)  # P -> 1/2 as ν -> ∞
    for a, b in itertools.pairwise(ps):
        assert torch.all(b > a)  # increases with ν
    pm = [
        theorem1_fooling_probability(model, x, y, layer="2", nu=1e-2, mu=m)
        for m in (1e-5, 1e-3, 1e-1)
    ]
    for a, b in itertools.pairwise(pm):
        assert torch.all(b < a)  # falls with μ
    assert fooling_probability_from_ratio(torch.tensor([0.0, math.inf])).tolist() == [0.0, 0.5]


def test_default_layer_is_penultimate_as_in_wrap() -> None:
    """An nn.Sequential has no `head`: the defaults must resolve like `wrap`'s ("penultimate")."""
    model = TwoLinear(3, 4, seed=1).double().eval()
    seq = nn.Sequential(nn.Flatten(), model.h, model.head).eval()
    x = torch.rand(5, 3, dtype=torch.float64)
    y = model(x).argmax(1)
    explicit = theorem1_fooling_probability(seq, x, y, "2.pre", nu=0.1, mu=0.01)
    assert torch.equal(theorem1_fooling_probability(seq, x, y, nu=0.1, mu=0.01), explicit)
    p, _ = monte_carlo_fooling_probability(seq, x, y, nu=0.1, mu=0.01, samples=50, seed=0)
    q, _ = monte_carlo_fooling_probability(seq, x, y, "2.pre", nu=0.1, mu=0.01, samples=50, seed=0)
    assert torch.equal(p, q)


def test_bad_input_to_theorem1() -> None:
    model = TwoLinear(3, 2, 0)
    x = torch.rand(2, 3)
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="mu"):
        theorem1_fooling_probability(model, x, y, layer="head.pre", nu=0.1, mu=0.0)
    with pytest.raises(ValueError, match="nu"):
        theorem1_fooling_probability(model, x, y, layer="head.pre", nu=-1.0, mu=0.1)
    with pytest.raises(ValueError, match="Unknown layer spec"):
        theorem1_fooling_probability(model, x, y, layer="heed.pre", nu=0.1, mu=0.1)
    with pytest.raises(ValueError, match="labels"):
        theorem1_fooling_probability(
            model, x, torch.tensor([0, 5]), layer="head.pre", nu=0.1, mu=0.1
        )
