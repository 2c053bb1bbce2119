"""`HTTPModel`: a served model as a callable for the oracle and the attacks, over real HTTP."""

from __future__ import annotations

import math
import socket
from typing import Any

import httpx
import pytest
import torch
from torch import Tensor, nn

import randfeat
from randfeat.eval.attacks import RayS, Square
from randfeat.eval.oracle import Oracle
from randfeat.eval.remote import HTTPModel, RemoteError
from randfeat.serve.config import ModelCard

NU = 5.5
"""ν of the digits CNN's feature defense (`head.pre`) at a 2-point clean-accuracy drop:
`calibrate_nu(digits_model, digits.x_test[100:], ["head.pre"], 0.02, seed=0)` gives 5.49."""


@pytest.mark.parametrize("transport", ["npy", "json"])
def test_scores_and_labels_come_back_in_order_across_requests(
    serve: Any, digits_model: nn.Module, digits: Any, transport: str
) -> None:
    url = serve(digits_model)
    x = digits.x_test[:10]
    want = digits_model(x).detach()
    with HTTPModel(url, max_batch=3, transport=transport) as model:  # type: ignore[arg-type]
        got = model(x)
        assert model.requests == 1 + 4  # /v1/info, then 3 + 3 + 3 + 1 images (np.array_split)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.dtype == torch.float32
    with HTTPModel(url, transport=transport) as model:  # type: ignore[arg-type]
        assert model(x[:0]).shape == (0, 10) and model.requests == 1  # no request for no rows
    with HTTPModel(url, output="labels", transport=transport) as model:  # type: ignore[arg-type]
        labels = model(x)
    assert labels.dtype == torch.int64 and torch.equal(labels, want.argmax(dim=1))


def test_a_labels_only_server_gives_labels_and_refuses_scores(
    serve: Any, digits_model: nn.Module, digits: Any
) -> None:
    url = serve(digits_model, output="labels")
    with HTTPModel(url, output="labels") as model:
        assert torch.equal(model(digits.x_test[:4]), digits_model(digits.x_test[:4]).argmax(1))
    with pytest.raises(ValueError, match="labels only"):
        HTTPModel(url, output="scores")


def test_data_that_does_not_match_the_server_is_refused_before_any_query(
    serve: Any, digits_model: nn.Module, digits: Any
) -> None:
    url = serve(digits_model, admin_key="admin")
    with HTTPModel(url, api_key="alice") as model:
        with pytest.raises(ValueError, match=r"shape \[n, 1, 8, 8\]"):
            model.check(torch.rand(2, 3, 32, 32))
        with pytest.raises(ValueError, match="10 classes"):
            model.check(digits.x_test[:2], torch.tensor([3, 12]))
        with pytest.raises(ValueError, match=r"shape \[n, 1, 8, 8\]"):
            model(torch.rand(2, 1, 9, 9))
        model.check(digits.x_test[:2], digits.y_test[:2])  # matching data passes
        assert model.requests == 1  # only /v1/info
    usage = httpx.get(url + "/v1/usage", headers={"X-API-Key": "admin"}).json()
    assert usage["keys"] == {}


class _FailsFirst(nn.Module):
    """The digits CNN, failing its first `fails` forwards (a server-side error, then recovery)."""

    def __init__(self, model: nn.Module, fails: int) -> None:
        super().__init__()
        self.model = model
        self.fails = fails

    def forward(self, x: Tensor) -> Tensor:
        if self.fails > 0:
            self.fails -= 1
            raise RuntimeError("transient failure")
        return self.model(x)


def test_a_retried_request_is_charged_once_by_the_oracle_and_by_the_server(
    serve: Any, digits_model: nn.Module, digits: Any
) -> None:
    url = serve(_FailsFirst(digits_model, fails=2), admin_key="admin")
    x, y = digits.x_test[:6], digits.y_test[:6]
    with HTTPModel(url, api_key="alice", retries=3, backoff=0.0) as model:
        oracle = Oracle(model, x, y, budget=10, eps=0.1, norm="linf", votes=1)
        scores = oracle.scores(x, torch.arange(6))
        assert model.retried == 2  # two 500s, then the answer
    torch.testing.assert_close(scores, digits_model(x).detach(), rtol=1e-5, atol=1e-5)
    assert oracle.queries.tolist() == [1] * 6  # one query per row, whatever the retries
    usage = httpx.get(url + "/v1/usage", headers={"X-API-Key": "admin"}).json()
    assert usage["keys"]["alice"] == {"queries": 6, "requests": 1}  # the 500s were refunded


