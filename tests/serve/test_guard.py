"""The server's detection gate on its own: what each `on_detect` does, and failing closed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _serve_helpers import FlakyStore
from torch import Tensor

from randfeat.detect import DEFAULT, DETECTORS, Detector
from randfeat.serve.config import DetectOptions
from randfeat.serve.guard import Decision, DetectorSpec, Guard, account_of, check_store_spec


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _detector(store: Any = "memory") -> Detector:
    return DETECTORS[DEFAULT](seed=0, store=store)


def test_a_request_with_one_flagged_row_is_refused_whole_and_every_row_is_recorded(
    digits: Any,
) -> None:
    det = _detector()
    guard = Guard(det, DetectOptions(on_detect="reject"))
    x = digits.x_test
    first = guard.screen([x[:3], x[3:5]], ["a", "b"])
    assert first == [Decision(True), Decision(True)]  # distinct digits: nothing flagged
    # b sends a new digit, a copy of a's row 1 and another new digit: refused whole, row 1 named
    again = guard.screen([torch.cat([x[10:11], x[1:2], x[11:12]])], ["b"])
    assert again == [Decision(False, "query_flagged", (1,))]
    assert det.counts("b").queries == 5 and det.counts("b").flagged == 1  # all rows recorded


def test_the_rows_of_one_accounts_requests_are_compared_with_each_other_in_one_batch(
    digits: Any,
) -> None:
    guard = Guard(_detector())
    x = digits.x_test
    # two requests of one account merged into one batch: the second repeats the first
    out = guard.screen([x[:2], x[1:2], x[5:6]], ["a", "a", "c"])
    assert out == [Decision(True), Decision(False, "query_flagged", (0,)), Decision(True)]


def test_log_answers_a_flagged_request_and_names_its_rows(digits: Any) -> None:
    det = _detector()
    guard = Guard(det, DetectOptions(on_detect="log"))
    x = digits.x_test[:2]
    guard.screen([x], ["a"])
    assert guard.screen([x], ["a"]) == [Decision(True, None, (0, 1))]  # answered, flagged
    assert det.counts("a").flagged == 2


def test_ban_refuses_every_request_after_ban_after_flags_without_observing_it(
    digits: Any,
) -> None:
    det = _detector()
    guard = Guard(det, DetectOptions(on_detect="ban", ban_after=3))
    x = digits.x_test
    acc = account_of("mallory")
    assert guard.screen([x[:2]], [acc]) == [Decision(True)]
    assert guard.screen([x[:2]], [acc]) == [Decision(False, "query_flagged", (0, 1))]  # 2 flags
    assert not guard.is_banned(acc)
    assert guard.screen([x[1:2]], [acc]) == [Decision(False, "query_flagged", (0,))]  # 3 flags
    assert guard.is_banned(acc)
    seen = det.counts(acc).queries
    # a distinct, benign image is refused too, and not even observed
    assert guard.screen([x[100:101]], [acc]) == [Decision(False, "key_banned")]
    assert det.counts(acc).queries == seen
    # another key is unaffected; a new guard on the same store sees the ban (it is in the store)
    assert guard.screen([x[200:201]], ["other"]) == [Decision(True)]
    fresh = Guard(det, DetectOptions(on_detect="ban", ban_after=3))
    assert not fresh.is_banned(acc)
    assert fresh.screen([x[300:301]], [acc]) == [Decision(False, "key_banned")]


def test_a_failing_store_fails_closed_then_recovers_after_retry_after(digits: Any) -> None:
    store = FlakyStore()
    clock = Clock()
    guard = Guard(_detector(store), DetectOptions(retry_after_s=2), clock=clock)
    x = digits.x_test
    assert guard.screen([x[:1]], ["a"]) == [Decision(True)]
    store.down = True
    down = [Decision(False, "detector_unavailable")] * 2
    assert guard.screen([x[1:2], x[2:3]], ["a", "b"]) == down
    calls = store.calls
    clock.now += 1.5  # within Retry-After: the store is left alone
    assert guard.screen([x[3:4]], ["a"]) == down[:1]
    assert store.calls == calls
    store.down = False
    clock.now += 1.0  # past it: tried again, and it is back
    assert guard.screen([x[4:5]], ["a"]) == [Decision(True)]


def test_fail_open_answers_unchecked_while_the_store_is_down(digits: Any) -> None:
    store = FlakyStore()
    guard = Guard(_detector(store), DetectOptions(fail_open=True))
    store.down = True
    x = digits.x_test[:1]
    assert guard.screen([x], ["a"]) == [Decision(True, checked=False)]


def test_ban_mode_fails_closed_when_the_counts_cannot_be_read(digits: Any) -> None:
    store = FlakyStore()
    guard = Guard(_detector(store), DetectOptions(on_detect="ban"))
    store.down = True
    assert guard.screen([digits.x_test[:1]], ["a"]) == [Decision(False, "detector_unavailable")]


def test_accounts_are_hashes_of_the_keys() -> None:
    assert account_of(None) == "-"
    a = account_of("alice-secret")
    assert a.startswith("key:") and "alice" not in a and len(a) == 20
    assert a == account_of("alice-secret") != account_of("alice-secret2")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "pooled-lnf"}, "Did you mean 'pooled-linf'"),
        ({"name": DEFAULT, "store": "redsi://127.0.0.1:6379/0"}, "Did you mean 'redis'"),
        ({"name": DEFAULT, "store": "sqlite:"}, "store spec"),
        ({"name": DEFAULT, "threshold": "high"}, "threshold"),
    ],
)
def test_a_bad_spec_is_refused_before_anything_is_opened(
    kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        DetectorSpec(**kwargs)


def test_a_spec_builds_the_named_detector_with_its_threshold() -> None:
    det = DetectorSpec("blacklight", threshold=41.0).build((1, 8, 8))
    assert det.name == "blacklight" and det.threshold == 41.0
    assert check_store_spec("sqlite:/tmp/x.db") == "sqlite:/tmp/x.db"


def test_the_screen_runs_before_the_forward_and_only_admitted_requests_are_computed() -> None:
    from randfeat.serve.batcher import MicroBatcher

    seen: list[int] = []

    def forward(x: Tensor) -> Tensor:
        seen.append(x.shape[0])
        return x.sum(dim=1)

    def screen(xs: Any, accounts: Any) -> list[Decision]:
        return [Decision(a != "bad", None if a != "bad" else "query_flagged") for a in accounts]

    b = MicroBatcher(forward, max_batch=8, max_wait_ms=0, screen=screen)
    b.start()
    try:
        bad = b.submit(torch.ones(3, 2), "bad").result(timeout=10)
        good = b.submit(torch.ones(2, 2), "good").result(timeout=10)
    finally:
        b.stop()
    assert bad.output is None and bad.admission == Decision(False, "query_flagged")
    assert good.output is not None and good.output.tolist() == [2.0, 2.0]
    assert seen == [2]  # the refused request never reached the model
