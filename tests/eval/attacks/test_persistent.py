"""Tests of the persistent attackers (Lucas et al., arXiv 2302.13464): `Resubmit` gains nothing
against keyed noise and gains what the binomial model predicts against fresh noise with
`votes=1`; `JitterEOT` reaches fresh noise through keyed noise, where EOT over exact repeats gets
one answer `m` times, and credits only points the model was asked about."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import randfeat
from randfeat.eval.attacks.base import OracleAttack
from randfeat.eval.attacks.eot import EOT
from randfeat.eval.attacks.persistent import JitterEOT, Resubmit
from randfeat.eval.attacks.square import Square
from randfeat.eval.oracle import Oracle, count_wrong, distance

MARGIN = (
    2.17  # clean margin of class 0; the noise makes it N(MARGIN, 2 nu): P[wrong] = Φ(-2.17) ≈ 1.5%
)
NU = 0.5
EPS = 0.05
KEY = b"persistent-test-key-32-bytes-abc"


class Tiny(nn.Module):
    """8×8 inputs, 4 features (the penultimate layer the defense perturbs), 2 classes. The
    input moves the margin by at most 64 · 0.05 · ε = 0.16 inside the ball."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(64, 4)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.features.weight.copy_(
                0.05 * torch.randn(4, 64, generator=torch.Generator().manual_seed(0)).sign()
            )
            self.features.bias.copy_(torch.tensor([MARGIN, 0.0, 0.0, 0.0]))
            self.head.weight.copy_(torch.eye(2, 4))
            self.head.bias.zero_()

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.flatten(1) - 0.5))


def defended(noise: str, seed: int = 1) -> nn.Module:
    if noise == "keyed":
        return randfeat.wrap(Tiny().eval(), nu=NU, noise="keyed", key=KEY)
    return randfeat.wrap(Tiny().eval(), nu=NU, seed=seed)


def images(n: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 1, 8, 8, generator=g), torch.zeros(n, dtype=torch.long)


