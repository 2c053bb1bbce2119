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

import randfeat
from randfeat.cli import build_parser, main
from randfeat.cli.serve import detection, options
from randfeat.detect import DEFAULT
from randfeat.eval.remote import HTTPModel, QueryRejected, RemoteError
from randfeat.serve.config import DetectOptions
from randfeat.serve.guard import DetectorSpec

KEY = bytes(range(32))


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


def test_the_detection_and_keyed_noise_flags_become_typed_settings(tmp_path: Path) -> None:
    key_file = tmp_path / "noise.key"
    key_file.write_text(KEY.hex() + "\n")
    argv = ["serve", "--detect", "--on-detect", "ban", "--ban-after", "3", "--detect-store",
            "sqlite:/tmp/d.db", "--detect-fail-open", "--detect-fpr", "0.01", "--detect-images",
            "500", "--keyed-noise", "--noise-key-file", str(key_file)]  # fmt: skip
    args = build_parser().parse_args(argv)
    spec, opts = options(args)
    assert opts.detect == DetectOptions("ban", ban_after=3, fail_open=True)
    assert spec.noise == "keyed" and spec.noise_key == KEY and KEY.hex() not in repr(spec)
    found = detection(args)
    assert found is not None and found.spec == DetectorSpec(DEFAULT, "sqlite:/tmp/d.db")
    assert (found.fpr, found.images) == (0.01, 500)
    named = detection(build_parser().parse_args(["serve", "--detect", "blacklight"]))
    assert named is not None and named.spec.name == "blacklight"
    assert named.options == DetectOptions() and named.fpr == 0.001
    assert detection(build_parser().parse_args(["serve"])) is None


def test_the_noise_key_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANDFEAT_NOISE_KEY", KEY.hex())
    spec, _ = options(build_parser().parse_args(["serve", "--keyed-noise"]))
    assert spec.noise_key == KEY
    monkeypatch.delenv("RANDFEAT_NOISE_KEY")
    spec, _ = options(build_parser().parse_args(["serve", "--keyed-noise"]))
    assert spec.noise == "keyed" and spec.noise_key is None  # drawn once, from OS entropy


def test_bad_detection_and_key_flags_are_usage_errors_before_any_work(
    capsys: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "Did you mean 'pooled-linf'" in _fails(capsys, "serve", "--detect", "pooled-lnf")
    err = _fails(capsys, "serve", "--detect", "--detect-store", "redsi://127.0.0.1:6379/0")
    assert "--detect-store" in err and "Did you mean 'redis'" in err
    assert "needs --detect" in _fails(capsys, "serve", "--on-detect", "ban")
    assert "need --detect" in _fails(
        capsys, "serve", "--detect-store", "memory", "--ban-after", "2"
    )
    err = _fails(capsys, "serve", "--detect", "--on-detect", "ban", "--ban-after", "0")
    assert "--ban-after" in err and ">= 1" in err
    assert "--on-detect ban" in _fails(capsys, "serve", "--detect", "--ban-after", "5")
    assert "--detect-fpr" in _fails(capsys, "serve", "--detect", "--detect-fpr", "0")
    missing = str(tmp_path / "missing.key")
    err = _fails(capsys, "serve", "--keyed-noise", "--noise-key-file", missing)
    assert "Cannot read --noise-key-file" in err and missing in err and "token_hex" in err
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    assert "is empty" in _fails(capsys, "serve", "--keyed-noise", "--noise-key-file", str(empty))
    short = tmp_path / "short.key"
    short.write_text("abcd1234")
    err = _fails(capsys, "serve", "--keyed-noise", "--noise-key-file", str(short))
    assert "64 hex digits" in err and "abcd1234" not in err  # a key is never echoed
    assert "--keyed-noise" in _fails(capsys, "serve", "--noise-key-file", str(short))
    assert "defense" in _fails(capsys, "serve", "--keyed-noise", "--defense", "base")
    monkeypatch.setenv("RANDFEAT_NOISE_KEY", "not-a-key")
    assert "RANDFEAT_NOISE_KEY" in _fails(capsys, "serve", "--keyed-noise")


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


@pytest.mark.slow
def test_randfeat_serve_detects_with_keyed_noise_from_a_key_file(
    digits_model: Any, digits_cache_dir: Path, digits: Any, tmp_path: Path
) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    key_file = tmp_path / "noise.key"
    key_file.write_text(KEY.hex())
    env = {**os.environ, "RANDFEAT_CACHE": str(digits_cache_dir), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(sys.path), "RANDFEAT_ADMIN_KEY": "root"}  # fmt: skip
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "randfeat", "serve", "--port", str(port), "--nu", "5.5",
           "--detect", "--keyed-noise", "--noise-key-file", str(key_file)]  # fmt: skip
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
        assert info["detection"] is True and info["keyed_noise"] is True
        assert info["detector"] is None and info["on_detect"] is None
        x = digits.x_test[:10]
        with HTTPModel(url, api_key="alice") as model:
            first = model(x)
            with pytest.raises(QueryRejected) as caught:
                model(torch.cat([digits.x_test[20:22], x[3:4]]))  # row 2 was sent before
            assert caught.value.code == "query_flagged" and caught.value.rows == (2,)
        # the key of the file, nothing else: a local wrapper with it answers the same
        local = randfeat.wrap(digits_model, ["head.pre"], nu=5.5, noise="keyed", key=KEY)
        try:
            torch.testing.assert_close(first, local(x).detach(), rtol=1e-5, atol=1e-5)
        finally:
            local.unwrap()
        usage = httpx.get(url + "/v1/usage", headers={"X-API-Key": "root"}).json()
        assert usage["keys"]["alice"] == {"queries": 13, "requests": 2, "flagged": 1}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    text = log.read_text()
    assert "calibrated to flag 0.001 of 1257 benign images (digits training images)" in text
    assert "keyed noise: key from --noise-key-file" in text
    assert KEY.hex() not in text and "alice" not in text
