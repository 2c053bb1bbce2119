"""A server whose detector keeps its queries in a real Redis: it fails closed while Redis is down
and recovers by itself when Redis is back (Debian's `redis-server`, persistence off)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from _serve_helpers import free_port
from torch import Tensor, nn

from randfeat.detect import DEFAULT, DETECTORS
from randfeat.serve.config import DetectOptions
from randfeat.serve.protocol import NPY, encode_npy


def _post(client: httpx.Client, x: Tensor, key: str = "k") -> httpx.Response:
    headers = {"Content-Type": NPY, "X-API-Key": key}
    return client.post("/v1/predict", content=encode_npy(x.numpy()), headers=headers)


def test_redis_going_down_gives_503_and_its_return_gives_200_again(
    redis_server: Any, serve_detect: Any, digits_model: nn.Module, digits: Any
) -> None:
    det = DETECTORS[DEFAULT](seed=0, store=redis_server.url, shape=(1, 8, 8))
    url = serve_detect(digits_model, det, admin_key="admin", detect=DetectOptions(retry_after_s=1))
    x = digits.x_test
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(3):
            assert _post(client, x[i : i + 1]).status_code == 200
        r = _post(client, x[1:2], key="mallory")  # a repeat, matched through Redis
        assert r.status_code == 403 and r.json()["error"] == "query_flagged"

        redis_server.stop()
        for i in range(10, 13):  # nothing is answered unchecked
            r = _post(client, x[i : i + 1])
            assert r.status_code == 503, r.text
            assert r.json()["error"] == "detector_unavailable" and r.headers["Retry-After"] == "1"

        redis_server.start()  # the same port; empty (no persistence)
        deadline, statuses = time.monotonic() + 30, []
        for i in range(20, 120):  # bounded in count and in time
            statuses.append(_post(client, x[i : i + 1]).status_code)
            if statuses[-1] == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert statuses[-1] == 200, (statuses, redis_server.log())
        assert set(statuses) <= {200, 503}
        # and it detects again: a repeat of an image sent since the restart
        assert _post(client, x[i : i + 1], key="mallory").status_code == 403


def test_an_unreachable_redis_at_start_up_is_a_usage_error_naming_it(capsys: Any) -> None:
    from randfeat.cli import main

    port = free_port()  # nothing listens there
    url = f"redis://127.0.0.1:{port}/0"
    started = time.monotonic()
    assert main(["serve", "--detect", "--detect-store", url]) == 2
    err = capsys.readouterr().err
    assert url in err and "--detect-store memory" in err and "Traceback" not in err
    assert "calibrated" not in err  # refused before any model work
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("password", ["s3cret"])
def test_a_store_password_never_reaches_the_error_message(capsys: Any, password: str) -> None:
    from randfeat.cli import main

    url = f"redis://:{password}@127.0.0.1:{free_port()}/0"
    assert main(["serve", "--detect", "--detect-store", url]) == 2
    assert password not in capsys.readouterr().err
