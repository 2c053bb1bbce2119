"""A model behind an HTTP endpoint, as a callable the attacks and the oracle can query.

[HTTPModel][randfeat.eval.remote.HTTPModel] turns a `randfeat serve` endpoint (or any server that
speaks [its protocol][randfeat.serve.protocol]) into what every attack expects: a callable from
a tensor batch `[n, C, H, W]` in $[0, 1]$ to a tensor of scores `[n, K]` (or labels `[n]`). The
threat model of the paper is exactly this: the attacker sees only what the API answers.

Queries are counted by the [Oracle][randfeat.eval.oracle.Oracle], once per row it asks for, before
the model is called: retries inside `HTTPModel` (after a connection error or a 5xx) are invisible
to it, so a retried request is never charged twice to a sample. The server counts images per key
on its side and refunds a request that failed with a 5xx.

**A request refused by the server's query detector** (`randfeat serve --detect`) raises
[QueryRejected][randfeat.eval.remote.QueryRejected], with the wire code (`query_flagged` or
`key_banned`) and the flagged rows. It is never retried: the detector recorded the rows, and
sending them again is what it flags. How such a query counts: it was **sent and not answered**.
The server charges the refused rows of `query_flagged` to the key (it examined and stored them;
`key_banned` rows are not examined and not charged). In the evaluation, the exception propagates
out of `HTTPModel.__call__` to the [Oracle][randfeat.eval.oracle.Oracle], which charges every
row of the call to its sample (they were sent: a refusal costs the attacker its queries), and on
out of the attack's `run`, with no answer for those rows. `err.rows` names the flagged rows;
`err.answered` rows of the call were answered by earlier requests (their answers are dropped).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from randfeat.checks import (
    check_choice,
    check_int,
    check_nonnegative_float,
    check_positive_float,
    check_positive_int,
    expected,
)
from randfeat.eval.errors import QueryRefused
from randfeat.serve.protocol import (
    API_KEY_HEADER,
    JSON,
    NPY,
    REJECTION_CODES,
    REQUEST_ID_HEADER,
    RETRY_AFTER_HEADER,
    ErrorBody,
    Output,
    ServerInfo,
    decode_npy,
    encode_npy,
)

__all__ = ["HTTPModel", "QueryRejected", "RemoteError"]

logger = logging.getLogger(__name__)

_NPY_HEADER_BYTES = 128  # a .npy header is 64 or 128 bytes; the body limit counts it


class RemoteError(RuntimeError):
    """The server refused a request (4xx), or kept failing (5xx, connection) after the retries.

    Attributes:
        status: the HTTP status (0 when no answer came).
        error: the server's error code, e.g. `"query_budget_exhausted"`.
        request_id: the request id to quote to the service owner.
    """

    def __init__(
        self, message: str, *, status: int = 0, error: str = "", request_id: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.request_id = request_id


class QueryRejected(RemoteError, QueryRefused):
    """The server's query detector refused a request (403 `query_flagged` or `key_banned`).

    See the module docstring for how such a query counts (sent, not answered).

    Attributes:
        code: `"query_flagged"` (rows of this request were flagged: the request was refused
            whole) or `"key_banned"` (the key has too many flagged queries: every request is
            refused).
        rows: the flagged rows, as indices into the batch passed to `HTTPModel.__call__`
            (empty for `key_banned`).
        answered: rows of that batch answered by earlier requests of the same call (their
            answers are dropped with the exception).
    """

    def __init__(
        self,
        message: str,
        *,
        code: str,
        rows: tuple[int, ...] = (),
        answered: int = 0,
        status: int = 403,
        request_id: str = "",
    ) -> None:
        super().__init__(message, status=status, error=code, request_id=request_id)
        self.code = code
        self.rows = rows
        self.answered = answered


def _require_httpx() -> Any:
    try:
        import httpx
    except ImportError as err:  # pragma: no cover - the serve extra is missing
        raise ImportError('HTTPModel needs httpx: pip install "randfeat[serve]".') from err
    return httpx


class HTTPModel:
    """A served model as a callable: images in, scores (or labels) out, over HTTP.

    On creation it reads `GET /v1/info` (one request, no query spent). Each call splits its batch
    into requests of at most `max_batch` images (and of the server's own limits), sends them in
    order over one reused connection and returns the rows in order, on the input's device.

    Args:
        url: the server's base URL, e.g. `"http://127.0.0.1:8000"`.
        output: `"scores"` (`[n, K]` float32) or `"labels"` (`[n]` int64). A labels-only server
            cannot give scores; a scores server's labels are the argmax.
        api_key: sent as `X-API-Key` (the server counts and may limit queries per key).
        timeout: seconds for each request.
        max_batch: the most images per request.
        retries: further tries after a connection error or a 5xx answer, with exponential
            backoff, or the server's `Retry-After` when it asks for longer (never after a 4xx:
            the request itself is wrong, the key's budget is spent, or the detector refused it).
        transport: `"npy"` (binary, fast) or `"json"`.
        backoff: the first retry's delay in seconds; it doubles at each further retry.

    Attributes:
        info: the server's [ServerInfo][randfeat.serve.protocol.ServerInfo].
        requests: HTTP requests answered so far (retries included).
        retried: retries made so far.

    Raises:
        RemoteError: the server cannot be reached or its `/v1/info` is not a randfeat server's.
        ValueError: bad arguments, or `output="scores"` from a labels-only server.

    Examples:
        >>> model = HTTPModel("http://127.0.0.1:8000", api_key="alice")  # doctest: +SKIP
        >>> model.check(x, y)  # doctest: +SKIP
        >>> Square(0.05).run(model, x, y, budget=1000)  # doctest: +SKIP
    """

    def __init__(
        self,
        url: str,
        *,
        output: Output = "scores",
        api_key: str | None = None,
        timeout: float = 30.0,
        max_batch: int = 256,
        retries: int = 3,
        transport: Literal["npy", "json"] = "npy",
        backoff: float = 0.5,
    ) -> None:
        httpx = _require_httpx()
        check_choice(output, "output", ("scores", "labels"))
        check_choice(transport, "transport", ("npy", "json"))
        check_positive_int(max_batch, "max_batch")
        check_int(retries, "retries", low=0)
        check_positive_float(timeout, "timeout")
        check_nonnegative_float(backoff, "backoff")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(
                expected("url", "an http:// or https:// URL", url, "e.g. http://127.0.0.1:8000")
            )
        self.url = url.rstrip("/")
        self.output: Output = output
        self.max_batch = max_batch
        self.retries = retries
        self.transport = transport
        self.backoff = float(backoff)
        self.requests = 0
        self.retried = 0
        headers = {API_KEY_HEADER: api_key} if api_key else {}
        self._httpx = httpx
        self._client = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)
        try:
            self.info = self._fetch_info()
        except BaseException:
            self._client.close()
            raise
        if output == "scores" and self.info.output == "labels":
            self._client.close()
            raise ValueError(
                f"The server at {self.url} answers labels only, so it cannot give the scores a "
                "score-based attack needs. Use output='labels' with a decision-based attack "
                "(RayS, SignFlip)."
            )

    # ------------------------------------------------------------------ public
    def check(self, x: Tensor, y: Tensor | None = None) -> None:
        """Refuse data the server's model cannot answer, before any query is spent.

        Args:
            x: images `[N, C, H, W]`; `(C, H, W)` must be the server's `input_shape`.
            y: labels `[N]`; each must be below the server's number of classes.

        Raises:
            ValueError: the shapes or the labels do not match the served model.
        """
        want = tuple(self.info.input_shape)
        if tuple(x.shape[1:]) != want:
            raise ValueError(
                f"The server at {self.url} serves {self.info.model!r} on images of shape "
                f"[n, {', '.join(map(str, want))}], but the data has shape {list(x.shape)}. "
                "Use the data the model was trained on (or serve a model for this data)."
            )
        if y is not None and y.numel() and int(y.max()) >= self.info.classes:
            raise ValueError(
                f"The server at {self.url} serves {self.info.model!r} with {self.info.classes} "
                f"classes, but the data has label {int(y.max())}. Use matching data."
            )

    def __call__(self, x: Tensor) -> Tensor:
        """Scores `[n, K]` (float32) or labels `[n]` (int64) of `x: [n, C, H, W]`, on `x.device`.

        Raises:
            ValueError: `x` is not `[n, C, H, W]` of the server's shape.
            QueryRejected: the server's query detector refused a request (its rows are
                indices into `x`).
            RemoteError: another 4xx answer, or a 5xx / connection failure after every retry.
        """
        if not isinstance(x, Tensor) or x.ndim != 4:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"Expected a tensor of images [n, C, H, W], but got {got}.")
        self.check(x)
        if x.shape[0] == 0:  # nothing to ask the server
            if self.output == "labels":
                return torch.empty(0, dtype=torch.long, device=x.device)
            return torch.empty(0, self.info.classes, device=x.device)
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        outs: list[np.ndarray[Any, Any]] = []
        for chunk in np.array_split(arr, self._chunks(arr)):
            try:
                outs.append(self._predict(chunk))
            except QueryRejected as err:  # rows of this chunk → rows of x
                start = sum(o.shape[0] for o in outs)
                raise QueryRejected(
                    str(err),
                    code=err.code,
                    rows=tuple(start + r for r in err.rows),
                    answered=start,
                    status=err.status,
                    request_id=err.request_id,
                ) from None
        out = torch.from_numpy(np.concatenate(outs)) if len(outs) > 1 else torch.from_numpy(outs[0])
        if self.output == "labels" and out.ndim == 2:
            out = out.argmax(dim=1)
        out = out.long() if out.ndim == 1 else out.float()
        return out.to(x.device)

    @property
    def noise(self) -> str | None:
        """`"keyed"` when the server's noise is a function of its key and the image (nine
        forwards of one point are one answer: [independent_votes][randfeat.eval.oracle.independent_votes]),
        `"fresh"` for another defended server, `None` for an undefended one (from `/v1/info`)."""
        if self.info.keyed_noise:
            return "keyed"
        return "fresh" if self.info.defended else None

    def close(self) -> None:
        """Close the connection."""
        self._client.close()

    def __enter__(self) -> HTTPModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HTTPModel({self.url!r}, model={self.info.model!r}, output={self.output!r})"

    # ------------------------------------------------------------------ internals
    def _chunks(self, arr: np.ndarray[Any, Any]) -> int:
        per_image = arr[0].nbytes if arr.shape[0] else 1
        if self.transport == "json":  # about 12 characters per float32 in JSON
            per_image = per_image * 3
        fit = max(1, (self.info.max_body_bytes - _NPY_HEADER_BYTES) // max(per_image, 1))
        size = max(1, min(self.max_batch, self.info.max_images, fit))
        return max(1, math.ceil(arr.shape[0] / size))

    def _fetch_info(self) -> ServerInfo:
        resp = self._send("GET", "/v1/info")
        try:
            return ServerInfo.from_json(resp.json())
        except ValueError as err:
            raise RemoteError(f"{self.url} is not a randfeat server: {err}") from err

    def _predict(self, arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if self.transport == "npy":
            resp = self._send(
                "POST",
                "/v1/predict",
                content=encode_npy(arr),
                headers={"Content-Type": NPY, "Accept": NPY},
            )
            out = decode_npy(resp.content)
        else:
            resp = self._send(
                "POST",
                "/v1/predict",
                content=_json_body(arr),
                headers={"Content-Type": JSON, "Accept": JSON},
            )
            body = resp.json()
            out = np.asarray(body["labels" if "labels" in body else "scores"])
        if out.shape[0] != arr.shape[0]:
            raise RemoteError(
                f"The server answered {out.shape[0]} rows for {arr.shape[0]} images.",
                status=resp.status_code,
            )
        return out.astype(np.int64 if out.ndim == 1 else np.float32, copy=False)

    def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        """One logical request: retried on connection errors and 5xx, never on 4xx."""
        httpx = self._httpx
        rid = secrets.token_hex(8)  # the same id on every retry: one logical request in the log
        headers = {REQUEST_ID_HEADER: rid, **kwargs.pop("headers", {})}
        last, last_status, wait_at_least = "", 0, 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                self.retried += 1
                time.sleep(max(self.backoff * 2 ** (attempt - 1), wait_at_least))
            try:
                resp = self._client.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as err:
                last, last_status = f"{type(err).__name__}: {err}", 0
                logger.warning(
                    "%s %s%s failed (%s), try %d", method, self.url, path, last, attempt + 1
                )
                continue
            self.requests += 1
            if resp.status_code < 400:
                return resp
            body = ErrorBody.from_response(resp.status_code, resp.content)
            msg = f"{method} {self.url}{path} → {resp.status_code} {body.error}: {body.message}"
            if resp.status_code < 500 and body.error in REJECTION_CODES:
                rows = body.detail.get("rows", [])
                raise QueryRejected(
                    msg,
                    code=body.error,
                    rows=tuple(int(r) for r in rows) if isinstance(rows, list) else (),
                    status=resp.status_code,
                    request_id=rid,
                )
            if resp.status_code < 500:
                raise RemoteError(msg, status=resp.status_code, error=body.error, request_id=rid)
            last, last_status = msg, resp.status_code
            wait_at_least = _retry_after(resp.headers.get(RETRY_AFTER_HEADER))
            logger.warning("%s (try %d)", msg, attempt + 1)
        raise RemoteError(
            f"{method} {self.url}{path} failed after {self.retries + 1} tries: {last}",
            status=last_status,
            request_id=rid,
        )


_MAX_RETRY_AFTER_S = 60.0


def _retry_after(value: str | None) -> float:
    """The seconds of a `Retry-After: <seconds>` header (0 when absent or a date), at most 60."""
    try:
        return min(_MAX_RETRY_AFTER_S, max(0.0, float(value))) if value else 0.0
    except ValueError:
        return 0.0


def _json_body(arr: np.ndarray[Any, Any]) -> bytes:
    return json.dumps({"inputs": arr.tolist()}).encode()
