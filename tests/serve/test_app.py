"""The HTTP API over real HTTP: a uvicorn server on a free 127.0.0.1 port (the `serve` fixture)."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from torch import Tensor, nn

import randfeat
from randfeat.serve.config import ModelCard
from randfeat.serve.protocol import NPY, WORKER_HEADER, decode_npy, encode_npy

NU = 0.5  # a visible noise on the digits CNN's penultimate features


def _npy(x: np.ndarray[Any, Any], key: str | None = None) -> dict[str, Any]:
    headers = {"Content-Type": NPY} | ({"X-API-Key": key} if key else {})
    return {"content": encode_npy(x), "headers": headers}


def _json(obj: object) -> dict[str, Any]:
    return {"content": json.dumps(obj).encode(), "headers": {"Content-Type": "application/json"}}


IMG = np.full((1, 1, 8, 8), 0.5).tolist()

# (name, request, status, code): every bad request of the issue, and a few more
BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("malformed json", {"content": b'{"inputs": [[[', "headers": {}}, 400, "malformed_json"),
    ("not an object", _json([1, 2, 3]), 422, "missing_inputs"),
    ("missing inputs", _json({"images": IMG}), 422, "missing_inputs"),
    ("wrong rank", _json({"inputs": IMG[0]}), 422, "bad_rank"),
    ("wrong shape", _json({"inputs": np.zeros((2, 1, 8, 9)).tolist()}), 422, "bad_shape"),
    ("strings", _json({"inputs": [[["a"] * 8] * 8]}), 422, "bad_dtype"),
    ("booleans", _json({"inputs": np.ones((1, 1, 8, 8), bool).tolist()}), 422, "bad_dtype"),
    ("ragged", _json({"inputs": [[[[0.5] * 8] * 7 + [[0.5] * 3]]]}), 422, "bad_dtype"),
    ("null", _json({"inputs": None}), 422, "bad_dtype"),
    ("npy integers", _npy(np.ones((1, 1, 8, 8), np.uint8)), 422, "bad_dtype"),
    (
        "npy garbage",
        {"content": b"\x93NUMPY junk", "headers": {"Content-Type": NPY}},
        400,
        "malformed_npy",
    ),
    (
        "json NaN",
        {
            "content": b'{"inputs": [[['
            + b",".join([b"[" + b",".join([b"NaN"] * 8) + b"]"] * 8)
            + b"]]]}",
            "headers": {},
        },
        422,
        "not_finite",
    ),
    ("npy inf", _npy(np.full((1, 1, 8, 8), np.inf, np.float32)), 422, "not_finite"),
    ("above 1", _json({"inputs": np.full((1, 1, 8, 8), 1.5).tolist()}), 422, "out_of_range"),
    ("below 0", _npy(np.full((1, 1, 8, 8), -0.1, np.float32)), 422, "out_of_range"),
    ("empty json batch", _json({"inputs": []}), 422, "empty_batch"),
    ("empty npy batch", _npy(np.zeros((0, 1, 8, 8), np.float32)), 422, "empty_batch"),
    ("too many images", _npy(np.zeros((5, 1, 8, 8), np.float32)), 413, "too_many_images"),
    (
        "body too large",
        _json({"inputs": np.zeros((4, 1, 8, 8)).tolist(), "pad": "x" * 5000}),
        413,
        "body_too_large",
    ),
    (
        "media type",
        {"content": b"0.5", "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
]


def test_every_bad_request_gets_its_4xx_and_the_server_keeps_serving(
    serve: Any, digits_model: nn.Module
) -> None:
    url = serve(digits_model, max_images=4, max_body_mb=4096 / 2**20)
    good = _npy(np.full((2, 1, 8, 8), 0.5, np.float32))
    with httpx.Client(base_url=url) as client:
        for name, request, status, code in BAD_REQUESTS:
            r = client.post("/v1/predict", **request)
            assert r.status_code == status, (name, r.text)
            body = r.json()
            assert body["error"] == code, (name, body)
            assert body["message"] and body["request_id"] == r.headers["X-Request-Id"], name
            ok = client.post("/v1/predict", **good)  # the next valid request is answered
            assert ok.status_code == 200, (name, ok.text)
            assert np.asarray(ok.json()["scores"]).shape == (2, 10)
        # shape errors say the expected shape
        r = client.post("/v1/predict", **BAD_REQUESTS[4][1])
        assert "[n, 1, 8, 8]" in r.json()["message"]
        assert r.json()["expected_shape"] == ["n", 1, 8, 8]
        # unknown paths and methods are JSON errors too
        for path in ("/v2/predict", "/docs", "/openapi.json"):  # nothing beyond the four routes
            assert client.get(path).json()["error"] == "not_found"
        r = client.get("/v1/predict")
        assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


class _Fragile(nn.Module):
    """The digits CNN, failing on an all-zero image (a model error on some inputs only)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        if bool((x.flatten(1).amax(dim=1) == 0).any()):
            raise RuntimeError("simulated CUDA out of memory")
        return self.model(x)


