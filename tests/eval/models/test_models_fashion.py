"""Tests for randfeat.eval.models.fashion (`--model fashion-cnn`) and its model source.

Mechanics (cache hits, staleness, the data path) run on tiny Fashion-MNIST files written here with
a fast stand-in for training; the real CNN is trained once per test run (shared by the xdist
workers through `fashion_cache_dir`) where the real files are installed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from _fashion_files import REAL, needs_real_files, write_fashion
from torch import nn

import randfeat
import randfeat.eval.models.fashion as rf_fashion
from randfeat.eval.data.loaders import Split, fashion_mnist
from randfeat.eval.errors import ConfigError
from randfeat.eval.grid.config import EvalConfig
from randfeat.eval.grid.plan import load_model
from randfeat.eval.models.cache import top1_accuracy
from randfeat.eval.models.fashion import FASHION_CNN_FILE, FashionCNN, fashion_cnn


def test_structure_and_penultimate_features() -> None:
    model = FashionCNN(generator=torch.Generator().manual_seed(0)).eval()
    names = [name for name, _ in model.named_children()]
    assert names[:4] == ["conv1", "bn1", "relu1", "pool1"] and names[-1] == "head"
    assert model.get_classifier() is model.head and model.head.in_features == 128
    x = torch.rand(3, 1, 28, 28)
    assert model(x).shape == (3, 10)
    defended = randfeat.wrap(model, layers=["head.pre"], nu=0.1, seed=0)
    assert not torch.equal(defended(x), model(x))  # the noise reaches the 128 features
    defended.unwrap()
    with pytest.raises(ValueError, match="`width`"):
        FashionCNN(width=0)


def test_generator_init_is_seeded_and_leaves_global_rng() -> None:
    state = torch.get_rng_state()
    a = FashionCNN(generator=torch.Generator().manual_seed(3))
    b = FashionCNN(generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(
        torch.equal(va, vb)
        for va, vb in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


class _TrainSpy:
    """Stands in for training: counts calls, remembers the data, returns a fixed model."""

    def __init__(self) -> None:
        self.data: list[Split] = []

    def __call__(self, data: Split, config: dict[str, Any]) -> FashionCNN:
        self.data.append(data)
        return FashionCNN(generator=torch.Generator().manual_seed(len(self.data))).eval()


@pytest.fixture
def train_spy(monkeypatch: pytest.MonkeyPatch) -> _TrainSpy:
    spy = _TrainSpy()
    monkeypatch.setattr(rf_fashion, "_train", spy)
    return spy


def test_trained_once_then_cached_and_retrained_when_the_data_change(
    tmp_path: Path, train_spy: _TrainSpy, caplog: pytest.LogCaptureFixture
) -> None:
    write_fashion(tmp_path / "a", n_train=20)
    first = fashion_cnn(root=tmp_path / "a", cache_dir=tmp_path / "cache")
    assert len(train_spy.data) == 1 and train_spy.data[0].x_train.shape == (20, 1, 28, 28)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [FASHION_CNN_FILE]
    again = fashion_cnn(root=tmp_path / "a", cache_dir=tmp_path / "cache")
    assert len(train_spy.data) == 1 and not again.training
    assert all(torch.equal(again.state_dict()[k], v) for k, v in first.state_dict().items())
    write_fashion(tmp_path / "b", n_train=30)  # other training images: the cache is stale
    with caplog.at_level(logging.WARNING, logger="randfeat.eval.models"):
        fashion_cnn(root=tmp_path / "b", cache_dir=tmp_path / "cache")
    assert len(train_spy.data) == 2 and "stale" in caplog.text
    (tmp_path / "cache" / FASHION_CNN_FILE).write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="randfeat.eval.models"):
        fashion_cnn(root=tmp_path / "b", cache_dir=tmp_path / "cache")
    assert len(train_spy.data) == 3 and "corrupt" in caplog.text


def test_pretrained_false_is_untrained_and_not_cached(tmp_path: Path, train_spy: _TrainSpy) -> None:
    model = fashion_cnn(pretrained=False, cache_dir=tmp_path)
    assert isinstance(model, FashionCNN) and not train_spy.data and not list(tmp_path.iterdir())


def test_model_source_trains_on_the_data_path(
    tmp_path: Path, train_spy: _TrainSpy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANDFEAT_CACHE", str(tmp_path / "cache"))
    write_fashion(tmp_path / "data", n_train=40)
    cfg = EvalConfig.from_mapping(
        {"model": "fashion-cnn", "data": f"fashion-mnist:{tmp_path / 'data'}"}
    )
    assert isinstance(load_model(cfg), FashionCNN)
    assert train_spy.data[0].x_train.shape[0] == 40  # read from --data's path, not the default
    with pytest.raises(ConfigError, match=r"--model fashion-cnn takes --data fashion-mnist only"):
        EvalConfig.from_mapping({"model": "fashion-cnn", "data": "digits"})
    with pytest.raises(ConfigError, match=r"--pretrained does not apply to fashion-cnn"):
        EvalConfig.from_mapping(
            {"model": "fashion-cnn", "data": "fashion-mnist", "pretrained": True}
        )
    monkeypatch.setenv("RANDFEAT_FASHION_MNIST", str(tmp_path / "none"))
    missing = EvalConfig.from_mapping({"model": "fashion-cnn", "data": "fashion-mnist"})
    with pytest.raises(
        ConfigError, match=r"Cannot train fashion-cnn: .*apt-get install dataset-fashion-mnist"
    ):
        load_model(missing)


def test_checkpoint_of_a_state_dict(tmp_path: Path) -> None:
    model = FashionCNN(generator=torch.Generator().manual_seed(5)).eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    cfg = EvalConfig.from_mapping(
        {"model": "fashion-cnn", "data": "fashion-mnist", "checkpoint": str(tmp_path / "w.pt")}
    )
    loaded = load_model(cfg)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))


# ----------------------------------------------------------------------------- the real CNN


@needs_real_files
def test_fashion_cnn_reaches_90_percent(fashion_model: nn.Module, fashion_cache_dir: Path) -> None:
    data = fashion_mnist(REAL)
    accuracy = top1_accuracy(fashion_model, data.x_test, data.y_test)
    assert accuracy >= 0.90, accuracy
    blob = torch.load(fashion_cache_dir / FASHION_CNN_FILE, weights_only=True)
    assert blob["test_accuracy"] == pytest.approx(accuracy)
