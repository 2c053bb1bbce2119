"""One validator per kind of argument, all with one message template.

Every public function of randfeat checks its arguments first, before any work is spent, with the
functions below. A failed check names the argument, says what is allowed and shows the value it
got, in the template torchmetrics uses:

    Expected argument `nu` to be a finite float >= 0, but got -1.0.

A value of the wrong type raises `TypeError`; a value of the right type outside what is allowed
raises `ValueError`. `bool` is never accepted as a number, although Python counts it as an int.
Numbers of any real type are accepted (`int`, `float`, NumPy scalars) and returned as `float` /
`int`. Tensor checks read a value or two back to the CPU: they are meant for the API boundary, not
for hot paths.

Examples:
    >>> check_positive_float(0.5, "eps")
    0.5
    >>> check_choice("isotropc", "noise", ("isotropic", "feature-variance"))
    Traceback (most recent call last):
    ...
    ValueError: Expected argument `noise` to be one of 'isotropic', 'feature-variance', but got 'isotropc'. Did you mean 'isotropic'?
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

__all__ = [
    "check_batch",
    "check_choice",
    "check_float",
    "check_int",
    "check_labels",
    "check_nonnegative_float",
    "check_optional",
    "check_positive_float",
    "check_positive_int",
    "check_probability",
    "check_seed",
    "closest_names",
    "expected",
]

S = TypeVar("S", bound=str)
T = TypeVar("T")


def expected(name: str, what: str, value: object, fix: str = "") -> str:
    """The message "Expected argument `name` to be what, but got value." and an optional fix.

    Use it for errors of a kind the validators here do not cover, so that every message reads alike.

    Examples:
        >>> expected("budget", "an int >= 1", 0, "Pass --budget 1000.")
        'Expected argument `budget` to be an int >= 1, but got 0. Pass --budget 1000.'
    """
    message = f"Expected argument `{name}` to be {what}, but got {value!r}."
    return f"{message} {fix}" if fix else message


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _bound(value: float) -> str:
    return repr(int(value)) if float(value).is_integer() else f"{value:g}"


def _float_rule(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if low == -math.inf and high == math.inf:
        return "a finite float"
    if high == math.inf:
        return f"a finite float {'>' if low_open else '>='} {_bound(low)}"
    if low == -math.inf:
        return f"a finite float {'<' if high_open else '<='} {_bound(high)}"
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    return f"a float in {left}{_bound(low)}, {_bound(high)}{right}"


def check_float(
    value: object,
    name: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number in the interval from `low` to `high`, returned as a `float`.

    The interval is closed unless `low_open` / `high_open` say otherwise; an infinite bound only
    asks for a finite value.

    Raises:
        TypeError: not a real number (a `bool`, a string, a tensor, ...).
        ValueError: NaN, infinite, or outside the interval.
    """
    rule = _float_rule(low, high, low_open, high_open)
    if not _is_real(value):
        raise TypeError(expected(name, rule, value))
    v = float(value)  # type: ignore[arg-type]  # a numbers.Real
    above = v > low if low_open else v >= low
    below = v < high if high_open else v <= high
    if not (math.isfinite(v) and above and below):
        raise ValueError(expected(name, rule, value))
    return v


def check_positive_float(value: object, name: str) -> float:
    """A finite real number > 0 (a step, a tolerance, an ε, a proposal variance μ)."""
    return check_float(value, name, low=0.0, low_open=True)


def check_nonnegative_float(value: object, name: str) -> float:
    """A finite real number >= 0 (a variance ν, where 0 turns the noise off)."""
    return check_float(value, name, low=0.0)


def check_probability(
    value: object, name: str, *, allow_zero: bool = False, allow_one: bool = False
) -> float:
    """A probability or a fraction: in (0, 1) by default, `[0, ...` / `..., 1]` when allowed.

    Examples:
        >>> check_probability(0.02, "target_drop")
        0.02
        >>> check_probability(1.0, "p_init", allow_one=True)
        1.0
    """
    return check_float(
        value, name, low=0.0, high=1.0, low_open=not allow_zero, high_open=not allow_one
    )