class Recorder:
    """Keeps every row the model is shown and its answer; `module` lets `independent_votes`
    see the defense's noise kind."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.rows: list[Tensor] = []
        self.outs: list[Tensor] = []

    def __call__(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            out = self.module(x)
        self.rows.append(x.detach().clone())
        self.outs.append(out.detach().clone())
        return out


class Probe(OracleAttack):
    """One query of every clean image; keeps the answer the attack saw."""

    output = "scores"

    def __init__(self, eps: float) -> None:
        super().__init__(eps)
        self.seen: list[Tensor] = []

    def _attack(self, oracle: Oracle, generator: torch.Generator) -> Tensor:
        idx = torch.arange(oracle.x0.shape[0])
        self.seen.append(oracle.scores(oracle.x0, idx))
        return oracle.x0


# ------------------------------------------------------------------ Resubmit
def test_resubmit_gains_nothing_against_keyed_noise() -> None:
    x, y = images(200)
    before = Square(EPS).run(defended("keyed"), x, y, budget=50, votes=1, seed=0)
    after = Resubmit(Square(EPS), reserve=0.5).run(
        defended("keyed"), x, y, budget=100, votes=1, seed=0
    )
    assert 0 < int(before.success.sum()) < 200  # some fooled, some left to resubmit
    assert torch.equal(after.success, before.success)  # every resubmission: the same answer
    assert torch.equal(after.x_adv, before.x_adv)
    left = ~before.success
    assert bool((after.queries[left] == 100).all())  # the reserve was spent, charged
    assert torch.equal(after.queries[~left], before.queries[~left])


def test_resubmit_gains_what_the_binomial_model_predicts_under_fresh_noise() -> None:
    x, y = images(200)
    before = Square(EPS).run(defended("fresh"), x, y, budget=50, votes=1, seed=0)
    after = Resubmit(Square(EPS), reserve=0.5).run(
        defended("fresh"), x, y, budget=100, votes=1, seed=0
    )
    assert torch.equal(after.success & before.success, before.success)  # phase 1 is Square's run
    gain = int((after.success & ~before.success).sum())
    # Prediction: image i left unfooled at point x_i is fooled per resubmission with probability
    # p_i (estimated from F = 4000 fresh forwards; its error, sd <= sqrt(0.02/4000) = 0.0022 a
    # draw, moves q_i by under 50 · 0.0022 ≈ 0.11 per image at most and far less on average), and
    # in R_i = 100 - queries_i resubmissions with q_i = 1 - (1 - p_i)^R_i. The gain is a sum of
    # independent Bernoulli(q_i): mean Σ q_i, sd sqrt(Σ q_i (1 - q_i)).
    left = ~before.success
    p = (
        count_wrong(defended("fresh", seed=7), before.x_adv[left], y[left], votes=4000).double()
        / 4000
    )
    r = (100 - before.queries[left]).double()
    q = 1 - (1 - p) ** r
    mean, sd = float(q.sum()), float((q * (1 - q)).sum().sqrt())
    assert mean > 10 * sd / 3  # the setting predicts a real rise (measured: see the report)
    print(f"before {int(before.success.sum())}/200, gain {gain}, predicted {mean:.2f} ± {sd:.2f}")
    assert abs(gain - mean) <= 3 * sd + 1.0, (gain, mean, sd)
    won = after.success & ~before.success
    assert bool((after.success_query[won] > before.queries[won]).all())  # offset by phase 1
    assert bool((after.success_query[won] <= 100).all())
    assert torch.equal(after.x_adv, before.x_adv)  # the point resubmitted is phase 1's


def test_resubmit_with_no_reserve_is_the_attack() -> None:
    x, y = images(16)
    a = Square(EPS).run(defended("fresh"), x, y, budget=40, votes=3, seed=2)
    b = Resubmit(Square(EPS), reserve=0.0).run(defended("fresh"), x, y, budget=40, votes=3, seed=2)
    for f in ("success", "queries", "success_query", "x_adv", "verify_forwards"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


# ------------------------------------------------------------------ JitterEOT
def test_eot_over_repeats_gets_one_answer_from_keyed_noise() -> None:
    x, y = images(8)
    rec = Recorder(defended("keyed"))
    probe = Probe(EPS)
    EOT(probe, 5).run(rec, x, y, budget=5, votes=1, seed=0)
    rows, outs = torch.cat(rec.rows).view(8, 5, -1), torch.cat(rec.outs).view(8, 5, -1)
    assert bool((rows == rows[:, :1]).all())  # 5 exact copies a query ...
    assert bool((outs == outs[:, :1]).all())  # ... and one answer 5 times
    assert torch.allclose(probe.seen[0], outs[:, 0])


def test_jitter_eot_reaches_fresh_noise_through_keyed_noise() -> None:
    x, y = images(8)
    spread = {}
    for name, module in (("keyed", defended("keyed")), ("no noise", Tiny().eval())):
        rec = Recorder(module)
        JitterEOT(Probe(EPS), m=5).run(rec, x, y, budget=5, votes=1, seed=0)
        rows, outs = torch.cat(rec.rows).view(8, 5, -1), torch.cat(rec.outs).view(8, 5, 2)
        assert not bool((rows == rows[:, :1]).all(dim=2).all())  # 5 distinct copies
        assert bool(
            (
                distance(rows.view(40, 1, 8, 8), x.repeat_interleave(5, 0), "linf")
                <= 1 / 255 + 1e-7
            ).all()
        )
        margin = outs[..., 0] - outs[..., 1]
        spread[name] = float(margin.std(dim=1).mean())
    # keyed noise: the margin of a copy is N(m, 2 nu), sd 1; the jitter alone moves it by at most
    # 64 · 0.05 · (1/255) · 2 = 0.025: the copies drew fresh noise
    assert spread["keyed"] > 0.5 and spread["no noise"] < 0.03, spread
    # and the averaged answer varies with the jitter's seed
    answers = []
    for seed in (0, 1):
        probe = Probe(EPS)
        JitterEOT(probe, m=5).run(defended("keyed"), x, y, budget=5, votes=1, seed=seed)
        answers.append(torch.cat(probe.seen))
    assert not torch.allclose(answers[0], answers[1])


@pytest.mark.parametrize("noise", ["keyed", "fresh"])
def test_jitter_eot_credits_only_points_it_sent(noise: str) -> None:
    x, y = images(24)
    rec = Recorder(defended(noise))
    res = JitterEOT(Square(EPS), m=3).run(rec, x, y, budget=60, votes=1, seed=0)
    assert int(res.success.sum()) > 0
    assert bool((res.queries <= 60).all()) and bool((res.queries % 3 == 0).all())
    rows, outs = torch.cat(rec.rows).flatten(1), torch.cat(rec.outs)
    for i in res.success.nonzero().squeeze(1).tolist():
        hit = (rows == res.x_adv[i].flatten()).all(dim=1)
        assert bool(hit.any())  # the credited point was a row sent to the model ...
        assert bool((outs[hit].argmax(dim=1) != y[i]).any())  # ... that it misclassified
    assert bool((distance(res.x_adv, x, "linf") <= EPS).all())


def test_jitter_eot_is_reproducible_by_seed() -> None:
    x, y = images(6)
    a = JitterEOT(Square(EPS), m=2).run(defended("keyed"), x, y, budget=30, votes=1, seed=4)
    b = JitterEOT(Square(EPS), m=2).run(defended("keyed"), x, y, budget=30, votes=1, seed=4)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)


# ------------------------------------------------------------------ arguments
def test_bad_arguments_are_refused_before_any_work() -> None:
    with pytest.raises(TypeError, match="attack"):
        JitterEOT("square")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`m`"):
        JitterEOT(Square(EPS), m=0)
    with pytest.raises(ValueError, match="jitter"):
        JitterEOT(Square(EPS), jitter=0.0)
    with pytest.raises(ValueError, match="reserve"):
        Resubmit(Square(EPS), reserve=1.0)
    with pytest.raises(ValueError, match="reserve"):
        Resubmit(Square(EPS), reserve=-0.1)
    with pytest.raises(TypeError, match="attack"):
        Resubmit(None)  # type: ignore[arg-type]
    x, y = images(2)
    with pytest.raises(ValueError, match="budget"):
        Resubmit(Square(EPS)).run(defended("keyed"), x, y, budget=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        JitterEOT(Square(EPS)).run(defended("keyed"), x + 2, y)


def test_repr_shows_the_settings() -> None:
    assert repr(JitterEOT(Square(EPS), m=3)) == (
        "JitterEOT(Square(eps=0.05, norm='linf', p_init=0.05), m=3, jitter=0.00392157)"
    )
    assert repr(Resubmit(Square(EPS), reserve=0.25)) == (
        "Resubmit(Square(eps=0.05, norm='linf', p_init=0.05), reserve=0.25)"
    )
