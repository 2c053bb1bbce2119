"""`randfeat serve`: its options, its errors, and one real run in its own process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from randfeat.cli import build_parser, main
from randfeat.cli.serve import options
from randfeat.eval.remote import HTTPModel, RemoteError


def _fails(capsys: Any, *argv: str) -> str:
    assert main(list(argv)) == 2
    err: str = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_the_flags_become_typed_settings(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("alice\n# a comment\n\nbob\n")
    args = build_parser().parse_args(
        ["serve", "--model", "resnet18", "--nu", "0.3", "--layers", "layer4,penultimate",
         "--max-batch", "32", "--max-wait-ms", "2", "--max-queries-per-key", "1000",
         "--api-keys", str(keys), "--admin-key", "root", "--output", "labels", "--reveal-config"]
    )  # fmt: skip
    spec, opts = options(args)
    assert (spec.model, spec.nu, spec.layers) == ("resnet18", 0.3, ("layer4", "penultimate"))
    assert (opts.max_batch, opts.max_wait_ms, opts.max_queries_per_key) == (32, 2.0, 1000)
    assert opts.api_keys == frozenset({"alice", "bob"}) and opts.admin_key == "root"
    assert opts.output == "labels" and opts.reveal_config


def test_the_admin_key_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANDFEAT_ADMIN_KEY", "from-env")
    _, opts = options(build_parser().parse_args(["serve"]))
    assert opts.admin_key == "from-env"


def test_bad_flags_are_usage_errors_naming_the_flag(capsys: Any, tmp_path: Path) -> None:
    assert "--max-batch" in _fails(capsys, "serve", "--max-batch", "0")
    assert "--max-wait-ms" in _fails(capsys, "serve", "--max-wait-ms", "-1")
    assert "--workers" in _fails(capsys, "serve", "--workers", "0")
    assert "not allowed with" in _fails(capsys, "serve", "--nu", "1", "--target-drop", "0.02")
    assert "--api-keys" in _fails(capsys, "serve", "--api-keys", str(tmp_path / "missing"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert "holds no key" in _fails(capsys, "serve", "--api-keys", str(empty))
    assert "Did you mean" in _fails(capsys, "serve", "--model", "resnt18", "--nu", "0.1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_randfeat_serve_answers_limits_and_stops_on_sigterm(
    digits_model: Any, digits_cache_dir: Path, digits: Any, tmp_path: Path
) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RANDFEAT_CACHE": str(digits_cache_dir), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(sys.path), "RANDFEAT_ADMIN_KEY": "root"}  # fmt: skip
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "randfeat", "serve", "--port", str(port), "--nu", "5.5",
           "--max-queries-per-key", "30", "--usage-db", str(tmp_path / "usage.sqlite")]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                info = httpx.get(url + "/v1/info", timeout=5).json()
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        assert info["model"] == "digits-cnn" and info["defended"] and info["nu"] is None
        x, y = digits.x_test[:10], digits.y_test[:10]
        with HTTPModel(url, api_key="alice") as model:
            model.check(x, y)
            first, second = model(x), model(x)
            assert not torch.equal(first, second)  # fresh noise for every image
            assert (first.argmax(1) == y).float().mean() >= 0.7
            with pytest.raises(RemoteError, match="query_budget_exhausted"):
                model(torch.cat([x, x]))  # 20 + 20 > 30
        usage = httpx.get(url + "/v1/usage", headers={"X-API-Key": "root"}).json()
        assert usage["keys"]["alice"] == {"queries": 20, "requests": 2}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    text = log.read_text()
    assert "serving digits-cnn with feature noise ν = 5.5" in text
    assert "alice" not in text  # keys are logged as hashes
