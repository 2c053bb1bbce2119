"""`Guarded`: detection in front of a model in process, with the server's reject / ban / log."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from randfeat.detect import DEFAULT, DETECTORS, Detector
from randfeat.eval.errors import QueryRefused
from randfeat.eval.guarded import Guarded, KeyBanned, QueryFlagged
from randfeat.eval.oracle import Oracle


def _detector() -> Detector:
    return DETECTORS[DEFAULT](seed=0)


def _scores(x: Tensor) -> Tensor:
    """A tiny model: two classes from the mean pixel."""
    m = x.flatten(1).mean(dim=1, keepdim=True)
    return torch.cat([m, 1 - m], dim=1)


def _images(n: int, seed: int = 0) -> Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_reject_refuses_the_whole_call_and_records_every_row() -> None:
    model = Guarded(_scores, _detector(), on_detect="reject")
    x = _images(3)
    assert torch.equal(model(x), _scores(x))  # new images: answered
    probe = torch.cat([_images(2, seed=1), x[1:2]])  # row 2 repeats an earlier query
    with pytest.raises(QueryFlagged) as err:
        model(probe)
    assert err.value.rows == (2,) and err.value.code == "query_flagged"
    assert isinstance(err.value, QueryRefused)
    s = model.stats
    assert (s.queries, s.first_flag, s.flagged, s.rejected) == (6, 6, 1, 3)
    assert (s.calls, s.refused_calls, s.own_flags, s.other_flags) == (2, 1, 1, 0)
    # every row of the refused call was stored: sending its first row again is flagged too
    with pytest.raises(QueryFlagged):
        model(probe[:1])
    assert model.detector.counts("attacker").queries == 7


def test_log_answers_and_counts() -> None:
    model = Guarded(_scores, _detector(), on_detect="log")
    x = _images(2)
    model(x)
    assert torch.equal(model(x), _scores(x))  # flagged, answered all the same
    s = model.stats
    assert (s.queries, s.first_flag, s.flagged, s.rejected, s.refused_calls) == (4, 3, 2, 0, 0)


def test_ban_refuses_flagged_calls_then_every_call_once_banned() -> None:
    model = Guarded(_scores, _detector(), on_detect="ban", ban_after=2)
    x = _images(1)
    model(x)
    with pytest.raises(QueryFlagged):  # flag 1: refused, not yet banned
        model(x)
    model(_images(1, seed=1))  # a fresh image is still answered
    with pytest.raises(QueryFlagged):  # flag 2: the ban is reached
        model(x)
    with pytest.raises(KeyBanned) as err:  # banned: even a fresh image is refused, unobserved
        model(_images(1, seed=2))
    assert err.value.code == "key_banned" and isinstance(err.value, QueryRefused)
    assert model.stats.queries == 4 and model.stats.rejected == 3
    assert model.detector.counts("attacker").queries == 4


def test_a_flag_by_a_stored_benign_image_is_told_apart() -> None:
    model = Guarded(_scores, _detector(), on_detect="log")
    benign = _images(4)
    assert model.preload(benign, tag="benign") == 0
    model(_images(1, seed=5))
    model(benign[2:3])  # matches the stored benign image, not the attacker's own query
    model(_images(1, seed=5))  # matches its own earlier query
    s = model.stats
    assert s.flags_by_source == {"benign": 1, "own": 1}
    assert (s.own_flags, s.other_flags, s.first_flag, s.queries) == (1, 1, 2, 3)


def test_the_oracle_charges_the_rejected_rows() -> None:
    linear = nn.Linear(64, 3)
    with torch.no_grad():  # class 0 everywhere: no sample is fooled, so none stops early
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    net = nn.Sequential(nn.Flatten(), linear)
    model = Guarded(net, _detector(), on_detect="reject")
    x = _images(2)
    oracle = Oracle(
        model, x, torch.zeros(2, dtype=torch.long), budget=10, eps=0.1, norm="linf", votes=1
    )
    oracle.scores(x, torch.arange(2))
    with pytest.raises(QueryFlagged):
        oracle.scores(torch.cat([x[:1], x[:1]]), torch.tensor([0, 0]))  # a repeat: flagged
    assert oracle.queries.tolist() == [3, 1]  # sent, not answered, charged all the same
    assert model.stats.rejected == 2


def test_bad_arguments_are_refused_with_the_fix() -> None:
    det = _detector()
    with pytest.raises(ValueError, match="on_detect"):
        Guarded(_scores, det, on_detect="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ban_after"):
        Guarded(_scores, det, ban_after=0)
    with pytest.raises(TypeError, match="DETECTORS"):
        Guarded(_scores, "pooled-linf")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model"):
        Guarded(42, det)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="account"):
        Guarded(_scores, det, account="")
    with pytest.raises(ValueError, match="its own account"):
        Guarded(_scores, det).preload(_images(1), account="attacker")
