"""Tests of `randfeat.batches.repeated_rows` and of the judging passes that use it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from randfeat.batches import repeated_rows
from randfeat.eval.oracle import Oracle, count_wrong, rejudge


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 9), times=st.integers(1, 7), batch=st.integers(1, 20))
def test_repeated_rows_are_repeat_interleave_in_full_batches(
    n: int, times: int, batch: int
) -> None:
    x = torch.arange(n * 2, dtype=torch.float32).view(n, 1, 2)
    batches = list(repeated_rows(x, times, batch))
    sizes = [b.shape[0] for b in batches]
    got = torch.cat(batches) if batches else torch.empty(0, 1, 2)
    assert torch.equal(got, x.repeat_interleave(times, dim=0))
    # every batch but the last is full, so the number of calls is ceil(n * times / batch)
    assert all(s == batch for s in sizes[:-1])
    assert len([s for s in sizes if s]) == -(-n * times // batch)


def test_repeated_rows_refuse_zero_times_or_batch() -> None:
    with pytest.raises(ValueError, match="times=0"):
        list(repeated_rows(torch.zeros(2, 1), 0, 4))
    with pytest.raises(ValueError, match="batch_size=0"):
        list(repeated_rows(torch.zeros(2, 1), 2, 0))


class Recorder:
    """Class 0 unless pixel 0 exceeds 0.5; records the rows of every call and the most rows the
    storage behind an input held (a slice of one big repeated tensor holds all of its rows)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.stored = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        row = x[0].numel() * x.element_size()
        self.stored = max(self.stored, x.untyped_storage().nbytes() // row)
        s = x.flatten(1)[:, 0] - 0.5
        return torch.stack([-s, s], dim=1)


def _points(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.full((n, 1, 2, 2), 0.4)
    x[::2, 0, 0, 0] = 0.9  # even images are misclassified
    return x, torch.zeros(n, dtype=torch.long)


def test_count_wrong_and_rejudge_fill_every_call_across_images() -> None:
    """7 images × 9 votes at batch 16: 4 calls of 16, 16, 16, 15 rows (a per-image split would
    make 7 calls of 9), and the verdicts are those of the repeated rows."""
    x, y = _points(7)
    m = Recorder()
    wrong = count_wrong(m, x, y, votes=9, batch_size=16)
    assert m.sizes == [16, 16, 16, 15]
    assert m.stored == 16  # one call's rows in memory, not all 63
    assert wrong.tolist() == [9, 0, 9, 0, 9, 0, 9]
    m = Recorder()
    fresh = rejudge(m, x, y, votes=9, forwards=50, batch_size=64)  # 350 rows
    assert m.sizes == [64] * 5 + [30]
    assert m.stored == 64
    assert fresh.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]


def test_oracle_verification_is_split_into_full_forward_batches() -> None:
    """Four apparent successes × 9 votes = 36 verification rows at batch 16: 16, 16, 4."""
    x, y = _points(4)
    x[:, 0, 0, 0] = 0.4
    m = Recorder()
    o = Oracle(m, x, y, budget=5, eps=1.0, norm="linf", votes=9, batch_size=16)
    q = x.clone()
    q[:, 0, 0, 0] = 0.9
    o.scores(q, torch.arange(4))
    assert m.sizes == [4, 16, 16, 4]
    assert m.stored == 16
    assert o.success.tolist() == [True] * 4
    assert o.verify_forwards.tolist() == [9] * 4
