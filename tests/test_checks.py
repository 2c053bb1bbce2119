"""Tests of randfeat.checks: each validator accepts exactly what it documents, with one message."""

from __future__ import annotations

import doctest
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from randfeat import checks, losses
from randfeat.checks import (
    check_batch,
    check_choice,
    check_float,
    check_int,
    check_labels,
    check_nonnegative_float,
    check_optional,
    check_positive_float,
    check_positive_int,
    check_probability,
    check_seed,
    closest_names,
    expected,
)

NAME = "arg"
TEMPLATE = re.compile(r"^Expected argument `arg` to be .+, but got .+\.")
NOT_NUMBERS = [None, "1", b"1", True, False, [1.0], (1,), {}, torch.tensor(1.0), object()]


def _raises(error: type[Exception], fn: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(error) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    message = str(info.value)
    assert TEMPLATE.match(message), message
    return message


def test_docstring_examples() -> None:
    for module in (checks, losses):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


@given(
    value=st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**20), 10**20),
    low=st.floats(-10, 10) | st.just(-math.inf),
    width=st.floats(0, 20) | st.just(math.inf),
    low_open=st.booleans(),
    high_open=st.booleans(),
)
def test_check_float_accepts_exactly_the_interval(
    value: float, low: float, width: float, low_open: bool, high_open: bool
) -> None:
    high = low + width
    v = float(value)
    inside = (
        math.isfinite(v)
        and (v > low if low_open else v >= low)
        and (v < high if high_open else v <= high)
    )
    kw = {"low": low, "high": high, "low_open": low_open, "high_open": high_open}
    if inside:
        out = check_float(value, NAME, **kw)  # type: ignore[arg-type]
        assert type(out) is float and out == v
    else:
        message = _raises(ValueError, check_float, value, NAME, **kw)
        assert message.endswith(f"but got {value!r}.")


@pytest.mark.parametrize("value", NOT_NUMBERS)
def test_floats_refuse_non_numbers(value: object) -> None:
    for fn in (check_float, check_positive_float, check_nonnegative_float, check_probability):
        _raises(TypeError, fn, value, NAME)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_sign_checks(v: float) -> None:
    if math.isfinite(v) and v > 0:
        assert check_positive_float(v, NAME) == v
    else:
        assert "a finite float > 0" in _raises(ValueError, check_positive_float, v, NAME)
    if math.isfinite(v) and v >= 0:
        assert check_nonnegative_float(v, NAME) == v
    else:
        assert "a finite float >= 0" in _raises(ValueError, check_nonnegative_float, v, NAME)


@pytest.mark.parametrize(
    ("allow_zero", "allow_one", "rule"),
    [(False, False, "(0, 1)"), (True, False, "[0, 1)"), (False, True, "(0, 1]"), (True, True, "[0, 1]")],
)  # fmt: skip
def test_probability_ends(allow_zero: bool, allow_one: bool, rule: str) -> None:
    kw = {"allow_zero": allow_zero, "allow_one": allow_one}
    assert check_probability(0.5, NAME, **kw) == 0.5
    for end, allowed in ((0.0, allow_zero), (1.0, allow_one)):
        if allowed:
            assert check_probability(end, NAME, **kw) == end
        else:
            assert f"a float in {rule}" in _raises(ValueError, check_probability, end, NAME, **kw)
    for outside in (-1e-12, 1 + 1e-12, math.nan):
        _raises(ValueError, check_probability, outside, NAME, **kw)


def test_numpy_scalars_are_numbers() -> None:
    assert type(check_positive_float(np.float32(0.5), NAME)) is float
    assert type(check_positive_int(np.int64(3), NAME)) is int
    assert check_seed(np.int32(7)) == 7


@given(
    value=st.integers(-100, 100),
    low=st.none() | st.integers(-50, 50),
    high=st.none() | st.integers(-50, 50),
)
def test_check_int_accepts_exactly_the_range(value: int, low: int | None, high: int | None) -> None:
    inside = (low is None or value >= low) and (high is None or value <= high)
    if inside:
        out = check_int(value, NAME, low=low, high=high)
        assert type(out) is int and out == value
    else:
        _raises(ValueError, check_int, value, NAME, low=low, high=high)


@pytest.mark.parametrize("value", [*NOT_NUMBERS, 1.0, 2.5, math.nan])
def test_ints_refuse_non_integers(value: object) -> None:
    _raises(TypeError, check_int, value, NAME)
    assert "an int >= 1" in _raises(TypeError, check_positive_int, value, NAME)


@given(st.integers(-5, 5))
def test_positive_int(value: int) -> None:
    if value >= 1:
        assert check_positive_int(value, NAME) == value
    else:
        assert "an int >= 1" in _raises(ValueError, check_positive_int, value, NAME)


