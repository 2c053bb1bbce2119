"""Decoding and validating the body of `POST /v1/predict`, before any model work is spent.

Every way a request can be wrong becomes a [RequestError][randfeat.serve.decode.RequestError]
with its HTTP status, a stable code and a message that says what was wrong, what is allowed and how
to fix it. The server turns it into a JSON [ErrorBody][randfeat.serve.protocol.ErrorBody].

| what is wrong | status | code |
| --- | --- | --- |
| a media type other than JSON or `.npy` | 415 | `unsupported_media_type` |
| a body that is not JSON | 400 | `malformed_json` |
| a JSON body without `inputs` | 422 | `missing_inputs` |
| a ragged array, or not numbers | 422 | `bad_dtype` |
| a bad `.npy` file | 400 | `malformed_npy` |
| a rank other than 4 | 422 | `bad_rank` |
| `[n, C, H, W]` with other `C, H, W` | 422 | `bad_shape` |
| no images | 422 | `empty_batch` |
| NaN or ±inf | 422 | `not_finite` |
| values outside $[0, 1]$ | 422 | `out_of_range` |
| more images than `max_images` | 413 | `too_many_images` |
| a body over the size limit | 413 | `body_too_large` |
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from randfeat.serve.protocol import JSON, NPY, decode_npy

__all__ = ["RequestError", "decode_inputs", "media_type"]


class RequestError(Exception):
    """A bad request: the HTTP status, a stable code and a message for the client.

    Args:
        status: the HTTP status (4xx).
        code: a stable machine-readable code (see the table of this module).
        message: what was wrong, what is allowed, the fix.
        detail: extra JSON fields for the client.
    """

    def __init__(
        self, status: int, code: str, message: str, detail: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = dict(detail or {})


def media_type(content_type: str | None) -> str:
    """The bare media type of a `Content-Type` header (`JSON` when there is none).

    Raises:
        RequestError: 415 for anything but JSON or `.npy`.
    """
    if not content_type:
        return JSON
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind in (JSON, NPY):
        return kind
    raise RequestError(
        415,
        "unsupported_media_type",
        f"Expected Content-Type {JSON!r} or {NPY!r}, but got {content_type!r}.",
    )


def _from_json(body: bytes) -> np.ndarray[Any, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(
            400,
            "malformed_json",
            f'The body is not valid JSON ({err}). Send {{"inputs": [[[[...]]]]}}.',
        ) from err
    if not isinstance(doc, dict) or "inputs" not in doc:
        got = sorted(doc)[:5] if isinstance(doc, dict) else type(doc).__name__
        raise RequestError(
            422,
            "missing_inputs",
            f'Expected a JSON object with the key "inputs" holding images [n, C, H, W], '
            f"but got {got}.",
        )
    try:
        arr = np.asarray(doc["inputs"])
    except ValueError as err:  # NumPy >= 1.24 refuses ragged nested lists
        raise RequestError(
            422,
            "bad_dtype",
            f'Expected "inputs" to be a rectangular array of numbers [n, C, H, W], but it is '
            f"ragged ({err}).",
        ) from err
    if arr.dtype.kind not in "iuf":
        raise RequestError(
            422,
            "bad_dtype",
            f'Expected "inputs" to hold numbers in [0, 1], but got values of type '
            f"{arr.dtype.name!r} (strings, booleans, nulls or ragged lists are refused).",
        )
    return arr


def _from_npy(body: bytes) -> np.ndarray[Any, Any]:
    try:
        arr = decode_npy(body)
    except ValueError as err:
        raise RequestError(400, "malformed_npy", f"The body is {err}.") from err
    if arr.dtype.kind != "f":
        raise RequestError(
            422,
            "bad_dtype",
            f"Expected a float16, float32 or float64 .npy array in [0, 1], but got dtype "
            f"{arr.dtype.name!r}. Convert integer pixels with x / 255.",
        )
    return arr


def decode_inputs(
    body: bytes,
    content_type: str | None,
    *,
    input_shape: tuple[int, int, int],
    max_images: int,
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The images of a predict request as a float32 array `[n, C, H, W]` in $[0, 1]$.

    Args:
        body: the raw request body.
        content_type: its `Content-Type` header (JSON when missing).
        input_shape: the served model's `(C, H, W)`.
        max_images: the most images one request may hold.

    Raises:
        RequestError: the first thing wrong, as listed in this module's table.
    """
    arr = _from_npy(body) if media_type(content_type) == NPY else _from_json(body)
    want = "[n, " + ", ".join(str(s) for s in input_shape) + "]"
    if arr.ndim >= 1 and arr.shape[0] == 0:
        raise RequestError(422, "empty_batch", f"Expected at least one image {want}, got none.")
    if arr.ndim != 4:
        raise RequestError(
            422,
            "bad_rank",
            f"Expected images of shape {want} (rank 4), but got shape {list(arr.shape)}. "
            "Send one image as a batch of one: [[image]].",
            {"expected_shape": ["n", *input_shape]},
        )
    if tuple(arr.shape[1:]) != input_shape:
        raise RequestError(
            422,
            "bad_shape",
            f"Expected images of shape {want}, but got shape {list(arr.shape)}.",
            {"expected_shape": ["n", *input_shape]},
        )
    n = arr.shape[0]
    if n > max_images:
        raise RequestError(
            413,
            "too_many_images",
            f"Expected at most {max_images} images per request, but got {n}. Split the batch.",
            {"max_images": max_images},
        )
    x = arr.astype(np.float32, copy=False)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise RequestError(422, "not_finite", "Expected finite pixel values, but got NaN or inf.")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise RequestError(
            422,
            "out_of_range",
            f"Expected pixel values in [0, 1], but got values in [{lo:.4g}, {hi:.4g}]. "
            "Scale images to [0, 1]; the server normalises them itself.",
        )
    return np.ascontiguousarray(x)