def check_int(value: object, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """An integer (not a `bool`, not a float) between `low` and `high` inclusive, as an `int`.

    Raises:
        TypeError: not an integer.
        ValueError: below `low` or above `high`.
    """
    if low is not None and high is not None:
        rule = f"an int in [{low}, {high}]"
    elif low is not None:
        rule = f"an int >= {low}"
    elif high is not None:
        rule = f"an int <= {high}"
    else:
        rule = "an int"
    if not _is_int(value):
        raise TypeError(expected(name, rule, value))
    v = int(value)  # type: ignore[call-overload]  # a numbers.Integral
    if (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(expected(name, rule, value))
    return v


def check_positive_int(value: object, name: str) -> int:
    """An integer >= 1 (a count: draws, a batch size, a budget, votes)."""
    return check_int(value, name, low=1)


def check_seed(value: object, name: str = "seed") -> int | None:
    """`None` (noise from OS entropy, the default everywhere) or an int (reproducible).

    Raises:
        TypeError: anything else (a float, a string, a `bool`).
    """
    if value is None:
        return None
    if not _is_int(value):
        raise TypeError(
            expected(name, "None (OS entropy) or an int", value, "Pass an int to reproduce a run.")
        )
    return int(value)  # type: ignore[call-overload]  # a numbers.Integral


def check_optional(check: Callable[[object, str], T], value: object, name: str) -> T | None:
    """`None`, or a value that passes `check`; the message then says that `None` is allowed too.

    Examples:
        >>> check_optional(check_positive_int, None, "draws") is None
        True
        >>> check_optional(check_positive_int, 0, "draws")
        Traceback (most recent call last):
        ...
        ValueError: Expected argument `draws` to be None or an int >= 1, but got 0.
    """
    if value is None:
        return None
    try:
        return check(value, name)
    except (TypeError, ValueError) as err:
        head = f"Expected argument `{name}` to be "
        message = str(err)
        if not message.startswith(head):
            raise
        raise type(err)(head + "None or " + message[len(head) :]) from None


def closest_names(value: str, valid: Sequence[str], n: int = 5, cutoff: float = 0.5) -> list[str]:
    """Up to `n` names of `valid` that look like `value`, the closest first (for "did you mean")."""
    return difflib.get_close_matches(value, list(valid), n=n, cutoff=cutoff)


def check_choice(value: object, name: str, choices: Sequence[S], *, what: str = "") -> S:
    """One of `choices` (strings), returned as the matching element of `choices`.

    Args:
        value: the argument.
        name: its name, for the message.
        choices: the valid names.
        what: how the message describes the valid names (default: "one of 'a', 'b'"); pass a
            short description when there are too many to list.

    Raises:
        TypeError: not a string.
        ValueError: not one of `choices`; the message names the closest valid ones.
    """
    rule = what or "one of " + ", ".join(map(repr, choices))
    if not isinstance(value, str):
        raise TypeError(expected(name, rule, value))
    for c in choices:
        if value == c:
            return c
    close = closest_names(value, choices, n=3)
    hint = f"Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(expected(name, rule, value, hint))


def check_batch(x: object, name: str = "x") -> Tensor:
    """A non-empty floating batch `[N, ...]` with `N >= 1` and at least two dimensions.

    Raises:
        TypeError: not a floating tensor.
        ValueError: fewer than two dimensions, or no rows.
    """
    rule = "a non-empty float batch [N, ...]"
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"Expected argument `{name}` to be {rule}, but got {got}.")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"Expected argument `{name}` to be {rule}, but got shape {list(x.shape)}.")
    return x


def check_labels(
    y: object, n: int | None = None, classes: int | None = None, name: str = "y"
) -> Tensor:
    """Integer class labels `[n]` in `[0, classes)`, returned as int64 on their device.

    Args:
        y: the labels.
        n: the number of rows they must have (that of `x`), or `None` for any.
        classes: the number of classes K, or `None` to check only `y >= 0`.
        name: the argument's name, for the message.

    Raises:
        TypeError: not an integer tensor (floating, complex or `bool` labels are refused).
        ValueError: not one-dimensional, the wrong length, or a label out of range.
    """
    if (
        not isinstance(y, Tensor)
        or y.is_floating_point()
        or y.is_complex()
        or y.dtype == torch.bool
    ):
        got = f"dtype {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
        raise TypeError(f"Expected argument `{name}` to be an integer tensor [N], but got {got}.")
    length = "N" if n is None else str(n)
    if y.ndim != 1 or (n is not None and y.shape[0] != n):
        raise ValueError(
            f"Expected argument `{name}` to be labels of shape [{length}], but got shape "
            f"{list(y.shape)}."
        )
    if y.numel():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or (classes is not None and hi >= classes):
            allowed = f"in [0, {classes})" if classes is not None else ">= 0"
            raise ValueError(
                f"Expected argument `{name}` to be labels {allowed}, but got labels in "
                f"[{lo}, {hi}]."
            )
    return y.long()
