"""The wire format of `randfeat serve`, shared by the server and the client.

Both sides of the HTTP API read this module and nothing else of each other: the server
([randfeat.serve.app][]) and the client [HTTPModel][randfeat.eval.remote.HTTPModel].

* `POST /v1/predict` takes images `[n, C, H, W]` in $[0, 1]$ as JSON
  (`{"inputs": [[[[...]]]]}`) or as a NumPy `.npy` body (`Content-Type: application/x-npy`,
  float16/32/64, `allow_pickle=False`). It answers `{"scores": [[...]]}` or `{"labels": [...]}`
  as JSON, or the bare array as `.npy` when the request says `Accept: application/x-npy`.
* `GET /v1/info` answers a [ServerInfo][randfeat.serve.protocol.ServerInfo].
* Every error is JSON: [ErrorBody][randfeat.serve.protocol.ErrorBody]. The codes a client is
  meant to act on are constants here: [QUERY_FLAGGED][randfeat.serve.protocol.QUERY_FLAGGED],
  [KEY_BANNED][randfeat.serve.protocol.KEY_BANNED] and
  [DETECTOR_UNAVAILABLE][randfeat.serve.protocol.DETECTOR_UNAVAILABLE].

This module needs only NumPy and the standard library (no FastAPI, no torch).
"""

from __future__ import annotations

import io
import json
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = [
    "API_KEY_HEADER",
    "DETECTOR_UNAVAILABLE",
    "JSON",
    "KEY_BANNED",
    "NPY",
    "QUERY_FLAGGED",
    "REJECTION_CODES",
    "REQUEST_ID_HEADER",
    "RETRY_AFTER_HEADER",
    "WORKER_HEADER",
    "ErrorBody",
    "Output",
    "ServerInfo",
    "decode_npy",
    "encode_npy",
]

NPY = "application/x-npy"
"""Media type of a NumPy `.npy` body (request or response)."""
JSON = "application/json"
API_KEY_HEADER = "X-API-Key"
"""The client's key: queries are counted (and limited) per key."""
REQUEST_ID_HEADER = "X-Request-Id"
"""Echoed on every response; the server makes one up when the client sends none."""
WORKER_HEADER = "X-Randfeat-Worker"
"""A random token per server process (not its pid): which worker answered."""

RETRY_AFTER_HEADER = "Retry-After"
"""Seconds to wait before retrying, sent with `503 detector_unavailable`."""

QUERY_FLAGGED = "query_flagged"
"""403: the detector flagged a row of the request, which was refused whole; the body's `rows`
lists the flagged rows (0-based, in the request). The rows were recorded and charged."""
KEY_BANNED = "key_banned"
"""403: the key has had `--ban-after` queries flagged and is refused on every request."""
DETECTOR_UNAVAILABLE = "detector_unavailable"
"""503 with `Retry-After`: the detector's store cannot be reached, so nothing is answered
unchecked (the server fails closed); nothing was charged. Retry later."""
REJECTION_CODES = (QUERY_FLAGGED, KEY_BANNED)
"""The codes of a request refused by query detection (a 403 that retrying does not change)."""

Output = Literal["scores", "labels"]


