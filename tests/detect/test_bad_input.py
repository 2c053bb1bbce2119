"""Bad input to a detector: a clear error naming the argument and the fix, before any work."""

from __future__ import annotations

import pytest
import torch
from _detect_images import smooth_images
from hypothesis import given, settings
from hypothesis import strategies as st

from randfeat.detect import DEFAULT, DETECTORS, AccountCounts, open_store

NAMES = sorted(DETECTORS)
GOOD = smooth_images(2, seed=0)


def _nan() -> torch.Tensor:
    x = GOOD.clone()
    x[1, 0, 3, 3] = float("nan")
    return x


def _inf() -> torch.Tensor:
    x = GOOD.clone()
    x[0, 0, 0, 0] = float("inf")
    return x


BAD_X = [
    ("not a tensor", GOOD.tolist(), TypeError, "float tensor"),
    ("uint8 images", (GOOD * 255).to(torch.uint8), TypeError, r"x\.float\(\) / 255"),
    ("integer dtype", torch.zeros(2, 1, 28, 28, dtype=torch.long), TypeError, "dtype torch.int64"),
    ("one image without batch", GOOD[0], ValueError, r"unsqueeze\(0\)"),
    ("flat rows", GOOD.flatten(1), ValueError, r"shape \[2, 784\]"),
    ("five dimensions", GOOD.unsqueeze(0), ValueError, r"\[N, C, H, W\]"),
    ("empty batch", GOOD[:0], ValueError, "non-empty"),
    ("above one", GOOD * 2 + 0.01, ValueError, r"in \[0, 1\].*before normalisation"),
    ("below zero", GOOD - 0.5, ValueError, r"in \[0, 1\]"),
    ("NaN", _nan(), ValueError, "NaN"),
    ("inf", _inf(), ValueError, "NaN or infinite"),
]


def _untouched(det: object) -> None:
    assert det.stored() == 0  # type: ignore[attr-defined]
    assert det.counts() == AccountCounts(0, 0)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("case", "x", "error", "match"), BAD_X, ids=[c[0] for c in BAD_X])
def test_observe_refuses_bad_images_before_any_work(
    name: str, case: str, x: object, error: type[Exception], match: str
) -> None:
    det = DETECTORS[name](seed=0)
    with pytest.raises(error, match="Expected argument `x`") as info:
        det.observe(x)  # type: ignore[arg-type]
    assert info.match(match)
    _untouched(det)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("account", "tag", "error", "match"),
    [
        ("", None, ValueError, "account"),
        (None, None, TypeError, "account"),
        (7, None, TypeError, "account"),
        ("x" * 257, None, ValueError, "account"),
        ("line\nbreak", None, ValueError, "account"),
        ("alice", "", ValueError, "tag"),
        ("alice", 3, TypeError, "tag"),
    ],
)
def test_observe_refuses_bad_accounts_and_tags(
    name: str, account: object, tag: object, error: type[Exception], match: str
) -> None:
    det = DETECTORS[name](seed=0)
    with pytest.raises(error, match=f"Expected argument `{match}`"):
        det.observe(GOOD, account, tag=tag)  # type: ignore[arg-type]
    _untouched(det)


@pytest.mark.parametrize("name", NAMES)
def test_another_image_shape_after_the_first_is_refused(name: str) -> None:
    det = DETECTORS[name](seed=0)
    det.observe(GOOD)
    with pytest.raises(ValueError, match=r"shape \[1, 28, 28\].*one detector \(and store\) per"):
        det.observe(smooth_images(1, seed=1, shape=(3, 32, 32)))
    assert det.stored() == 2


@settings(max_examples=30, deadline=None)
@given(
    value=st.floats(width=32, allow_nan=True, allow_infinity=True).filter(lambda v: not 0 <= v <= 1)
)
def test_any_value_outside_the_unit_interval_is_refused(value: float) -> None:
    x = GOOD.clone()
    x[0, 0, 5, 5] = value
    with pytest.raises(ValueError, match="Expected argument `x`"):
        DETECTORS[DEFAULT](seed=0).observe(x)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"capacity": 0}, ValueError, "capacity"),
        ({"capacity": 1.5}, TypeError, "capacity"),
        ({"posting_cap": 0}, ValueError, "posting_cap"),
        ({"ttl": -1.0}, ValueError, "ttl"),
        ({"ttl": 0}, ValueError, "ttl"),
        ({"threshold": float("nan")}, ValueError, "threshold"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"seed": "1"}, TypeError, "seed"),
        ({"shape": (1, 28)}, ValueError, "shape"),
        ({"shape": (1, 0, 28)}, ValueError, "shape"),
        ({"clock": 3.0}, TypeError, "clock"),
        ({"store": 3}, TypeError, "store"),
        ({"store": "mongodb://h:1/0"}, ValueError, r"'memory', 'sqlite:PATH', 'redis://"),
        ({"store": "memroy"}, ValueError, "Did you mean 'memory'"),
        ({"store": "sqlite:"}, ValueError, "Name the file"),
        ({"store": "redis://host:port/0"}, ValueError, "numeric port"),
        ({"store": "redis://h:1/x"}, ValueError, "numeric port and database"),
    ],
)
def test_bad_settings_are_refused_at_construction(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        DETECTORS[DEFAULT](**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"size": 0}, ValueError, "size"),
        ({"tables": 0}, ValueError, "tables"),
        ({"projections": 0}, ValueError, "projections"),
        ({"width": 0.0}, ValueError, "width"),
    ],
)
def test_bad_settings_of_the_default_detector(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=f"Expected argument `{match}`"):
        DETECTORS[DEFAULT](**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"window": 0}, "window"), ({"step": 0}, "step"), ({"quantization": 0.5}, "quantization"),
     ({"top": 0}, "top")],
)  # fmt: skip
def test_bad_settings_of_blacklight(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=f"Expected argument `{match}`"):
        DETECTORS["blacklight"](**kwargs)  # type: ignore[arg-type]


def test_a_window_longer_than_the_image_is_refused() -> None:
    with pytest.raises(ValueError, match="smaller window"):
        DETECTORS["blacklight"](window=100).observe(torch.rand(1, 1, 4, 4))


@pytest.mark.parametrize("name", NAMES)
def test_calibrate_refuses_bad_arguments_before_any_work(name: str) -> None:
    det = DETECTORS[name](seed=0)
    x = smooth_images(50, seed=2)
    for fpr in (0.0, 0.6, 1.0, float("nan")):
        with pytest.raises(ValueError, match="Expected argument `target_fpr`"):
            det.calibrate(x, fpr)
    with pytest.raises(TypeError, match="Expected argument `target_fpr`"):
        det.calibrate(x, "0.01")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"at least 1 / target_fpr = 100 images.*got 50 images"):
        det.calibrate(x, 0.01)
    with pytest.raises(ValueError, match=r"Expected argument `benign\[1\]`.*in \[0, 1\]"):
        det.calibrate([x[:25], x[25:] * 3], 0.1)
    with pytest.raises(TypeError, match="Expected argument `benign`"):
        det.calibrate((x * 255).byte(), 0.1)
    assert det.threshold == DETECTORS[name].default_threshold
    _untouched(det)


def test_the_unknown_scheme_error_lists_every_allowed_store() -> None:
    with pytest.raises(ValueError) as info:
        open_store("postgres://db/1")
    for allowed in ("'memory'", "'sqlite:PATH'", "'redis://HOST:PORT/DB'"):
        assert allowed in str(info.value)
