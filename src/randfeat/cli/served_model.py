"""From `randfeat serve`'s options to a model to serve: [build][randfeat.cli.served_model.build].

A thin layer over the public pieces: the model comes from `randfeat.eval`'s model sources
(`digits-cnn` or a timm name, with `--pretrained` / `--checkpoint`), the data from its data sets
(`digits`, `cifar10:PATH`, `imagenet:PATH`), ν from [calibrate_nu][randfeat.calibrate_nu] at
`target_drop` on a random subset of those images (or as given), and the defense from
[randfeat.wrap][randfeat.wrap], seeded from OS entropy. The result is the module and its
[ModelCard][randfeat.serve.config.ModelCard], what [create_app][randfeat.serve.app.create_app]
and [run_server][randfeat.serve.run.run_server] take.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from randfeat.calibration import calibrate_nu
from randfeat.checks import (
    check_choice,
    check_int,
    check_nonnegative_float,
    check_optional,
    check_positive_int,
    check_probability,
)
from randfeat.eval.data.registry import DataSpec, Pool
from randfeat.eval.errors import ConfigError
from randfeat.eval.models.sources import ModelRequest, model_source
from randfeat.serve.config import ModelCard
from randfeat.wrapper import wrap

__all__ = ["DEFENSES", "ModelSpec", "build"]

logger = logging.getLogger("randfeat.serve")

DEFENSES = ("base", "input", "feature")
"""What `--defense` takes: no defense, RND (noise on the input), randomized features."""


@dataclass(frozen=True)
class ModelSpec:
    """The model options of `randfeat serve`.

    Attributes:
        model: `"digits-cnn"` or a timm model name.
        pretrained: load timm's pretrained weights.
        checkpoint: a local `state_dict` for the model.
        num_classes: classifier outputs (default: the data set's, else the model's).
        image_size: the image side (default: the data's own, or the model's native size).
        data: the images that fix the input shape and calibrate ν: `"digits"`, `"cifar10:PATH"`
            or `"imagenet:PATH"` (default: `digits` for the digits CNN, else none).
        defense: `"base"`, `"input"` (RND) or `"feature"`.
        layers: the feature defense's layer specs.
        nu: the variance ν; `None` calibrates it to `target_drop` on `data`.
        target_drop: the clean-accuracy drop ν costs (0.02 = two points).
        calib_images: images to calibrate on (a random subset of `data`).
        seed: seeds the choice of calibration images and the calibration's noise (the served
            noise is always drawn from OS entropy).
        device: where the model runs.
    """

    model: str = "digits-cnn"
    pretrained: bool = False
    checkpoint: str | None = None
    num_classes: int | None = None
    image_size: int | None = None
    data: str | None = None
    defense: Literal["base", "input", "feature"] = "feature"
    layers: tuple[str, ...] = ("penultimate",)
    nu: float | None = None
    target_drop: float = 0.02
    calib_images: int = 1000
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_choice(self.defense, "defense", DEFENSES)
        check_optional(check_positive_int, self.num_classes, "num_classes")
        check_optional(check_positive_int, self.image_size, "image_size")
        check_positive_int(self.calib_images, "calib_images")
        check_int(self.seed, "seed", low=0)
        check_optional(check_nonnegative_float, self.nu, "nu")
        check_probability(self.target_drop, "target_drop")
        if not self.layers:
            raise ValueError("Expected `layers` to name at least one layer spec.")


def _input_shape(spec: ModelSpec, model: nn.Module, pool: Pool | None) -> tuple[int, int, int]:
    if pool is not None:
        x, _ = pool.images(torch.zeros(1, dtype=torch.long))
        c, h, w = x.shape[1:]
        return int(c), int(h), int(w)
    side = spec.image_size or model_source(spec.model).native_size(model)
    if side is None:
        raise ConfigError(
            f"Cannot tell the input size of {spec.model!r}: pass --image-size N (or --data)."
        )
    return 3, int(side), int(side)


def _calibration_images(spec: ModelSpec, pool: Pool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(spec.seed)
    n = min(spec.calib_images, pool.labels.numel())
    idx = torch.randperm(pool.labels.numel(), generator=g)[:n].sort().values
    return pool.images(idx)


def build(spec: ModelSpec) -> tuple[nn.Module, ModelCard]:
    """Load, calibrate and defend the model `spec` names.

    Returns:
        The model to serve (the bare model for `base`, else a
        [RandomizedFeatureWrapper][randfeat.RandomizedFeatureWrapper] seeded from OS entropy), in
        eval mode on `spec.device`, and its card.

    Raises:
        ConfigError: an unknown model or data set, unreadable files, calibration without data,
            labels the model cannot score, or a failed calibration (the message says the fix).
    """
    source = model_source(spec.model)
    source.check(spec.model)
    data = (
        spec.data if spec.data is not None else ("digits" if spec.model == "digits-cnn" else None)
    )
    dataspec = DataSpec.parse(data) if data is not None else None
    if dataspec is not None:
        dataspec.check_path()
    needs_nu = spec.defense != "base" and spec.nu is None
    if needs_nu and dataspec is None:
        raise ConfigError(
            f"Calibrating ν to --target-drop {spec.target_drop:g} needs images: give --data "
            "(e.g. cifar10:PATH), or give ν itself with --nu."
        )
    classes = spec.num_classes or (dataspec.dataset.classes if dataspec else None)
    path = dataspec.path if dataspec is not None else None
    model = source.load(ModelRequest(spec.model, spec.pretrained, spec.checkpoint, classes, path))
    model = model.eval().to(spec.device)
    size = spec.image_size
    if dataspec is not None and size is None and dataspec.dataset.native_size:
        size = source.native_size(model) or 224
    pool = dataspec.load(size) if dataspec is not None else None
    shape = _input_shape(spec, model, pool)
    with torch.no_grad():
        k = int(model(torch.zeros(1, *shape, device=spec.device)).shape[-1])
    if pool is not None and int(pool.labels.max()) >= k:
        raise ConfigError(
            f"--data {data} has labels up to {int(pool.labels.max())}, but {spec.model!r} has {k} "
            "outputs; pass --num-classes or a matching --checkpoint."
        )
    layers = ["input"] if spec.defense == "input" else list(spec.layers)
    if spec.defense == "base":
        card = ModelCard(spec.model, shape, k, defended=False)
        logger.info("serving %s undefended", spec.model)
        return model, card
    nu = spec.nu
    if nu is None:
        if pool is None:  # pragma: no cover - the checks above load data whenever ν is calibrated
            raise ConfigError("Calibrating ν needs --data; pass --data or a fixed --nu.")
        x, y = _calibration_images(spec, pool)
        try:
            cal = calibrate_nu(
                model,
                (x.to(spec.device), y.to(spec.device)),
                layers,
                spec.target_drop,
                seed=spec.seed,
                progress=False,
            )
        except ValueError as err:
            raise ConfigError(f"Calibration of the {spec.defense} defense failed: {err}") from err
        nu = float(cal.nu)
        logger.info(
            "calibrated ν = %.4g on %d images: accuracy %.4f -> %.4f (target drop %g)",
            nu,
            cal.n_images,
            cal.base_accuracy,
            cal.accuracy,
            spec.target_drop,
        )
    try:
        defended = wrap(model, layers, nu=nu)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"Cannot defend {spec.model!r}: {err}") from err
    card = ModelCard(spec.model, shape, k, nu > 0, spec.defense, tuple(defended.layers), nu)
    logger.info(
        "serving %s with %s noise ν = %.4g at %s", spec.model, spec.defense, nu, card.layers
    )
    return defended, card
