"""Query detection and keyed noise over real HTTP, and `HTTPModel`'s `QueryRejected`."""

from __future__ import annotations

import time
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from _serve_helpers import FlakyStore
from torch import nn

import randfeat
from randfeat.detect import DEFAULT, DETECTORS
from randfeat.detect.stores import MemoryStore
from randfeat.eval.remote import HTTPModel, QueryRejected, RemoteError
from randfeat.serve.config import DetectOptions, ModelCard
from randfeat.serve.protocol import NPY, ServerInfo, encode_npy

ADMIN = {"X-API-Key": "admin"}


def _npy(x: torch.Tensor, key: str | None = None) -> dict[str, Any]:
    headers = {"Content-Type": NPY} | ({"X-API-Key": key} if key else {})
    return {"content": encode_npy(x.numpy()), "headers": headers}


def _detector(store: Any = "memory") -> Any:
    return DETECTORS[DEFAULT](seed=0, store=store)


def test_a_flagged_request_gets_403_with_its_rows_stays_charged_and_shows_in_usage(
    serve_detect: Any, digits_model: nn.Module, digits: Any
) -> None:
    url = serve_detect(digits_model, _detector(), admin_key="admin")
    x = digits.x_test
    with httpx.Client(base_url=url) as client:
        assert client.post("/v1/predict", **_npy(x[:4], "alice")).status_code == 200
        # mallory sends two new digits around a copy of alice's row 2
        r = client.post("/v1/predict", **_npy(torch.cat([x[10:11], x[2:3], x[11:12]]), "mallory"))
        assert r.status_code == 403, r.text
        body = r.json()
        assert body["error"] == "query_flagged" and body["rows"] == [1]
        assert "refused whole" in body["message"] and body["request_id"]
        assert "scores" not in body
        usage = client.get("/v1/usage", headers=ADMIN).json()
    assert usage["keys"]["alice"] == {"queries": 4, "requests": 1, "flagged": 0}
    # the refused request was examined and recorded: its 3 images are charged, 1 flagged
    assert usage["keys"]["mallory"] == {"queries": 3, "requests": 1, "flagged": 1}
    assert usage["detector_available"] is True


def test_log_answers_flagged_requests_as_usual_and_counts_them(
    serve_detect: Any, digits_model: nn.Module, digits: Any
) -> None:
    url = serve_detect(digits_model, _detector(), admin_key="admin", detect=DetectOptions("log"))
    x = digits.x_test[:2]
    with httpx.Client(base_url=url) as client:
        for _ in range(3):
            r = client.post("/v1/predict", **_npy(x, "eve"))
            assert r.status_code == 200 and np.asarray(r.json()["scores"]).shape == (2, 10)
        usage = client.get("/v1/usage", headers=ADMIN).json()
    assert usage["keys"]["eve"]["flagged"] == 4  # the 2nd and 3rd requests: 2 rows each


def test_a_banned_key_gets_key_banned_on_every_request_uncharged(
    serve_detect: Any, digits_model: nn.Module, digits: Any
) -> None:
    opts = DetectOptions("ban", ban_after=2)
    url = serve_detect(digits_model, _detector(), admin_key="admin", detect=opts)
    x = digits.x_test
    with httpx.Client(base_url=url) as client:
        client.post("/v1/predict", **_npy(x[:1], "m"))
        codes = [client.post("/v1/predict", **_npy(x[:1], "m")).json().get("error")]
        codes += [client.post("/v1/predict", **_npy(x[:1], "m")).json().get("error")]
        codes += [
            client.post("/v1/predict", **_npy(x[i : i + 1], "m")).json()["error"] for i in (50, 60)
        ]
        ok = client.post("/v1/predict", **_npy(x[70:71], "n"))
        usage = client.get("/v1/usage", headers=ADMIN).json()
    assert codes == ["query_flagged", "query_flagged", "key_banned", "key_banned"]
    assert ok.status_code == 200  # another key
    assert usage["keys"]["m"] == {"queries": 3, "requests": 3, "flagged": 2, "banned": True}
    assert usage["keys"]["n"]["banned"] is False


