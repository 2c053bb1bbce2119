"""Tests for randfeat.eval.models: the digits CNN, its cache, and timm models taking [0, 1]."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import randfeat.eval.models.digits as rf_models
from randfeat.eval.data.loaders import Digits
from randfeat.eval.models import (
    DigitsCNN,
    Normalize,
    Preprocessed,
    default_cache_dir,
    digits_cnn,
    load_timm,
)

# ----------------------------------------------------------------------------- DigitsCNN


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def test_digits_model_accuracy(digits_model: DigitsCNN, digits: Digits) -> None:
    acc = _accuracy(digits_model, digits.x_test, digits.y_test)
    assert acc >= 0.97, acc
    assert not digits_model.training


def test_digits_cnn_structure(digits_model: DigitsCNN) -> None:
    names = [name for name, _ in digits_model.named_children()]
    assert {"conv1", "conv2", "fc1", "head"} <= set(names)
    assert names[-1] == "head" and isinstance(digits_model.head, nn.Linear)
    assert digits_model.get_classifier() is digits_model.head
    assert digits_model.head.in_features == 128 and digits_model.head.out_features == 10
    # "head.pre" is the penultimate feature vector: the input of head.
    seen: list[torch.Tensor] = []
    handle = digits_model.head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        digits_model(torch.zeros(3, 1, 8, 8))
    finally:
        handle.remove()
    assert seen[0].shape == (3, 128)


def test_digits_cnn_generator_init_is_seeded_and_leaves_global_rng() -> None:
    state = torch.get_rng_state()
    a = DigitsCNN(generator=torch.Generator().manual_seed(3))
    b = DigitsCNN(generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    # PyTorch's default init bound 1/sqrt(fan_in): conv1 has fan_in 9, head has fan_in 128.
    with torch.no_grad():
        assert float(a.conv1.weight.abs().max()) <= 1 / 3
        assert float(a.head.weight.abs().max()) <= 128**-0.5
    with pytest.raises(ValueError, match="`classes`"):
        DigitsCNN(classes=1)


def test_pretrained_false_is_untrained(digits: Digits, tmp_path: Path) -> None:
    model = digits_cnn(pretrained=False, cache_dir=tmp_path)
    assert isinstance(model, DigitsCNN) and not model.training
    assert not list(tmp_path.iterdir())  # nothing trained or cached
    # Untrained: near chance (10%); far below the trained model's >= 97%.
    assert _accuracy(model, digits.x_test, digits.y_test) < 0.5


# ----------------------------------------------------------------------------- cache


class _TrainSpy:
    """Stands in for the training loop: counts calls and returns a fast, fixed model."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, data: Digits, config: dict[str, Any]) -> DigitsCNN:
        self.calls += 1
        return DigitsCNN(generator=torch.Generator().manual_seed(123)).eval()


@pytest.fixture
def train_spy(monkeypatch: pytest.MonkeyPatch) -> _TrainSpy:
    spy = _TrainSpy()
    monkeypatch.setattr(rf_models, "_train_digits_cnn", spy)
    return spy


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _cache_file(cache: Path) -> Path:
    return cache / rf_models.DIGITS_CNN_FILE


def test_cache_hit_skips_training(
    digits_model: DigitsCNN, digits_cache_dir: Path, train_spy: _TrainSpy
) -> None:
    model = digits_cnn(cache_dir=digits_cache_dir)
    assert train_spy.calls == 0
    assert _same_weights(model, digits_model) and not model.training


def test_cache_file_layout(digits_model: DigitsCNN, digits_cache_dir: Path) -> None:
    blob = torch.load(_cache_file(digits_cache_dir), weights_only=True)
    assert blob["format_version"] == rf_models.CACHE_FORMAT_VERSION
    assert len(blob["config_hash"]) == 64 and len(blob["data_checksum"]) == 64
    assert blob["test_accuracy"] >= 0.97
    assert blob["state_dict"].keys() == digits_model.state_dict().keys()
    # Atomic write: no temp file left behind.
    assert [p.name for p in digits_cache_dir.iterdir()] == [rf_models.DIGITS_CNN_FILE]


