"""Tests of the sybil attacker of `Guarded(..., accounts=K)`: per-key bans see a K-th of the
stream, the detector's one index sees all of it."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from randfeat.detect import DEFAULT, DETECTORS
from randfeat.eval.guarded import Guarded, KeyBanned, QueryFlagged


def _scores(x: Tensor) -> Tensor:
    return x.flatten(1)[:, :2]


def _until_banned(accounts: int, ban_after: int) -> tuple[int, Guarded]:
    """Send one image again and again (every call after the first is an exact duplicate, so
    flagged: a deterministic setting) until `KeyBanned`; return the calls answered or flagged."""
    det = DETECTORS[DEFAULT](seed=0)
    model = Guarded(_scores, det, on_detect="ban", ban_after=ban_after, accounts=accounts)
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = 0
    while True:
        try:
            model(x)
        except QueryFlagged:
            pass
        except KeyBanned:
            return calls, model
        calls += 1
        assert calls < 1000


@pytest.mark.parametrize("accounts", [1, 4])
def test_k_keys_are_banned_after_k_times_the_flags(accounts: int) -> None:
    b = 3
    calls, model = _until_banned(accounts, b)
    # call 1 is new; each later call is flagged and charged to the key in turn; a key is banned
    # at b flags, so the attacker is banned after exactly K·b flagged rows
    assert calls == 1 + accounts * b
    stats = model.stats
    assert stats.flagged == accounts * b == stats.queries - 1  # every duplicate flagged
    assert stats.own_flags == accounts * b  # a match with another of its keys is its own
    assert stats.first_flag == 2
    for key in model.keys:
        assert model.detector.counts(key).flagged == b  # each key saw a K-th of the flags
    assert model.detector.counts().flagged == accounts * b  # the shared index saw them all


def test_the_detector_flags_as_much_with_k_keys() -> None:
    """The same stream of 40 queries (10 images, each sent 4 times) under 1 and 5 keys: the
    shared index flags the same rows."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(10, 1, 8, 8, generator=g).repeat(4, 1, 1, 1)
    flagged = {}
    for k in (1, 5):
        model = Guarded(_scores, DETECTORS[DEFAULT](seed=0), on_detect="log", accounts=k)
        for row in x:
            model(row[None])
        flagged[k] = (model.stats.flagged, model.stats.own_flags)
        if k > 1:
            counts = [model.detector.counts(key).queries for key in model.keys]
            assert counts == [8] * 5  # round-robin: 40 calls, 8 a key
    assert flagged[1] == flagged[5] == (30, 30)


def test_one_account_keeps_the_api() -> None:
    det = DETECTORS[DEFAULT](seed=0)
    model = Guarded(_scores, det, account="me")
    assert model.keys == ("me",) and "accounts" not in repr(model)
    model5 = Guarded(_scores, det, account="me", accounts=3)
    assert model5.keys == ("me-0", "me-1", "me-2") and "accounts=3" in repr(model5)
    with pytest.raises(ValueError, match="accounts"):
        Guarded(_scores, det, accounts=0)
    with pytest.raises(TypeError, match="accounts"):
        Guarded(_scores, det, accounts=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="guarded"):
        model5.preload(torch.rand(1, 1, 8, 8), account="me-1")
