"""The HTTP API of `randfeat serve`: a FastAPI application around one model.

[create_app][randfeat.serve.app.create_app] takes any model (defended by
[randfeat.wrap][randfeat.wrap] or not), the facts about it
([ModelCard][randfeat.serve.config.ModelCard]) and the options
([ServeOptions][randfeat.serve.config.ServeOptions]), and answers:

* `POST /v1/predict`: images `[n, C, H, W]` in $[0, 1]$ (JSON or `.npy`, see
  [randfeat.serve.protocol][]) → `{"scores": [[...]]}` or `{"labels": [...]}`. Each image gets its
  own fresh noise: requests are merged into batched forwards by a
  [MicroBatcher][randfeat.serve.batcher.MicroBatcher], and the defense draws noise per row.
* `GET /healthz`: `{"status": "ok", "worker": token}`.
* `GET /v1/info`: a [ServerInfo][randfeat.serve.protocol.ServerInfo].
* `GET /v1/usage`: queries per key (and flagged queries, with detection), for the admin key
  only.

With a query detector (`detector=`, see [randfeat.serve.guard][]), every request is observed
before the model answers, and a flagged one gets 403 `query_flagged` (or `key_banned`, or is
answered and logged, as [DetectOptions][randfeat.serve.config.DetectOptions] says); a detector
that cannot reach its store makes the server answer 503 `detector_unavailable`.

Bad requests get a 4xx with a JSON [ErrorBody][randfeat.serve.protocol.ErrorBody] (see
[randfeat.serve.decode][]); a failing model gets a 500 with a short message, logged with the
request id, and the next request is served normally. Each request is logged on the
`randfeat.serve` logger with its id, a hash of its key, its images, its batch and its latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from torch import Tensor

from randfeat.detect import Detector
from randfeat.outputs import logits_of
from randfeat.serve.batcher import MicroBatcher
from randfeat.serve.config import ModelCard, ServeOptions
from randfeat.serve.decode import RequestError, decode_inputs
from randfeat.serve.guard import Decision, Guard, account_of, refusal
from randfeat.serve.protocol import (
    API_KEY_HEADER,
    JSON,
    KEY_BANNED,
    NPY,
    QUERY_FLAGGED,
    REQUEST_ID_HEADER,
    WORKER_HEADER,
    ErrorBody,
    encode_npy,
)
from randfeat.serve.usage import ANONYMOUS, UsageLedger

__all__ = ["create_app"]

logger = logging.getLogger("randfeat.serve")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _key_tag(key: str | None) -> str:
    """A short, non-reversible tag of a client key for the log (keys are secrets)."""
    return ANONYMOUS if key is None else hashlib.sha256(key.encode()).hexdigest()[:8]


def _model_forward(
    model: Callable[[Tensor], Any], card: ModelCard, options: ServeOptions
) -> Callable[[Tensor], Tensor]:
    """The batcher's forward: scores `[n, K]` (float32) or labels `[n]` (int64), on the CPU.

    Images go to `options.device`, in the dtype of the model's first floating parameter (a
    half-precision model gets half-precision images).
    """
    device = torch.device(options.device)
    params = model.parameters() if isinstance(model, torch.nn.Module) else iter(())
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)

    def forward(x: Tensor) -> Tensor:
        logits = logits_of(model(x.to(device, dtype)))
        if logits.shape != (x.shape[0], card.classes):
            raise RuntimeError(
                f"the model returned {tuple(logits.shape)}, expected logits "
                f"[{x.shape[0]}, {card.classes}]"
            )
        if options.output == "labels":
            return logits.argmax(dim=1).cpu()
        return logits.float().cpu()

    return forward


def create_app(
    model: Callable[[Tensor], Any],
    card: ModelCard,
    options: ServeOptions | None = None,
    *,
    version: str | None = None,
    detector: Detector | None = None,
) -> FastAPI:
    """The FastAPI application that serves `model`.

    The model runs only in the micro-batcher's one inference thread (started and stopped with the
    application's lifespan), so it needs no thread-safety of its own. Run the application with
    uvicorn, or with [serve_in_thread][randfeat.serve.run.serve_in_thread] /
    [run_server][randfeat.serve.run.run_server].

    Args:
        model: `[n, C, H, W]` in $[0, 1]$ → logits `[n, K]` (or an output object with
            `.logits`), e.g. a [RandomizedFeatureWrapper][randfeat.RandomizedFeatureWrapper]
            in eval mode, already on `options.device`.
        card: the model's name, input shape, classes and defense.
        options: how to answer; the defaults of [ServeOptions][randfeat.serve.config.ServeOptions]
            when `None`.
        version: the version reported by `/v1/info` (default: randfeat's).
        detector: a query detector of [randfeat.detect][] (its threshold calibrated), used in
            the inference thread only and closed with the application; what a flagged query
            gets is `options.detect`.

    Returns:
        The application.

    Raises:
        TypeError: `model` is not callable, or `detector` is not a detector.
        ValueError: `options.detect` without a detector.

    Examples:
        >>> import torch, randfeat
        >>> from randfeat.serve.app import create_app
        >>> from randfeat.serve.config import ModelCard
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
        >>> defended = randfeat.wrap(net, ["penultimate"], nu=0.1)
        >>> app = create_app(defended, ModelCard("toy", (1, 8, 8), 10, defended=True))
    """
    if not callable(model):
        raise TypeError(f"Expected argument `model` to be callable, got {type(model).__name__}.")
    opts = options or ServeOptions()
    if opts.detect is not None and detector is None:
        raise ValueError(
            "Expected a `detector` with `options.detect` (what to do with its verdicts); pass "
            "detector=DETECTORS[name](...), or leave options.detect None."
        )
    guard = Guard(detector, opts.detect) if detector is not None else None
    if version is None:
        from randfeat import __version__

        version = __version__
    info = opts.info(card, version, guard.name if guard else None).to_json()
    worker = secrets.token_hex(4)
    batcher = MicroBatcher(
        _model_forward(model, card, opts),
        max_batch=opts.max_batch,
        max_wait_ms=opts.max_wait_ms,
        screen=guard.screen if guard is not None else None,
    )
    ledger = UsageLedger(opts.usage_db, limit=opts.max_queries_per_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        logger.info(
            "serving %s (%s%s) worker=%s output=%s max_batch=%d max_wait_ms=%g%s",
            card.name,
            f"defended: {card.defense}" if card.defended else "undefended",
            ", keyed noise" if card.noise == "keyed" else "",
            worker,
            opts.output,
            opts.max_batch,
            opts.max_wait_ms,
            "" if guard is None else f" detect={guard.name} on_detect={guard.options.on_detect}",
        )
        try:
            yield
        finally:  # uvicorn has finished the in-flight requests by now
            batcher.stop()
            ledger.close()
            if guard is not None:
                guard.close()
            logger.info("worker %s stopped", worker)

    # no /docs, /redoc or /openapi.json: the API is the four routes below, documented in docs/
    app = FastAPI(
        title="randfeat",
        version=version,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    def respond(
        body: bytes, status: int, rid: str, media: str = JSON, extra: dict[str, str] | None = None
    ) -> Response:
        headers = {REQUEST_ID_HEADER: rid, WORKER_HEADER: worker, **(extra or {})}
        return Response(content=body, status_code=status, media_type=media, headers=headers)

    def error(status: int, code: str, message: str, rid: str, **detail: Any) -> Response:
        body = ErrorBody(code, message, rid, detail).to_json()
        return respond(json.dumps(body).encode(), status, rid)

    def refuse(decision: Decision, n: int, rid: str, tag: str) -> Response:
        status, message, detail, headers = refusal(decision, n, guard.options if guard else None)
        logger.info(
            "request %s key=%s status=%d %s images=%d%s",
            rid,
            tag,
            status,
            decision.code,
            n,
            f" flagged={len(decision.rows)}" if decision.rows else "",
        )
        body = ErrorBody(str(decision.code), message, rid, detail).to_json()
        return respond(json.dumps(body).encode(), status, rid, extra=headers)

    def request_id(request: Request) -> str:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        return given if _REQUEST_ID.match(given) else secrets.token_hex(8)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        msg = f"{exc.detail}: {request.method} {request.url.path}. The API is POST /v1/predict, "
        msg += "GET /v1/info, GET /v1/usage and GET /healthz."
        return error(exc.status_code, code, msg, request_id(request))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        rid = request_id(request)  # a bug of ours, not of the request: JSON, logged, id-tagged
        logger.error("request %s: internal error", rid, exc_info=exc)
        msg = f"The server failed on this request ({type(exc).__name__}); quote the request id."
        return error(500, "internal_error", msg, rid)

    @app.get("/healthz")
    async def healthz(request: Request) -> Response:
        body = json.dumps({"status": "ok", "worker": worker}).encode()
        return respond(body, 200, request_id(request))

    @app.get("/v1/info")
    async def get_info(request: Request) -> Response:
        return respond(json.dumps(info).encode(), 200, request_id(request))

    @app.get("/v1/usage")
    async def get_usage(request: Request) -> Response:
        rid = request_id(request)
        if opts.admin_key is None:
            return error(404, "not_found", "GET /v1/usage is off: start with an admin key.", rid)
        given = request.headers.get(API_KEY_HEADER, "")
        if not hmac.compare_digest(given.encode(), opts.admin_key.encode()):
            return error(403, "forbidden", f"GET /v1/usage needs the admin {API_KEY_HEADER}.", rid)
        keys: dict[str, dict[str, Any]] = {
            k: {"queries": u.queries, "requests": u.requests} for k, u in ledger.usage().items()
        }
        body: dict[str, Any] = {"limit": opts.max_queries_per_key, "keys": keys}
        if guard is not None:
            try:
                counts = await asyncio.to_thread(guard.counts)
            except Exception as err:  # the store is down: the ledger's counts all the same
                logger.warning("GET /v1/usage: detector counts unavailable (%s)", err)
                counts = None
            body["detector_available"] = counts is not None
            for k, row in keys.items():
                acc = k if k == ANONYMOUS else account_of(k)
                got = None if counts is None else counts.get(acc)
                row["flagged"] = None if counts is None else (got.flagged if got else 0)
                if guard.options.on_detect == "ban":
                    banned = guard.is_banned(acc)
                    if got is not None:
                        banned = banned or got.flagged >= guard.options.ban_after
                    row["banned"] = banned
        return respond(json.dumps(body).encode(), 200, rid)

    async def read_body(request: Request) -> bytes:
        limit = opts.max_body_bytes
        too_big = RequestError(
            413,
            "body_too_large",
            f"Expected a body of at most {limit} bytes ({opts.max_body_mb:g} MiB). Send fewer "
            "images per request, or the .npy format.",
            {"max_body_bytes": limit},
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        t0 = time.perf_counter()
        rid = request_id(request)
        key = request.headers.get(API_KEY_HEADER) or None
        tag = _key_tag(key)
        account = ANONYMOUS if key is None else key
        watched = account_of(key)  # the detector's account: a hash, never the key
        with batcher.expect() as submit:  # others may wait for this one to share their forward
            try:
                if opts.api_keys is not None and key not in opts.api_keys:
                    raise RequestError(
                        401,
                        "unauthorized",
                        f"Expected a valid {API_KEY_HEADER} header: "
                        + ("none was sent." if key is None else "this key is not known."),
                    )
                x = decode_inputs(
                    await read_body(request),
                    request.headers.get("content-type"),
                    input_shape=card.input_shape,
                    max_images=opts.max_images,
                )
            except RequestError as err:
                logger.info("request %s key=%s status=%d %s", rid, tag, err.status, err.code)
                return error(err.status, err.code, err.message, rid, **err.detail)
            except Exception as err:  # a bug of ours: answered here, the connection stays open
                return await internal_error(request, err)
            n = x.shape[0]
            if guard is not None and guard.is_banned(watched):  # known here: no store access
                return refuse(Decision(False, KEY_BANNED), n, rid, tag)
            charge = ledger.charge(account, n)
            if not charge.allowed:
                logger.info("request %s key=%s status=429 images=%d", rid, tag, n)
                return error(
                    429,
                    "query_budget_exhausted",
                    f"This key has used {charge.used} of its {charge.limit} queries (images) "
                    f"and this request asks for {n} more. Ask the service owner for a larger "
                    "budget.",
                    rid,
                    limit=charge.limit,
                    used=charge.used,
                    requested=n,
                )
            try:
                future = submit(torch.from_numpy(x), watched)
            except RuntimeError:  # the inference worker has stopped: the server is going down
                ledger.refund(account, n)
                return error(503, "shutting_down", "The server is shutting down; retry.", rid)
        try:
            done = await asyncio.wrap_future(future)
        except Exception as err:
            ledger.refund(account, n)
            logger.exception("request %s key=%s status=500 images=%d: model error", rid, tag, n)
            return error(
                500,
                "model_error",
                f"The model failed on this request ({type(err).__name__}); quote the request "
                "id to the service owner.",
                rid,
            )
        decision = done.admission
        if isinstance(decision, Decision) and not decision.answer:
            if decision.code != QUERY_FLAGGED:  # not examined: nothing to charge
                ledger.refund(account, n)
            return refuse(decision, n, rid, tag)
        if done.output is None:  # pragma: no cover - the batcher computes every admitted request
            raise RuntimeError("the batcher returned no output for an admitted request")
        out = done.output.numpy()
        if NPY in request.headers.get("accept", ""):
            resp = respond(encode_npy(out), 200, rid, NPY)
        else:
            field = "labels" if opts.output == "labels" else "scores"
            resp = respond(json.dumps({field: out.tolist()}).encode(), 200, rid)
        note = ""
        if isinstance(decision, Decision):
            note = f" flagged={len(decision.rows)}" if decision.rows else ""
            note += "" if decision.checked else " unchecked"
        logger.info(
            "request %s key=%s status=200 images=%d batch=%d/%d ms=%.1f%s",
            rid,
            tag,
            n,
            done.batch_images,
            done.batch_requests,
            1000 * (time.perf_counter() - t0),
            note,
        )
        return resp

    app.state.worker = worker
    app.state.ledger = ledger
    app.state.batcher = batcher
    app.state.guard = guard
    return app