def test_a_4xx_is_never_retried(serve: Any, digits_model: nn.Module, digits: Any) -> None:
    url = serve(digits_model, max_queries_per_key=4)
    with HTTPModel(url, api_key="alice", retries=3, backoff=0.0) as model:
        with pytest.raises(RemoteError, match="query_budget_exhausted") as info:
            model(digits.x_test[:5])
        assert info.value.status == 429 and info.value.error == "query_budget_exhausted"
        assert model.requests == 2 and model.retried == 0  # /v1/info and one refused request


def test_an_unreachable_server_fails_after_the_retries() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RemoteError, match="failed after 3 tries"):
        HTTPModel(f"http://127.0.0.1:{port}", retries=2, backoff=0.0, timeout=5)


def test_a_server_that_is_not_randfeat_is_named(serve: Any, digits_model: nn.Module) -> None:
    from fastapi import FastAPI

    from randfeat.serve.run import serve_in_thread

    other = FastAPI()
    other.get("/v1/info")(lambda: {"hello": "world"})
    with serve_in_thread(other) as url, pytest.raises(RemoteError, match="not a randfeat server"):
        HTTPModel(url)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"output": "logits"},
        {"max_batch": 0},
        {"retries": -1},
        {"transport": "xml"},
        {"timeout": -1},
    ],
)
def test_bad_arguments_are_refused_before_connecting(kwargs: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError), match=next(iter(kwargs))):
        HTTPModel("http://127.0.0.1:9", **kwargs)


@pytest.mark.slow
def test_attacks_over_http_match_in_process_and_the_defended_endpoint_is_far_more_robust(
    serve: Any, digits_model: nn.Module, digits: Any
) -> None:
    """Square ℓ∞ and RayS (ε = 0.2, 300 queries, 9 votes, attack seed 0) on 40 digits.

    The same defense (feature noise at ν = 5.5 on `head.pre`) runs in process (noise seed 1) and
    behind the server (noise seed 2), so the two runs are independent draws of one experiment:
    their robust accuracies must agree within 2 standard errors of a difference of two
    proportions, SE = sqrt(2 p (1 - p) / 40) at the pooled p.

    Measured with these seeds: Square 0.60 in process, 0.65 over HTTP (|diff| 0.05, 2 SE = 0.21 at
    p = 0.625), RayS 0.20 and 0.30 (|diff| 0.10, 2 SE = 0.19 at p = 0.25); undefended 0.025 for
    both, in process and over HTTP. Defended vs undefended over HTTP, with the SE of the
    difference sqrt((p1 q1 + p2 q2) / 40) = 0.079 (Square), 0.077 (RayS): gaps of 0.625 and 0.275
    are 7.9 and 3.6 SE. We require at least 3 SE for Square and 2 SE for RayS.
    """
    x, y = digits.x_test[:40], digits.y_test[:40]
    local = randfeat.wrap(digits_model, ["head.pre"], nu=NU, seed=1)
    served = randfeat.wrap(digits_model, ["head.pre"], nu=NU, seed=2)
    try:
        card = ModelCard("digits-cnn", (1, 8, 8), 10, True, "feature")
        defended_url = serve(served, card)
        undefended_url = serve(digits_model)
        for attack, min_gap_se in ((Square(0.2), 3.0), (RayS(0.2), 2.0)):
            run = {"budget": 300, "votes": 9, "seed": 0}
            in_process = attack.run(local, x, y, **run).robust_accuracy()
            with HTTPModel(defended_url) as remote:
                remote.check(x, y)
                over_http = attack.run(remote, x, y, **run).robust_accuracy()
            with HTTPModel(undefended_url) as remote:
                undefended = attack.run(remote, x, y, **run).robust_accuracy()
            name = type(attack).__name__
            p = (in_process + over_http) / 2
            se = max(math.sqrt(2 * p * (1 - p) / 40), 1 / 40)
            assert abs(in_process - over_http) <= 2 * se, (name, in_process, over_http, se)
            se_gap = math.sqrt((over_http * (1 - over_http) + undefended * (1 - undefended)) / 40)
            assert over_http - undefended >= min_gap_se * se_gap, (name, over_http, undefended)
    finally:
        local.unwrap()
        served.unwrap()