@given(st.none() | st.integers())
def test_seed_accepts_none_and_ints(seed: int | None) -> None:
    assert check_seed(seed) == seed


@pytest.mark.parametrize("seed", [True, 1.0, "0", torch.tensor(1)])
def test_seed_refuses_others(seed: object) -> None:
    message = _raises(TypeError, check_seed, seed, NAME)
    assert "None (OS entropy) or an int" in message and message.endswith("reproduce a run.")


@given(st.none() | st.integers(-3, 3))
def test_optional_says_none_is_allowed(value: int | None) -> None:
    if value is None or value >= 1:
        assert check_optional(check_positive_int, value, NAME) == value
    else:
        message = _raises(ValueError, check_optional, check_positive_int, value, NAME)
        assert message.startswith("Expected argument `arg` to be None or an int >= 1, but got")
    message = _raises(TypeError, check_optional, check_positive_int, "x", NAME)
    assert "to be None or an int >= 1" in message


def test_optional_passes_foreign_messages_through() -> None:
    def odd(value: object, name: str) -> int:
        raise ValueError("odd")

    with pytest.raises(ValueError, match=r"^odd$"):
        check_optional(odd, 1, NAME)


NAMES = st.lists(st.text("abcdef-", min_size=1, max_size=8), min_size=1, max_size=6, unique=True)


@given(NAMES, st.data())
def test_choice_returns_the_matching_choice(choices: list[str], data: st.DataObject) -> None:
    pick = data.draw(st.sampled_from(choices))
    assert check_choice(pick, NAME, choices) == pick


@given(NAMES, st.text("abcdefxyz-", max_size=9))
def test_choice_refuses_others_with_the_closest_names(choices: list[str], value: str) -> None:
    if value in choices:
        return
    message = _raises(ValueError, check_choice, value, NAME, choices)
    assert "to be one of " + ", ".join(map(repr, choices)) in message
    close = closest_names(value, choices, n=3)
    if close:
        assert message.endswith(f"Did you mean {', '.join(map(repr, close))}?")
    else:
        assert "Did you mean" not in message


def test_choice_names_the_typo_and_a_custom_rule() -> None:
    message = _raises(
        ValueError, check_choice, "isotropc", "arg", ("isotropic", "feature-variance")
    )
    assert message.endswith("but got 'isotropc'. Did you mean 'isotropic'?")
    message = _raises(ValueError, check_choice, "x", NAME, ["a", "b"], what="a model name")
    assert message.startswith("Expected argument `arg` to be a model name, but got 'x'.")
    _raises(TypeError, check_choice, 1, NAME, ["a"])


def test_expected_with_a_fix() -> None:
    assert expected("n", "an int >= 1", 0, "Pass 1.") == (
        "Expected argument `n` to be an int >= 1, but got 0. Pass 1."
    )


@given(
    n=st.integers(1, 6),
    classes=st.integers(1, 5),
    dtype=st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8]),
    seed=st.integers(0, 2**31),
)
def test_labels_in_range(n: int, classes: int, dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes + 1, (n,), generator=gen).to(dtype)
    if int(y.max()) < classes:
        out = check_labels(y, n=n, classes=classes)
        assert out.dtype == torch.int64 and torch.equal(out, y.long())
    else:
        message = _raises(ValueError, check_labels, y, n, classes, NAME)
        assert f"labels in [0, {classes})" in message


def test_labels_refusals() -> None:
    for bad in (torch.zeros(2), torch.zeros(2, dtype=torch.bool), [0, 1], None):
        assert "integer tensor [N]" in _raises(TypeError, check_labels, bad, name=NAME)
    assert "shape [3]" in _raises(
        ValueError, check_labels, torch.zeros(2, dtype=torch.long), 3, name=NAME
    )
    assert "shape [N]" in _raises(
        ValueError, check_labels, torch.zeros(2, 1, dtype=torch.long), name=NAME
    )
    assert ">= 0" in _raises(ValueError, check_labels, torch.tensor([-1, 0]), name=NAME)
    assert check_labels(torch.zeros(0, dtype=torch.long)).shape == (0,)


@given(shape=st.lists(st.integers(0, 3), min_size=0, max_size=4))
def test_batch_shapes(shape: list[int]) -> None:
    x = torch.zeros(shape)
    if len(shape) >= 2 and shape[0] > 0:
        assert check_batch(x, NAME) is x
    else:
        assert f"shape {shape}" in _raises(ValueError, check_batch, x, NAME)


def test_batch_types() -> None:
    assert "dtype torch.int64" in _raises(
        TypeError, check_batch, torch.zeros(2, 2, dtype=torch.long), NAME
    )
    assert "got list" in _raises(TypeError, check_batch, [[0.0]], NAME)
