"""Tests for randfeat.eval.models.cache: the one mechanism behind every model trained on first use.

The digits CNN's tests (test_models.py) cover corrupt, stale, malformed and unwritable caches
through `digits_cnn`; these cover what is shared: parallel processes train once, a waiting process
reads the file the trainer wrote, and the lock file does not outlive the training.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from randfeat.eval.lock import lock_path
from randfeat.eval.models.cache import TrainedModel, load_or_train


def _spec(log: Path, seconds: float = 0.0) -> TrainedModel[nn.Linear]:
    """A model whose training is slow, records each call in `log`, and draws its weights."""

    def build() -> nn.Linear:
        return nn.Linear(3, 2)

    def train() -> nn.Linear:
        with log.open("a") as f:
            f.write("trained\n")
        time.sleep(seconds)
        torch.manual_seed(int(time.time_ns() % 2**31))  # each training gives other weights
        return nn.Linear(3, 2).eval()

    return TrainedModel(
        name="toy",
        file="toy.pt",
        meta={"format_version": 1, "config_hash": "c", "data_checksum": "d"},
        build=build,
        train=train,
        accuracy=lambda model: 1.0,
    )


def _load_in_child(cache: str, log: str, out: str) -> None:
    model = load_or_train(_spec(Path(log), seconds=1.5), cache)
    torch.save(model.state_dict(), out)


def test_parallel_processes_train_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    log = tmp_path / "log"
    children = [
        ctx.Process(
            target=_load_in_child, args=(str(tmp_path / "cache"), str(log), str(tmp_path / f"w{i}"))
        )
        for i in range(3)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    assert log.read_text() == "trained\n"  # one trainer; the others waited and read its file
    weights = [torch.load(tmp_path / f"w{i}", weights_only=True) for i in range(3)]
    for w in weights[1:]:
        assert all(torch.equal(w[k], weights[0][k]) for k in w)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["toy.pt"]  # no lock left


def test_a_fresh_cache_written_while_waiting_is_read_not_retrained(tmp_path: Path) -> None:
    log = tmp_path / "log"
    first = load_or_train(_spec(log), tmp_path)
    assert log.read_text() == "trained\n"
    second = load_or_train(_spec(log), tmp_path)
    assert log.read_text() == "trained\n"
    assert torch.equal(first.weight, second.weight) and not second.training
    load_or_train(_spec(log), tmp_path, retrain=True)
    assert log.read_text() == "trained\ntrained\n"
    assert not lock_path(tmp_path / "toy.pt").exists()


def test_read_only_cache_directory_still_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_lock(self: object) -> None:
        raise PermissionError("read-only file system")

    monkeypatch.setattr("randfeat.eval.lock.ExclusiveLock.acquire", no_lock)
    model = load_or_train(_spec(tmp_path / "log"), tmp_path / "cache")
    assert isinstance(model, nn.Linear)