def test_a_model_error_is_a_500_logged_with_its_request_id_and_the_next_request_is_served(
    serve: Any, digits_model: nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    url = serve(_Fragile(digits_model), admin_key="admin")
    zeros, halves = np.zeros((3, 1, 8, 8), np.float32), np.full((2, 1, 8, 8), 0.5, np.float32)
    with httpx.Client(base_url=url) as client, caplog.at_level(logging.INFO, "randfeat.serve"):
        r = client.post("/v1/predict", **_npy(zeros, key="k"))
        assert r.status_code == 500
        body = r.json()
        assert body["error"] == "model_error" and "RuntimeError" in body["message"]
        assert "out of memory" not in body["message"]  # the details stay in the server's log
        failed = [rec for rec in caplog.records if body["request_id"] in rec.getMessage()]
        assert failed and failed[0].levelno == logging.ERROR and failed[0].exc_info
        assert client.post("/v1/predict", **_npy(halves, key="k")).status_code == 200
        # the failed request was refunded: only the 2 answered images count
        usage = client.get("/v1/usage", headers={"X-API-Key": "admin"}).json()
        assert usage["keys"]["k"] == {"queries": 2, "requests": 1}


def test_a_defended_server_draws_fresh_noise_for_every_image_and_an_undefended_one_does_not(
    serve: Any, digits_model: nn.Module
) -> None:
    defended = randfeat.wrap(digits_model, ["head.pre"], nu=NU)
    try:
        urls = {"defended": serve(defended), "undefended": serve(digits_model)}
        x = np.full((1, 1, 8, 8), 0.5, np.float32)
        rows = np.repeat(x, 4, axis=0)  # the oracle's votes: one image repeated in one request
        for name, url in urls.items():
            with httpx.Client(base_url=url) as client:
                a = np.asarray(client.post("/v1/predict", **_npy(x)).json()["scores"])
                b = np.asarray(client.post("/v1/predict", **_npy(x)).json()["scores"])
                votes = np.asarray(client.post("/v1/predict", **_npy(rows)).json()["scores"])
            got = np.concatenate([a, b, votes])  # six answers for one image
            gaps = np.abs(got[:, None] - got[None]).max(axis=2)[np.triu_indices(6, 1)]
            if name == "defended":  # every answer (every repeat too) has its own noise
                assert gaps.min() > 1e-3, gaps
            else:  # the clean scores, up to float rounding between batch sizes
                clean = digits_model(torch.from_numpy(x)).detach().numpy()
                np.testing.assert_allclose(got, np.repeat(clean, 6, 0), rtol=1e-5, atol=1e-5)
    finally:
        defended.unwrap()


def test_a_key_gets_429_after_its_budget_and_usage_is_counted_per_key(
    serve: Any, digits_model: nn.Module
) -> None:
    url = serve(digits_model, max_queries_per_key=5, admin_key="admin")
    one, three = np.full((1, 1, 8, 8), 0.5, np.float32), np.full((3, 1, 8, 8), 0.5, np.float32)
    with httpx.Client(base_url=url) as client:
        assert client.post("/v1/predict", **_npy(three, "alice")).status_code == 200
        r = client.post("/v1/predict", **_npy(three, "alice"))
        assert r.status_code == 429  # 3 + 3 > 5: refused whole, nothing charged
        body = r.json()
        assert body["error"] == "query_budget_exhausted"
        assert (body["limit"], body["used"], body["requested"]) == (5, 3, 3)
        assert "3 of its 5 queries" in body["message"]
        for _ in range(2):
            assert client.post("/v1/predict", **_npy(one, "alice")).status_code == 200
        r = client.post("/v1/predict", **_npy(one, "alice"))
        assert r.status_code == 429 and r.json()["used"] == 5
        # another key has its own budget; requests without a key are counted together
        assert client.post("/v1/predict", **_npy(one, "bob")).status_code == 200
        assert client.post("/v1/predict", **_npy(one)).status_code == 200
        # the admin sees the counts; nobody else does
        assert client.get("/v1/usage", headers={"X-API-Key": "alice"}).status_code == 403
        assert client.get("/v1/usage").status_code == 403
        usage = client.get("/v1/usage", headers={"X-API-Key": "admin"}).json()
    assert usage == {
        "limit": 5,
        "keys": {
            "-": {"queries": 1, "requests": 1},
            "alice": {"queries": 5, "requests": 3},
            "bob": {"queries": 1, "requests": 1},
        },
    }


def test_only_known_keys_may_query_when_keys_are_configured(
    serve: Any, digits_model: nn.Module
) -> None:
    url = serve(digits_model, api_keys=frozenset({"alice"}))
    one = np.full((1, 1, 8, 8), 0.5, np.float32)
    with httpx.Client(base_url=url) as client:
        for key in (None, "mallory"):
            r = client.post("/v1/predict", **_npy(one, key))
            assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert client.post("/v1/predict", **_npy(one, "alice")).status_code == 200
        # /v1/usage is off without an admin key
        assert client.get("/v1/usage", headers={"X-API-Key": "alice"}).status_code == 404


def test_info_reveals_the_noise_only_when_asked(serve: Any, digits_model: nn.Module) -> None:
    defended = randfeat.wrap(digits_model, ["head.pre"], nu=NU)
    card = ModelCard("digits-cnn", (1, 8, 8), 10, True, "feature", ("head.pre",), NU)
    try:
        hidden = httpx.get(serve(defended, card) + "/v1/info").json()
        shown = httpx.get(serve(defended, card, reveal_config=True) + "/v1/info").json()
    finally:
        defended.unwrap()
    assert hidden["defended"] is True and hidden["input_shape"] == [1, 8, 8]
    assert hidden["classes"] == 10 and hidden["output"] == "scores"
    assert hidden["nu"] is None and hidden["layers"] is None and hidden["defense"] is None
    assert shown["nu"] == NU and shown["layers"] == ["head.pre"] and shown["defense"] == "feature"


def test_a_labels_server_answers_labels_in_json_and_npy(
    serve: Any, digits_model: nn.Module, digits: Any
) -> None:
    url = serve(digits_model, output="labels")
    x = digits.x_test[:6]
    want = digits_model(x).argmax(dim=1).tolist()
    with httpx.Client(base_url=url) as client:
        assert client.post("/v1/predict", json={"inputs": x.tolist()}).json() == {"labels": want}
        r = client.post(
            "/v1/predict",
            content=encode_npy(x.numpy()),
            headers={"Content-Type": NPY, "Accept": NPY},
        )
        got = decode_npy(r.content)
    assert got.dtype == np.int64 and got.tolist() == want


@pytest.mark.slow
def test_16_concurrent_clients_x_40_requests_all_answered_and_merged(
    serve: Any, digits_model: nn.Module, digits: Any, caplog: pytest.LogCaptureFixture
) -> None:
    url = serve(digits_model, max_batch=64, max_wait_ms=2.0)
    x = digits.x_test[:16]
    want = digits_model(x).detach().numpy()
    errors: list[str] = []

    def client_loop(i: int) -> None:
        body = encode_npy(x[i : i + 1].numpy())
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(40):
                try:
                    r = client.post(
                        "/v1/predict", content=body, headers={"Content-Type": NPY, "Accept": NPY}
                    )
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text}")
                        continue
                    np.testing.assert_allclose(
                        decode_npy(r.content), want[i : i + 1], rtol=1e-5, atol=1e-5
                    )
                except Exception as err:  # any failure counts
                    errors.append(repr(err))

    with caplog.at_level(logging.INFO, "randfeat.serve"):
        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert errors == []
    done = [rec.getMessage() for rec in caplog.records if "status=200" in rec.getMessage()]
    assert len(done) == 16 * 40
    merged = [m for m in done if "batch=1/1 " not in m]
    assert merged, "concurrent requests were never merged into one forward"


