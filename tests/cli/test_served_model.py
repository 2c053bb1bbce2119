"""`randfeat serve`'s model builder: load, calibrate or take ν, wrap; errors before any work."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from randfeat import RandomizedFeatureWrapper
from randfeat.cli.served_model import ModelSpec, build
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
    ],
)
def test_bad_values_are_refused_when_the_spec_is_made(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        ModelSpec(**kwargs)
