"""`randfeat serve`'s model builder: load, calibrate or take ν, wrap; errors before any work."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from randfeat import RandomizedFeatureWrapper
from randfeat.cli.served_model import (
    ModelSpec,
    benign_images,
    build,
    calibrate_detector,
    read_noise_key,
)
from randfeat.detect import DEFAULT, DETECTORS
from randfeat.eval.errors import ConfigError


@pytest.fixture(autouse=True)
def _digits_cache(
    digits_model: Any, digits_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session's trained digits CNN (build loads it by name from the cache)."""
    monkeypatch.setenv("RANDFEAT_CACHE", str(digits_cache_dir))


def test_the_default_calibrates_feature_noise_on_the_digits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, "randfeat.serve"):
        model, card = build(ModelSpec(calib_images=300))
    assert isinstance(model, RandomizedFeatureWrapper) and not model.seeded  # OS entropy
    assert card.input_shape == (1, 8, 8) and card.classes == 10
    assert card.defended and card.defense == "feature" and card.layers == ("head.pre",)
    assert card.nu is not None and card.nu > 0 and model.nu == card.nu
    assert any("calibrated ν" in r.getMessage() for r in caplog.records)
    model.unwrap()


def test_a_given_nu_is_served_without_calibration(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "randfeat"):
        model, card = build(ModelSpec(nu=0.5, defense="input"))
    assert isinstance(model, RandomizedFeatureWrapper)
    assert card.nu == 0.5 and card.layers == ("input",) and card.defense == "input"
    assert not any("calibrat" in r.getMessage() for r in caplog.records)
    model.unwrap()


def test_base_serves_the_bare_model() -> None:
    model, card = build(ModelSpec(defense="base"))
    assert not isinstance(model, RandomizedFeatureWrapper) and not card.defended
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(model(x), model(x))


def test_a_timm_model_takes_its_size_from_image_size_when_nu_is_given() -> None:
    model, card = build(ModelSpec(model="resnet18", nu=0.1, image_size=32, num_classes=10))
    assert (
        card.input_shape == (3, 32, 32) and card.classes == 10 and card.layers == ("model.fc.pre",)
    )  # inside the Preprocessed wrapper
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert isinstance(model, RandomizedFeatureWrapper)
    model.unwrap()


def test_keyed_noise_is_served_with_the_given_key() -> None:
    key = bytes(range(32))
    model, card = build(ModelSpec(nu=2.0, noise="keyed", noise_key=key))
    x = torch.rand(3, 1, 8, 8)
    assert isinstance(model, RandomizedFeatureWrapper) and card.noise == "keyed"
    assert model.noise_key == key and torch.equal(model(x), model(x))  # one answer per image
    model.unwrap()
    fresh, card = build(ModelSpec(nu=2.0))
    assert card.noise == "fresh" and not torch.equal(fresh(x), fresh(x))
    fresh.unwrap()


def test_the_detector_is_calibrated_on_images_served_for_nothing_else(digits: Any) -> None:
    x, where = benign_images(ModelSpec(), 10_000, (1, 8, 8))
    assert where == "digits training images" and x.shape == (1257, 1, 8, 8)
    test = {tuple(r.flatten().tolist()) for r in digits.x_test}
    assert not any(tuple(r.flatten().tolist()) in test for r in x)  # the training split
    det = DETECTORS[DEFAULT](seed=0)
    threshold = calibrate_detector(det, ModelSpec(), (1, 8, 8), fpr=0.001, images=10_000)
    assert det.threshold == threshold
    # The 540 test digits streamed in order at the threshold calibrated to 0.1%: about
    # 540 · 0.001 = 0.54 expected flags; P(Poisson(0.54) > 3) = 0.2%, and the seed fixes the run.
    assert det.observe(digits.x_test, "benign").n_flagged <= 3
    with pytest.raises(ConfigError, match="needs at least 10000 benign images"):
        calibrate_detector(det, ModelSpec(), (1, 8, 8), fpr=1e-4, images=10_000)


def test_a_noise_key_file_may_hold_hex_or_raw_bytes(tmp_path: Path) -> None:
    key = bytes(range(200, 232))
    (tmp_path / "hex").write_text(key.hex() + "\n")
    (tmp_path / "raw").write_bytes(key)
    assert read_noise_key(str(tmp_path / "hex")) == key == read_noise_key(str(tmp_path / "raw"))
    assert read_noise_key(None, key.hex()) == key and read_noise_key(None, "") is None


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (ModelSpec(model="resnt18", nu=0.1, image_size=32), "Did you mean 'resnet18'"),
        (ModelSpec(model="resnet18", image_size=32), "needs images: give --data"),
        (ModelSpec(data="cifar10:/nonexistent/cifar"), "does not exist"),
        (ModelSpec(data="mnist"), "Unknown data set 'mnist'"),
        (ModelSpec(layers=("conv9",), nu=0.1), "conv9"),
    ],
)
def test_bad_specs_are_config_errors(spec: ModelSpec, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build(spec)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"defense": "fetaure"}, "Did you mean 'feature'"),
        ({"nu": -1.0}, "nu"),
        ({"target_drop": 1.5}, "target_drop"),
        ({"calib_images": 0}, "calib_images"),
        ({"layers": ()}, "layers"),
        ({"noise": "keyed", "defense": "base"}, "keyed noise"),
        ({"noise_key": bytes(32)}, "noise_key"),
        ({"noise": "keyed", "noise_key": b"short"}, "32 bytes"),
    ],
)
def test_bad_values_are_refused_when_the_spec_is_made(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        ModelSpec(**kwargs)
