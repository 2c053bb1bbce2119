"""`run_server` in its own process: worker processes draw independent noise and share one ledger,
and SIGTERM finishes the request in flight before the server exits; with keyed noise and a query
detector, the workers share one noise key and one detector (key, threshold, store)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

import randfeat
from randfeat.serve.config import ModelCard
from randfeat.serve.protocol import NPY, WORKER_HEADER, decode_npy, encode_npy
from randfeat.serve.run import run_server

SCRIPT = Path(__file__).with_name("toy_server.py")
HALF = encode_npy(np.full((1, 1, 8, 8), 0.5, np.float32))
ONES = encode_npy(np.ones((1, 1, 8, 8), np.float32))  # the toy model takes 2 s on it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NPY_HEADERS = {"Content-Type": NPY, "Accept": NPY}


def _one_client_per_worker(url: str, workers: int) -> dict[str, httpx.Client]:
    """Keep-alive clients, one connected to each worker (a connection stays with its worker)."""
    clients: dict[str, httpx.Client] = {}
    for _ in range(200):
        client = httpx.Client(base_url=url, timeout=60)
        worker = client.get("/healthz").headers[WORKER_HEADER]
        if worker in clients:
            client.close()
        else:
            clients[worker] = client
        if len(clients) == workers:
            return clients
    pytest.fail(f"200 connections reached only workers {sorted(clients)}")


def _post(url: str, body: bytes, key: str) -> httpx.Response:
    """One request on a fresh connection (so the kernel may hand it to any worker)."""
    headers = {"Content-Type": NPY, "Accept": NPY, "X-API-Key": key}
    return httpx.post(url + "/v1/predict", content=body, headers=headers, timeout=60)


class _Server:
    """`toy_server.py` in its own process group (the group is killed if anything goes wrong)."""

    def __init__(self, workers: int, log: Path, *extra: str) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log_path = log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), self.url.rsplit(":", 1)[1], str(workers), *extra],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.workers = self._wait_for(workers, timeout=180)

    def _wait_for(self, workers: int, timeout: float) -> set[str]:
        """Poll /healthz on fresh connections until `workers` distinct workers have answered."""
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while len(seen) < workers:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"server did not start {workers} workers:\n{self.log()}")
            try:
                seen.add(httpx.get(self.url + "/healthz", timeout=5).json()["worker"])
            except httpx.TransportError:
                time.sleep(0.2)
        return seen

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        """Kill the server and its workers (its process group) if it is still running."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def _sigterm_during_a_slow_request(server: _Server) -> None:
    """SIGTERM while a 2 s request is in flight: it is answered, then the server exits with 0."""
    result: dict[str, httpx.Response] = {}
    slow = threading.Thread(target=lambda: result.update(r=_post(server.url, ONES, "slow")))
    slow.start()
    time.sleep(0.7)  # the 2 s forward is running now
    server.proc.send_signal(signal.SIGTERM)
    slow.join(60)
    code = server.proc.wait(60)
    assert result["r"].status_code == 200, result["r"].text
    assert decode_npy(result["r"].content).shape == (1, 10)
    assert code == 0, server.log()
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/healthz", timeout=5)


