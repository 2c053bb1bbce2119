"""The checks of a detector's arguments: images, account names and tags, image shapes.

Each raises before any work, with the template of `randfeat.checks` ("Expected argument `x` to
be ..., but got ...") and the fix where there is one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from randfeat.checks import check_positive_int, expected

__all__ = ["MAX_NAME_LENGTH", "check_images", "check_name", "check_shape", "refuse"]

MAX_NAME_LENGTH = 256
"""The longest account name or tag accepted."""


def refuse(name: str, what: str, got: str, fix: str = "") -> str:
    """`expected`'s message with `got` described in words (not a repr)."""
    message = f"Expected argument `{name}` to be {what}, but got {got}."
    return f"{message} {fix}" if fix else message


def check_images(x: object, name: str = "x") -> Tensor:
    """A float batch `[N, C, H, W]` with `N >= 1`, finite, in $[0, 1]$ (one host sync).

    Raises:
        TypeError: not a floating tensor.
        ValueError: another number of dimensions, no rows, NaN or infinite values, or values
            outside $[0, 1]$.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f"a tensor of dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(
            refuse(
                name,
                "a float tensor [N, C, H, W] in [0, 1]",
                got,
                "Convert images with `x.float() / 255`.",
            )
        )
    if x.ndim != 4 or x.shape[0] == 0 or min(x.shape[1:]) == 0:
        raise ValueError(
            refuse(
                name,
                "a non-empty batch of images [N, C, H, W]",
                f"shape {list(x.shape)}",
                "Add the batch dimension with `x.unsqueeze(0)` for one image.",
            )
        )
    lo, hi = torch.aminmax(x.detach())
    lo_f, hi_f = float(lo), float(hi)
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):  # NaN propagates through aminmax
        raise ValueError(refuse(name, "finite images in [0, 1]", "NaN or infinite values"))
    if lo_f < 0 or hi_f > 1:
        raise ValueError(
            refuse(
                name,
                "images in [0, 1]",
                f"values in [{lo_f:.4g}, {hi_f:.4g}]",
                "Pass the images before normalisation (the model's own transform comes after).",
            )
        )
    return x.detach()


def check_name(value: object, name: str, *, optional: bool = False) -> str:
    what = "a non-empty string" + (" or None" if optional else "")
    what += f" of at most {MAX_NAME_LENGTH} characters"
    if not isinstance(value, str):
        raise TypeError(expected(name, what, value))
    if not value or len(value) > MAX_NAME_LENGTH or not value.isprintable():
        raise ValueError(expected(name, what + " (printable)", value))
    return value


def check_shape(shape: object) -> tuple[int, int, int]:
    what = "an image shape [C, H, W] of positive ints"
    if not isinstance(shape, Sequence) or len(shape) != 3:
        raise ValueError(expected("shape", what, shape))
    try:
        out = tuple(check_positive_int(v, "shape") for v in shape)
    except (TypeError, ValueError):
        raise ValueError(expected("shape", what, shape)) from None
    return out[0], out[1], out[2]