def test_each_response_names_its_worker(serve: Any, digits_model: nn.Module) -> None:
    url = serve(digits_model)
    a = httpx.get(url + "/healthz")
    b = httpx.post(url + "/v1/predict", json={"inputs": IMG})
    assert a.json()["worker"] == a.headers[WORKER_HEADER] == b.headers[WORKER_HEADER]


def test_an_unexpected_error_is_a_json_500_and_the_server_keeps_serving(
    serve: Any, digits_model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    from randfeat.serve import app as app_module

    url = serve(digits_model)
    calls = 0

    def broken(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        raise SystemError("a bug of ours")

    good = _npy(np.full((1, 1, 8, 8), 0.5, np.float32))
    with httpx.Client(base_url=url) as client:
        with monkeypatch.context() as m:
            m.setattr(app_module, "decode_inputs", broken)
            r = client.post("/v1/predict", **good)
        assert calls == 1 and r.status_code == 500
        assert r.json()["error"] == "internal_error" and r.json()["request_id"]
        assert client.post("/v1/predict", **good).status_code == 200


def test_images_reach_the_model_in_its_own_dtype(serve: Any, digits_model: nn.Module) -> None:
    double = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double().eval()
    url = serve(double, ModelCard("double", (1, 8, 8), 10, False))
    x = np.full((2, 1, 8, 8), 0.5, np.float32)
    r = httpx.post(url + "/v1/predict", **_npy(x))
    assert r.status_code == 200, r.text
    want = double(torch.from_numpy(x).double()).detach().numpy()
    np.testing.assert_allclose(np.asarray(r.json()["scores"]), want, rtol=1e-6)