@pytest.mark.slow
def test_two_workers_draw_independent_noise_share_one_budget_and_stop_gracefully(
    tmp_path: Path,
) -> None:
    server = _Server(workers=2, log=tmp_path / "server.log")
    clients = _one_client_per_worker(server.url, 2)
    try:
        # the same image 15 times to each worker, alternating; requests one at a time
        answers: dict[str, list[np.ndarray[Any, Any]]] = {w: [] for w in clients}
        for _ in range(15):
            for w, client in clients.items():
                r = client.post("/v1/predict", content=HALF, headers=NPY_HEADERS)
                assert r.status_code == 200 and r.headers[WORKER_HEADER] == w, r.text
                answers[w].append(decode_npy(r.content)[0])
        # Had the workers drawn one stream, the k-th answer of each would be the same, and an
        # attacker could cancel the noise by sending x and x + μu to two workers as their k-th
        # requests.
        rows = np.stack([a for w in answers for a in answers[w]])
        gaps = np.abs(rows[:, None] - rows[None]).max(axis=2)[np.triu_indices(len(rows), 1)]
        assert gaps.min() > 1e-4, "two answers for the same image carried the same noise"

        # one ledger for both workers: 44 single-image requests against a budget of 40
        codes = [
            client.post("/v1/predict", content=HALF, headers={**NPY_HEADERS, "X-API-Key": "k"})
            for _ in range(22)
            for client in clients.values()
        ]
        assert sum(r.status_code == 200 for r in codes) == 40
        assert sum(r.status_code == 429 for r in codes) == 4
        usage = httpx.get(server.url + "/v1/usage", headers={"X-API-Key": "admin"}).json()
        assert usage["keys"]["k"] == {"queries": 40, "requests": 40}
        for client in clients.values():
            client.close()

        _sigterm_during_a_slow_request(server)  # the supervisor passes SIGTERM to the workers
    finally:
        server.stop()


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_and_exits_cleanly(tmp_path: Path) -> None:
    server = _Server(workers=1, log=tmp_path / "server.log")
    try:
        _sigterm_during_a_slow_request(server)
    finally:
        server.stop()


@pytest.mark.slow
def test_two_workers_share_one_noise_key_and_one_detector(tmp_path: Path) -> None:
    store = f"sqlite:{tmp_path / 'detect.sqlite'}"
    server = _Server(2, tmp_path / "server.log", store)
    clients = _one_client_per_worker(server.url, 2)
    (a, client_a), (b, client_b) = clients.items()
    rng = np.random.default_rng(0)
    u = rng.random((1, 1, 8, 8), dtype=np.float32) * 0.9  # not all ones (the slow image)
    probe = np.clip(u + rng.normal(0, 0.01, u.shape).astype(np.float32), 0, 1)  # NES-like
    v = rng.random((1, 1, 8, 8), dtype=np.float32) * 0.9

    def post(client: httpx.Client, x: np.ndarray[Any, Any], key: str) -> np.ndarray[Any, Any]:
        r = client.post(
            "/v1/predict", content=encode_npy(x), headers={**NPY_HEADERS, "X-API-Key": key}
        )
        assert r.status_code == 200, r.text
        return decode_npy(r.content)

    try:
        first = post(client_a, u, "alice")  # worker a sees u first
        again = post(client_b, u, "bob")  # worker b: the same image (answered: on_detect log)
        post(client_b, probe, "bob")  # and a probe near it
        post(client_a, v, "carol")  # an unrelated image
        # one noise key: the same image gets the same answer from either worker
        np.testing.assert_array_equal(first, again)
        usage = httpx.get(server.url + "/v1/usage", headers={"X-API-Key": "admin"}).json()
        # one detector: worker b matched what worker a stored (same secret key, one store)
        flagged = {k: row["flagged"] for k, row in usage["keys"].items()}
        assert flagged == {"alice": 0, "bob": 2, "carol": 0}, (flagged, a, b)
        for client in clients.values():
            client.close()
    finally:
        server.stop()


def test_a_seeded_defense_is_refused_for_several_workers() -> None:
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    seeded = randfeat.wrap(net, ["penultimate"], nu=0.1, seed=0)
    card = ModelCard("toy", (1, 8, 8), 10, True)
    with pytest.raises(ValueError, match="same noise stream"):
        run_server(seeded, card, workers=2)


def test_a_memory_detector_store_or_a_built_detector_is_refused_for_several_workers() -> None:
    from randfeat.detect import DEFAULT, DETECTORS
    from randfeat.serve.guard import DetectorSpec

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    card = ModelCard("toy", (1, 8, 8), 10, False)
    with pytest.raises(ValueError, match="shared detector store"):
        run_server(net, card, workers=2, detector=DetectorSpec(DEFAULT))
    with pytest.raises(TypeError, match="DetectorSpec"):
        run_server(net, card, workers=2, detector=DETECTORS[DEFAULT]())
