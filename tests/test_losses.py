"""Tests of randfeat.losses: the margin loss of Eq. 3 against its definition, and the log-likelihood."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from randfeat.losses import margin_loss, sample_loss


def test_margin_loss_worked_example() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 5.0], [1.0, 3.0, 2.0]])
    assert margin_loss(logits, torch.tensor([0, 1, 1])).tolist() == [1.0, 0.0, 1.0]


@given(
    n=st.integers(1, 5),
    k=st.integers(2, 6),
    seed=st.integers(0, 2**31),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
)
def test_margin_loss_is_the_definition(n: int, k: int, seed: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    # small integers: ties are frequent and every value is exact in every dtype
    logits = torch.randint(-3, 4, (n, k), generator=gen).to(dtype)
    y = torch.randint(0, k, (n,), generator=gen)
    out = margin_loss(logits, y)
    assert out.dtype == dtype and out.shape == (n,)
    for i in range(n):
        others = [float(logits[i, j]) for j in range(k) if j != int(y[i])]
        want = float(logits[i, y[i]]) - max(others)
        assert float(out[i]) == want
        # > 0 exactly when y is the unique arg max, the rule the attacks use for "not fooled"
        top = logits[i].max()
        unique_top = int((logits[i] == top).sum()) == 1 and float(logits[i, y[i]]) == float(top)
        assert (float(out[i]) > 0) == unique_top


def test_margin_loss_with_one_class_is_infinite() -> None:
    assert margin_loss(torch.tensor([[0.5]]), torch.tensor([0])).tolist() == [math.inf]


def test_margin_loss_leaves_the_logits_alone() -> None:
    logits = torch.tensor([[1.0, 2.0]])
    margin_loss(logits, torch.tensor([1]))
    assert logits.tolist() == [[1.0, 2.0]]


def test_sample_loss() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]])
    y = torch.tensor([0, 1])
    torch.testing.assert_close(sample_loss(logits, y), margin_loss(logits, y))
    want = torch.log_softmax(logits, 1)[torch.arange(2), y]
    torch.testing.assert_close(sample_loss(logits, y, "ce"), want)
    with pytest.raises(ValueError, match="Expected argument `loss` to be one of 'margin', 'ce'"):
        sample_loss(logits, y, "hinge")  # type: ignore[arg-type]