def test_a_store_that_fails_gets_503_with_retry_after_and_nothing_is_answered_or_charged(
    serve_detect: Any, digits_model: nn.Module, digits: Any
) -> None:
    store = FlakyStore()
    url = serve_detect(digits_model, _detector(store), admin_key="admin")
    fail_open_store = FlakyStore()
    open_url = serve_detect(
        digits_model, _detector(fail_open_store), detect=DetectOptions(fail_open=True)
    )
    x = digits.x_test
    with httpx.Client(base_url=url) as client:
        store.down = fail_open_store.down = True
        r = client.post("/v1/predict", **_npy(x[:2], "k"))
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert r.json()["error"] == "detector_unavailable" and "scores" not in r.json()
        usage = client.get("/v1/usage", headers=ADMIN).json()
        assert usage["keys"].get("k", {"queries": 0})["queries"] == 0
        assert usage["detector_available"] is False
        assert httpx.post(open_url + "/v1/predict", **_npy(x[:2], "k")).status_code == 200
        # the client retries a 503 after Retry-After, and the store is back by then
        with HTTPModel(url, api_key="k", retries=2, backoff=0.01) as model:
            store.down = True
            started = time.monotonic()
            with pytest.raises(RemoteError, match="detector_unavailable"):
                model(x[:2])
            assert model.retried == 2  # each after Retry-After (1 s), not the 0.01 s backoff
            assert time.monotonic() - started >= 1.9
            store.down = False
            assert model(x[2:4]).shape == (2, 10)


def test_http_model_raises_query_rejected_with_the_rows_of_the_callers_batch(
    serve_detect: Any, digits_model: nn.Module, digits: Any
) -> None:
    url = serve_detect(digits_model, _detector(), detect=DetectOptions("ban", ban_after=3))
    x = digits.x_test
    with HTTPModel(url, api_key="alice", max_batch=4) as model:
        model(x[:6])
        batch = torch.cat([x[20:26], x[3:4], x[30:31]])  # requests of 4 + 4: row 6 repeats x[3]
        with pytest.raises(QueryRejected) as caught:
            model(batch)
        err = caught.value
        assert isinstance(err, RemoteError) and err.status == 403
        assert (err.code, err.rows, err.answered) == ("query_flagged", (6,), 4)
        with pytest.raises(QueryRejected) as caught:
            model(x[:2])  # 2 more flags: 3 in all, the key is banned
        assert caught.value.rows == (0, 1)
        with pytest.raises(QueryRejected) as caught:
            model(x[40:41])
        assert caught.value.code == "key_banned" and caught.value.rows == ()
        assert model.retried == 0  # a rejection is never retried


def test_info_says_detection_and_keyed_noise_are_on_and_hides_the_rest(
    serve_detect: Any, digits_model: nn.Module
) -> None:
    keyed = randfeat.wrap(digits_model, ["head.pre"], nu=0.5, noise="keyed")
    card = ModelCard("digits-cnn", (1, 8, 8), 10, True, "feature", ("head.pre",), 0.5, "keyed")
    try:
        hidden = httpx.get(serve_detect(keyed, _detector(), card) + "/v1/info").json()
        shown = httpx.get(
            serve_detect(keyed, _detector(), card, reveal_config=True) + "/v1/info"
        ).json()
    finally:
        keyed.unwrap()
    assert hidden["detection"] is True and hidden["keyed_noise"] is True
    assert hidden["detector"] is None and hidden["on_detect"] is None and hidden["nu"] is None
    assert shown["detector"] == DEFAULT and shown["on_detect"] == "reject"
    # a server from before detection says nothing of it: read as off
    old = {k: v for k, v in hidden.items() if k not in ("detection", "keyed_noise")}
    assert ServerInfo.from_json(old).detection is False
    assert ServerInfo.from_json(hidden).keyed_noise is True


def test_keyed_noise_gives_an_image_one_answer_and_a_changed_image_another(
    serve_detect: Any, digits_model: nn.Module, digits: Any
) -> None:
    keyed = randfeat.wrap(digits_model, ["head.pre"], nu=5.0, noise="keyed")
    card = ModelCard("digits-cnn", (1, 8, 8), 10, True, "feature", ("head.pre",), 5.0, "keyed")
    det = _detector()
    try:
        url = serve_detect(keyed, det, card, detect=DetectOptions("log"))
        x = digits.x_test[:3]
        with HTTPModel(url) as model:
            a, b = model(x), model(x[[2, 0, 1]])  # another order, another batch
            changed = x.clone()
            changed[0, 0, 4, 4] = 1.0 - changed[0, 0, 4, 4]  # one pixel
            c = model(changed)
    finally:
        keyed.unwrap()
    assert torch.equal(a, b[[1, 2, 0]])  # the same image, the same answer
    clean = digits_model(x).detach()
    assert not torch.allclose(a, clean, atol=1e-3)  # noisy, though
    assert torch.equal(c[1:], a[1:]) and not torch.allclose(c[0], a[0], atol=1e-3)


def test_create_app_refuses_detect_options_without_a_detector(digits_model: nn.Module) -> None:
    from randfeat.serve.app import create_app

    card = ModelCard("digits-cnn", (1, 8, 8), 10, False)
    from randfeat.serve.config import ServeOptions

    with pytest.raises(ValueError, match="detector"):
        create_app(digits_model, card, ServeOptions(detect=DetectOptions()))
    with pytest.raises(TypeError, match="Detector"):
        create_app(digits_model, card, detector=MemoryStore())  # type: ignore[arg-type]
