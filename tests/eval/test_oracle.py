"""Tests of the oracle (the attacks' only door to a model) and the shared attack helpers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import randfeat
from randfeat.eval.attacks.base import linf_bounds, project
from randfeat.eval.oracle import Oracle, count_wrong, distance, fooled, rejudge
from randfeat.eval.outcome import AttackResult
from randfeat.eval.results.records import CleanRow
from randfeat.losses import margin_loss as margin


class Counting:
    """A plain callable (no nn.Module): class 0 unless pixel 0 exceeds a threshold."""

    def __init__(self, noise: float = 0.0, seed: int = 0) -> None:
        self.calls = 0
        self.forwards = 0
        self.noise = noise
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("the oracle must query under no_grad")
        self.calls += 1
        self.forwards += x.shape[0]
        s = x.flatten(1)[:, 0] - 0.5
        s = s + self.noise * torch.randn(x.shape[0], generator=self.gen)
        return torch.stack([-s, s], dim=1)


def make(model: Counting, n: int = 3, **kw: object) -> Oracle:
    x = torch.full((n, 1, 2, 2), 0.4)
    y = torch.zeros(n, dtype=torch.long)
    args: dict[str, object] = {"budget": 5, "eps": 0.3, "norm": "linf"}
    args.update(kw)
    return Oracle(model, x, y, **args)  # type: ignore[arg-type]


def test_queries_are_counted_per_sample_and_budget_is_enforced() -> None:
    m = Counting()
    o = make(m)
    idx = torch.tensor([0, 0, 2])
    o.scores(o.x0[idx], idx)
    assert o.queries.tolist() == [2, 0, 1]
    assert o.remaining.tolist() == [3, 5, 4]
    with pytest.raises(RuntimeError, match="budget"):
        o.scores(o.x0[[0, 0, 0, 0]], torch.tensor([0, 0, 0, 0]))
    assert o.queries.tolist() == [2, 0, 1]  # a refused query is not charged


def test_success_is_verified_by_majority_and_verification_is_free() -> None:
    m = Counting()
    o = make(m, votes=9)
    x = o.x0.clone()
    x[1, 0, 0, 0] = 0.7  # inside ε = 0.3, misclassified (score of class 1 > class 0)
    o.scores(x[[1]], torch.tensor([1]))
    assert o.success.tolist() == [False, True, False]
    assert o.queries.tolist() == [0, 1, 0]
    assert o.verify_forwards.tolist() == [0, 9, 0]
    assert o.success_query.tolist() == [-1, 1, -1]
    assert o.n_succeeded == 1
    assert torch.equal(o.x_success[1], x[1])
    with pytest.raises(RuntimeError, match="already succeeded"):
        o.scores(x[[1]], torch.tensor([1]))
    with pytest.raises(RuntimeError, match="already succeeded"):  # also mixed with open samples
        o.scores(o.x0[[0, 1, 2]], torch.tensor([0, 1, 2]))
    assert o.queries.tolist() == [0, 1, 0]  # refused queries are not charged
    assert not bool(o.active()[1])


def test_points_outside_the_ball_never_count_as_success() -> None:
    o = make(Counting(), votes=1)
    x = o.x0.clone()
    x[0, 0, 0, 0] = 0.9  # misclassified but 0.5 away from x0 > ε
    o.scores(x[[0]], torch.tensor([0]))
    assert not bool(o.success[0])
    with pytest.raises(RuntimeError, match=r"outside \[0, 1\]"):
        o.scores(x[[0]] + 1.0, torch.tensor([0]))


def test_failed_verification_keeps_the_sample_attacked() -> None:
    """A point at the boundary is misclassified half the time: verification rejects some."""
    m = Counting(noise=1.0, seed=0)
    o = make(m, n=64, votes=9, budget=1)
    x = o.x0.clone()
    x[:, 0, 0, 0] = 0.5  # on the boundary: P(misclassified) = 1/2 per forward
    o.scores(x, torch.arange(64))
    wrong = o.verify_forwards > 0
    # some were verified (the query said "fooled"), and not all of those passed the vote
    assert bool(wrong.any()) and bool((wrong & ~o.success).any())
    assert bool((o.success <= wrong).all())


def test_lucky_setting_votes_one_uses_the_query_itself() -> None:
    m = Counting()
    o = make(m, votes=1)
    x = o.x0.clone()
    x[:, 0, 0, 0] = 0.7
    before = m.forwards
    o.scores(x, torch.arange(3))
    assert m.forwards - before == 3  # no verification forwards
    assert o.success.all() and o.verify_forwards.sum() == 0


def test_eot_samples_are_charged_and_averaged() -> None:
    m = Counting()
    o = make(m, samples=3, budget=7)
    assert o.n_calls == 2
    o.scores(o.x0[[0]], torch.tensor([0]))
    assert o.queries.tolist() == [3, 0, 0] and m.forwards == 3
    assert o.remaining.tolist() == [1, 2, 2]


def test_labels_only_oracle_hides_scores() -> None:
    o = make(Counting(), output="labels")
    with pytest.raises(RuntimeError, match="labels only"):
        o.scores(o.x0[[0]], torch.tensor([0]))
    assert o.labels(o.x0[[0]], torch.tensor([0])).tolist() == [0]
    o2 = make(lambda x: torch.zeros(x.shape[0], dtype=torch.long), output="labels")  # type: ignore[arg-type]
    assert o2.labels(o2.x0[[1]], torch.tensor([1])).tolist() == [0]
    o3 = make(lambda x: torch.zeros(x.shape[0], dtype=torch.long))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="decision-based"):
        o3.scores(o3.x0[[1]], torch.tensor([1]))


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (lambda x: torch.zeros(x.shape[0], 2, 1), "shape"),
        (lambda x: torch.full((x.shape[0], 2), float("nan")), "finite"),
        (lambda x: "scores", "tensor"),
    ],
)
def test_bad_model_outputs_raise_before_charging(model: object, match: str) -> None:
    o = make(model)  # type: ignore[arg-type]
    with pytest.raises((ValueError, TypeError), match=match):
        o.scores(o.x0[[0]], torch.tensor([0]))
    assert o.queries.sum() == 0


def test_labels_out_of_range_detected_at_first_forward() -> None:
    x = torch.full((2, 1, 2, 2), 0.4)
    o = Oracle(Counting(), x, torch.tensor([0, 5]), budget=3, eps=0.1, norm="linf")
    with pytest.raises(ValueError, match="labels"):
        o.scores(x, torch.arange(2))
    assert o.queries.sum() == 0


def test_result_and_curves() -> None:
    r = AttackResult(
        x_adv=torch.zeros(4, 1),
        success=torch.tensor([True, True, False, False]),
        queries=torch.tensor([3, 10, 20, 20]),
        success_query=torch.tensor([3, 10, -1, -1]),
        verify_forwards=torch.zeros(4, dtype=torch.long),
        budget=20,
        votes=9,
    )
    assert r.robust_accuracy() == 0.5
    assert r.robust_accuracy(5) == 0.75
    assert r.robust_curve(torch.tensor([0, 3, 10])).tolist() == [1.0, 0.75, 0.5]


class Scripted(torch.nn.Module):
    """Row `i` of all calls so far gets class `seq[i % len(seq)]`: a deterministic stand-in for
    the noise of a randomized model, to script how the votes on one point split."""

    def __init__(self, seq: list[int], classes: int = 3) -> None:
        super().__init__()
        self.seq, self.classes, self.rows = seq, classes, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        cls = torch.tensor([self.seq[(self.rows + j) % len(self.seq)] for j in range(n)])
        self.rows += n
        return torch.nn.functional.one_hot(cls, self.classes).float()


SPLIT_4_3_2 = [0, 0, 0, 0, 1, 1, 1, 2, 2]  # the true class 0 has the most votes, 5 of 9 are wrong


def test_the_rule() -> None:
    assert [fooled(k, 9) for k in range(10)] == [False] * 5 + [True] * 5
    # ties: half the votes wrong is not a strict majority
    assert (fooled(2, 4), fooled(3, 4), fooled(1, 2), fooled(0, 1), fooled(1, 1)) == (
        False,
        True,
        False,
        False,
        True,
    )
    assert fooled(torch.tensor([4, 5]), 9).tolist() == [False, True]


def test_a_4_3_2_split_fools_the_model_everywhere() -> None:
    """Votes 4 (true class) / 3 / 2: the plurality label is right, but the point fools the
    model by the judging rule, for the clean rows, the oracle and `rejudge` alike."""
    x = torch.full((1, 1, 2, 2), 0.5)
    y = torch.zeros(1, dtype=torch.long)
    wrapper = randfeat.wrap(Scripted(SPLIT_4_3_2), layers="input", nu=0.0)
    assert wrapper.predict(x, votes=9).tolist() == [0]  # a label predictor: the plurality
    # the clean row: count the wrong votes at the clean image, judge by the rule
    wrong = count_wrong(Scripted(SPLIT_4_3_2), x, y, votes=9)
    assert wrong.tolist() == [5] and fooled(wrong, 9).tolist() == [True]
    row = CleanRow(0, 0, "feature@0.02", votes=9, wrong_votes=5, chunk=0, seconds=0.0)
    assert row.correct is False
    # the oracle at the clean point: one wrong query, then the 9 votes of the split
    oracle = Oracle(Scripted([1, *SPLIT_4_3_2]), x, y, budget=3, eps=0.1, norm="linf", votes=9)
    oracle.labels(x, torch.tensor([0]))
    assert oracle.success.tolist() == [True] and oracle.verify_forwards.tolist() == [9]
    # rejudge: p = 5/9 exactly from 9 forwards, then P[the rule says fooled with 9 new votes]
    fresh = rejudge(Scripted(SPLIT_4_3_2), x, y, votes=9, forwards=9)
    p = 5 / 9
    assert fresh.item() == pytest.approx(
        sum(math.comb(9, k) * p**k * (1 - p) ** (9 - k) for k in range(5, 10)), abs=1e-12
    )


def test_ties_do_not_fool() -> None:
    x = torch.full((1, 1, 2, 2), 0.5)
    y = torch.zeros(1, dtype=torch.long)
    assert CleanRow(0, 0, "input@0.02", votes=4, wrong_votes=2, chunk=0, seconds=0.0).correct
    tie = Oracle(Scripted([1, 0, 0, 1, 1]), x, y, budget=3, eps=0.1, norm="linf", votes=4)
    tie.labels(x, torch.tensor([0]))
    assert tie.success.tolist() == [False]  # 2 of 4 wrong
    more = Oracle(Scripted([1, 0, 1, 1, 1]), x, y, budget=3, eps=0.1, norm="linf", votes=4)
    more.labels(x, torch.tensor([0]))
    assert more.success.tolist() == [True]  # 3 of 4 wrong
    # p = 1/2 exactly: P[Bin(4, 1/2) >= 3] = 5/16, the tie (6/16) does not count
    fresh = rejudge(Scripted([0, 1]), x, y, votes=4, forwards=4)
    assert fresh.item() == pytest.approx(5 / 16, abs=1e-12)


def test_rejudge_on_a_deterministic_model() -> None:
    m = Counting()
    x = torch.full((2, 1, 2, 2), 0.4)
    x[1, 0, 0, 0] = 0.9
    fresh = rejudge(m, x, torch.zeros(2, dtype=torch.long), votes=9, forwards=20)
    assert fresh.tolist() == [0.0, 1.0]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 4),
    c=st.integers(1, 3),
    hw=st.integers(1, 6),
    eps=st.floats(1e-4, 2.0),
    norm=st.sampled_from(["linf", "l2"]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
    scale=st.floats(0.0, 10.0),
    seed=st.integers(0, 1000),
)
def test_project_is_exact(
    n: int, c: int, hw: int, eps: float, norm: str, dtype: torch.dtype, scale: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, c, hw, hw, generator=g).to(dtype)
    x = (x0.float() + scale * torch.randn(n, c, hw, hw, generator=g)).to(dtype)
    p = project(x, x0, eps, norm)  # type: ignore[arg-type]
    assert p.dtype == dtype
    assert bool((distance(p, x0, norm) <= eps).all())  # type: ignore[arg-type]
    assert bool(((p >= 0) & (p <= 1)).all())
    if norm == "linf":  # the nearest point: per-coordinate clipping, and a no-op inside the box
        assert torch.equal(project(p, x0, eps, "linf"), p)
        lo = (x0.double() - eps).clamp_min(0.0)
        hi = (x0.double() + eps).clamp_max(1.0)
        ulp = float(torch.finfo(dtype).eps)  # bounds may sit one rounding step inside
        gap = (p.double() - x.double().clamp(lo, hi)).abs()
        assert bool((gap <= ulp * (1 + x0.double().abs() + eps)).all())


@pytest.mark.parametrize("eps", [0.0, -0.1, math.nan, math.inf])
def test_linf_bounds_reject_bad_eps(eps: float) -> None:
    with pytest.raises(ValueError, match="`eps`"):
        linf_bounds(torch.zeros(1, 1, 2, 2), eps)


def test_margin() -> None:
    s = torch.tensor([[1.0, 3.0, 2.0], [5.0, 1.0, 1.0]])
    assert margin(s, torch.tensor([1, 0])).tolist() == [1.0, 4.0]


def test_eot_repeats_one_forward_batch_at_a_time() -> None:
    """Under EOT the input copies are made per forward batch, and label-only answers are averaged
    as one-hot votes over a common number of classes even when chunks see different labels."""
    seen: list[int] = []

    def labels(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return (x.flatten(1)[:, 0] > 0.5).long()

    x = torch.full((4, 1, 2, 2), 0.4)
    x[3, 0, 0, 0] = 0.6
    o = Oracle(
        labels,
        x,
        torch.zeros(4, dtype=torch.long),
        budget=9,
        eps=0.3,
        norm="linf",
        output="labels",
        batch_size=6,
        samples=3,
        votes=1,
    )
    out = o.labels(x, torch.arange(4))
    assert out.tolist() == [0, 0, 0, 1]
    assert max(seen) <= 6 and sum(seen) == 12
    assert o.queries.tolist() == [3, 3, 3, 3]


def _keyed_and_fresh_nets() -> tuple[torch.nn.Module, list[int]]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    rows: list[int] = []
    net.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    return net.eval(), rows


def test_keyed_noise_votes_are_one_answer() -> None:
    """Under keyed noise the 9 votes of a point are one answer: one forward, counts 0 or 9; under
    fresh noise the same call runs 9 forwards a point and counts in between occur."""
    x = torch.rand(40, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(40, dtype=torch.long)
    net, rows = _keyed_and_fresh_nets()
    keyed = randfeat.wrap(net, ["penultimate"], nu=4.0, noise="keyed")
    wrong = count_wrong(keyed, x, y, votes=9)
    assert sum(rows) == 40  # one forward a point
    assert set(wrong.tolist()) <= {0, 9} and 0 < int((wrong == 9).sum()) < 40
    single = keyed(x).argmax(1) != y  # the one answer, asked again: the same
    assert torch.equal(wrong == 9, single)
    rows.clear()
    fresh = randfeat.wrap(net, ["penultimate"], nu=4.0, seed=0)
    wrong = count_wrong(fresh, x, y, votes=9)
    assert sum(rows) == 40 * 9
    assert bool(((wrong > 0) & (wrong < 9)).any())  # ν = 4 on logits of size ~1: votes split


def test_keyed_noise_success_is_decided_by_the_query() -> None:
    net, _ = _keyed_and_fresh_nets()
    keyed = randfeat.wrap(net, ["penultimate"], nu=1.0, noise="keyed")
    x = torch.rand(30, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    pred = keyed(x).argmax(1)
    o = Oracle(keyed, x, 1 - pred, budget=5, eps=0.1, norm="linf", votes=9)
    o.scores(x, torch.arange(30))  # every point is misclassified w.r.t. the flipped labels
    assert o.success.all() and int(o.verify_forwards.sum()) == 0


def test_a_refused_query_is_charged_and_not_answered() -> None:
    """A query the owner refuses (a detector flagged it) ends the call, charged to its samples."""
    from randfeat.eval.errors import QueryRefused

    class Refusing(Counting):
        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 1:
                raise QueryRefused("flagged")
            return super().__call__(x)

    o = make(Refusing(), votes=9)
    with pytest.raises(QueryRefused):
        o.scores(o.x0[[0, 0, 2]], torch.tensor([0, 0, 2]))
    assert o.queries.tolist() == [2, 0, 1] and not o.success.any()
    o.scores(o.x0[[1]], torch.tensor([1]))  # the oracle keeps serving
    assert o.queries.tolist() == [2, 1, 1]


def test_rejudge_under_keyed_noise_asks_once() -> None:
    net, rows = _keyed_and_fresh_nets()
    keyed = randfeat.wrap(net, ["penultimate"], nu=4.0, noise="keyed")
    x = torch.rand(20, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    y = torch.zeros(20, dtype=torch.long)
    p = rejudge(keyed, x, y, votes=9, forwards=100)
    assert sum(rows) == 20 and torch.equal(p, (keyed(x).argmax(1) != y).double())