@dataclass(frozen=True)
class ServerInfo:
    """What `GET /v1/info` tells a client about the served model.

    The defense's configuration (`defense`, `layers`, `nu`) and the detector's (`detector`,
    `on_detect`) are `None` unless the server runs with `--reveal-config`: a service should not
    tell an attacker its noise scale, nor whether a flagged query is refused or only logged.
    That detection is on (`detection`) and that the noise is keyed (`keyed_noise`) are told: a
    client needs them to read a 403 and to know that resubmitting an image gets the same answer.

    Attributes:
        model: the model's name, e.g. `"digits-cnn"` or `"resnet18"`.
        input_shape: `(C, H, W)` of one image.
        classes: number of classes $K$ (columns of `scores`).
        output: `"scores"` (the $K$ logits per image) or `"labels"` (the argmax only).
        defended: whether the answers carry randomized noise.
        max_images: the most images one request may hold.
        max_body_bytes: the largest request body the server reads.
        defense: `"base"`, `"input"` or `"feature"` (revealed only).
        layers: the perturbed layers (revealed only).
        nu: the variance ν of the noise (revealed only).
        version: the randfeat version of the server.
        detection: whether queries go through a stateful detector (`randfeat serve --detect`).
        keyed_noise: whether the noise is a function of a secret key and the image (the same
            image gets the same answer every time) rather than fresh at every query.
        detector: the detector's name (revealed only).
        on_detect: `"reject"`, `"ban"` or `"log"`, what a flagged query gets (revealed only).
    """

    model: str
    input_shape: tuple[int, int, int]
    classes: int
    output: Output
    defended: bool
    max_images: int
    max_body_bytes: int
    defense: str | None = None
    layers: tuple[str, ...] | None = None
    nu: float | None = None
    version: str = field(default="")
    detection: bool = False
    keyed_noise: bool = False
    detector: str | None = None
    on_detect: str | None = None

    def public(self) -> ServerInfo:
        """This record without the defense's and the detector's configuration (what an
        unrevealing server says)."""
        return ServerInfo(
            self.model,
            self.input_shape,
            self.classes,
            self.output,
            self.defended,
            self.max_images,
            self.max_body_bytes,
            version=self.version,
            detection=self.detection,
            keyed_noise=self.keyed_noise,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ServerInfo:
        """The record from [to_json][randfeat.serve.protocol.ServerInfo.to_json]'s dict.

        Raises:
            ValueError: a missing or malformed field (not a randfeat server, or another version).
        """
        try:
            shape = tuple(int(s) for s in d["input_shape"])
            if len(shape) != 3:
                raise ValueError(f"input_shape {shape} is not (C, H, W)")
            output = d["output"]
            if output not in ("scores", "labels"):
                raise ValueError(f"output {output!r} is not 'scores' or 'labels'")
            layers = d.get("layers")
            nu = d.get("nu")
            return cls(
                model=str(d["model"]),
                input_shape=(shape[0], shape[1], shape[2]),
                classes=int(d["classes"]),
                output=output,
                defended=bool(d["defended"]),
                max_images=int(d["max_images"]),
                max_body_bytes=int(d["max_body_bytes"]),
                defense=d.get("defense"),
                layers=None if layers is None else tuple(str(s) for s in layers),
                nu=None if nu is None else float(nu),
                version=str(d.get("version", "")),
                detection=bool(d.get("detection", False)),  # absent before detection existed
                keyed_noise=bool(d.get("keyed_noise", False)),
                detector=_optional_str(d.get("detector")),
                on_detect=_optional_str(d.get("on_detect")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"Expected a randfeat server's /v1/info record, but got {d!r} ({err})."
            ) from err


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class ErrorBody:
    """The JSON body of every error answer (4xx and 5xx).

    Attributes:
        error: a stable machine-readable code, e.g. `"bad_shape"`, `"query_budget_exhausted"`.
        message: what was wrong, what is allowed, and the fix.
        request_id: the id to quote when reporting a problem (it is in the server's log).
        detail: extra fields of some errors (e.g. `limit`, `used` for 429).
    """

    error: str
    message: str
    request_id: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """`{"error": ..., "message": ..., "request_id": ..., **detail}`."""
        return {
            "error": self.error,
            "message": self.message,
            "request_id": self.request_id,
            **self.detail,
        }

    @classmethod
    def from_response(cls, status: int, body: bytes) -> ErrorBody:
        """Parse an error answer; a body that is not ours becomes `error="http_<status>"`."""
        try:
            d = json.loads(body)
            if isinstance(d, dict) and isinstance(d.get("error"), str):
                known = {"error", "message", "request_id"}
                return cls(
                    d["error"],
                    str(d.get("message", "")),
                    str(d.get("request_id", "")),
                    {k: v for k, v in d.items() if k not in known},
                )
        except ValueError:
            pass
        text = body[:200].decode("utf-8", "replace")
        return cls(f"http_{status}", text)


def encode_npy(array: np.ndarray[Any, Any]) -> bytes:
    """The `.npy` bytes of `array` (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


_NPY_LOCK = threading.Lock()
"""NumPy reads a `.npy` header with `ast.literal_eval`, and CPython 3.11 can fail with
"SystemError: AST constructor recursion depth mismatch" when two threads build ASTs at once
(seen with 16 client threads and a server in one process): one header at a time."""


def decode_npy(body: bytes) -> np.ndarray[Any, Any]:
    """The array in `.npy` bytes; never unpickles.

    Raises:
        ValueError: the bytes are not a `.npy` file of a plain (non-object) array.
    """
    try:
        with _NPY_LOCK:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"not a valid .npy array ({err})") from err
    if not isinstance(arr, np.ndarray):
        raise ValueError("not a single .npy array")
    return arr