@pytest.mark.slow
def test_corrupt_cache_is_retrained_deterministically(
    digits_model: DigitsCNN, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A garbage file is detected and replaced; real training reproduces the fixture's weights."""
    _cache_file(tmp_path).write_bytes(b"this is not a torch file")
    threads = torch.get_num_threads()
    with caplog.at_level(logging.WARNING, logger="randfeat.eval.models"):
        model = digits_cnn(cache_dir=tmp_path)
    assert torch.get_num_threads() == threads  # training's one-thread setting is restored
    assert "corrupt" in caplog.text
    assert _same_weights(model, digits_model)  # deterministic training on the CPU
    assert torch.load(_cache_file(tmp_path), weights_only=True)["format_version"] == 1


def _copy_cache(src: Path, dst: Path, **changes: Any) -> None:
    blob = torch.load(_cache_file(src), weights_only=True)
    blob.update(changes)
    torch.save(blob, _cache_file(dst))


@pytest.mark.parametrize(
    "changes",
    [
        {"format_version": 0},
        {"config_hash": "0" * 64},
        {"data_checksum": "f" * 64},
    ],
    ids=["format_version", "config_hash", "data_checksum"],
)
def test_stale_metadata_is_retrained(
    digits_model: DigitsCNN,
    digits_cache_dir: Path,
    tmp_path: Path,
    train_spy: _TrainSpy,
    caplog: pytest.LogCaptureFixture,
    changes: dict[str, Any],
) -> None:
    _copy_cache(digits_cache_dir, tmp_path, **changes)
    with caplog.at_level(logging.WARNING, logger="randfeat.eval.models"):
        model = digits_cnn(cache_dir=tmp_path)
    assert train_spy.calls == 1 and "stale" in caplog.text
    assert not _same_weights(model, digits_model)
    # The retrained model replaced the stale file: the next call is a cache hit.
    assert _same_weights(digits_cnn(cache_dir=tmp_path), model) and train_spy.calls == 1


def _state_with(digits_model: DigitsCNN, kind: str) -> dict[str, torch.Tensor]:
    state = dict(digits_model.state_dict())
    if kind == "missing_key":
        del state["head.bias"]
    elif kind == "extra_key":
        state["head.extra"] = torch.zeros(1)
    elif kind == "wrong_shape":
        state["head.weight"] = torch.zeros(11, 128)
    elif kind == "wrong_dtype":
        state["head.weight"] = state["head.weight"].double()
    return state


@pytest.mark.parametrize("kind", ["missing_key", "extra_key", "wrong_shape", "wrong_dtype"])
def test_cache_with_wrong_tensors_is_retrained(
    digits_model: DigitsCNN,
    digits_cache_dir: Path,
    tmp_path: Path,
    train_spy: _TrainSpy,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    _copy_cache(digits_cache_dir, tmp_path, state_dict=_state_with(digits_model, kind))
    with caplog.at_level(logging.WARNING, logger="randfeat.eval.models"):
        digits_cnn(cache_dir=tmp_path)
    assert train_spy.calls == 1 and "do not match" in caplog.text


class _NotAllowed:
    """A class that ``torch.load(weights_only=True)`` refuses to unpickle."""


def test_cache_is_loaded_with_weights_only(
    digits_cache_dir: Path,
    tmp_path: Path,
    train_spy: _TrainSpy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Valid metadata and weights plus an arbitrary object: loadable with weights_only=False (it
    # would be a cache hit), refused with weights_only=True, so it must be treated as corrupt.
    _copy_cache(digits_cache_dir, tmp_path, evil=_NotAllowed())
    with caplog.at_level(logging.WARNING, logger="randfeat.eval.models"):
        digits_cnn(cache_dir=tmp_path)
    assert train_spy.calls == 1 and "corrupt" in caplog.text


def test_retrain_overwrites(digits_cache_dir: Path, tmp_path: Path, train_spy: _TrainSpy) -> None:
    _copy_cache(digits_cache_dir, tmp_path)
    model = digits_cnn(cache_dir=tmp_path, retrain=True)
    assert train_spy.calls == 1
    assert _same_weights(digits_cnn(cache_dir=tmp_path), model)


def test_failed_write_keeps_old_file_and_leaves_no_temp(
    digits_cache_dir: Path,
    tmp_path: Path,
    train_spy: _TrainSpy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _copy_cache(digits_cache_dir, tmp_path)
    before = _cache_file(tmp_path).read_bytes()

    def failing_save(obj: object, f: Any) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(rf_models.torch, "save", failing_save)
    with caplog.at_level(logging.WARNING, logger="randfeat.eval.models"):
        model = digits_cnn(cache_dir=tmp_path, retrain=True)
    assert isinstance(model, DigitsCNN) and "disk full" in caplog.text
    assert _cache_file(tmp_path).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [rf_models.DIGITS_CNN_FILE]


def test_cache_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RANDFEAT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "randfeat"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "randfeat"
    monkeypatch.setenv("RANDFEAT_CACHE", str(tmp_path / "override"))
    assert default_cache_dir() == tmp_path / "override"


def test_env_var_override_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, train_spy: _TrainSpy
) -> None:
    monkeypatch.setenv("RANDFEAT_CACHE", str(tmp_path / "env_cache"))
    digits_cnn()
    assert train_spy.calls == 1
    assert _cache_file(tmp_path / "env_cache").is_file()
    digits_cnn()  # second call: a hit in the env-var directory
    assert train_spy.calls == 1


# ----------------------------------------------------------------------------- timm


@pytest.fixture(scope="module")
def resnet() -> Preprocessed:
    return load_timm("resnet18", pretrained=False, num_classes=10)


def test_load_timm_folds_normalisation(resnet: Preprocessed) -> None:
    timm = pytest.importorskip("timm")
    assert [n for n, _ in resnet.named_children()] == ["normalize", "model"]
    assert not resnet.training and not resnet.model.training
    cfg = timm.data.resolve_data_config(model=resnet.model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    assert torch.allclose(mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = resnet(x)
        manual = resnet.model((x - mean) / std)
    assert out.shape == (2, 10)
    assert torch.allclose(out, manual, atol=1e-5, rtol=1e-5)
    # The fold is not a no-op: without normalisation the logits differ.
    with torch.no_grad():
        assert not torch.allclose(out, resnet.model(x), atol=1e-3)


def test_preprocessed_names_and_classifier(resnet: Preprocessed) -> None:
    assert resnet.get_classifier() is resnet.model.fc
    assert resnet.get_submodule("model.fc") is resnet.model.fc
    # Normalize's buffers are not persistent: the state_dict is exactly the inner model's.
    assert list(resnet.state_dict()) == [f"model.{k}" for k in resnet.model.state_dict()]
    with pytest.raises(TypeError, match="get_classifier"):
        Preprocessed(nn.Linear(2, 2), [0.0], [1.0]).get_classifier()


def test_load_timm_unknown_name_lists_close_matches() -> None:
    with pytest.raises(ValueError, match=r"resnet181.*Close matches.*'resnet18'"):
        load_timm("resnet181")
    with pytest.raises(ValueError, match="num_classes"):
        load_timm("resnet18", num_classes=0)


def test_load_timm_checkpoint(resnet: Preprocessed, tmp_path: Path) -> None:
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pt"
    torch.save(resnet.model.state_dict(), plain)
    torch.save({"state_dict": resnet.model.state_dict(), "epoch": 3}, wrapped)
    for path in (plain, wrapped):
        loaded = load_timm("resnet18", num_classes=10, checkpoint=path)
        assert _same_weights(loaded.model, resnet.model)


def test_load_timm_checkpoint_errors(resnet: Preprocessed, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        load_timm("resnet18", checkpoint=tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match=r"garbage\.pt.*weights_only"):
        load_timm("resnet18", checkpoint=garbage)
    ckpt = tmp_path / "ten_classes.pt"
    torch.save(resnet.model.state_dict(), ckpt)  # 10 classes vs the default 1000
    with pytest.raises(RuntimeError, match=r"does not fit"):
        load_timm("resnet18", checkpoint=ckpt)
    not_state = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_state)
    with pytest.raises(RuntimeError, match="state_dict"):
        load_timm("resnet18", checkpoint=not_state)


def test_normalize_validation() -> None:
    norm = Normalize([0.5], [0.25])
    assert torch.allclose(norm(torch.ones(1, 1, 2, 2)), torch.full((1, 1, 2, 2), 2.0))
    assert norm.state_dict() == {}
    with pytest.raises(ValueError, match="std"):
        Normalize([0.5], [0.0])
    with pytest.raises(ValueError, match="one value per"):
        Normalize([0.5, 0.5], [1.0])
