"""From `randfeat serve`'s options to a model to serve: [build][randfeat.cli.served_model.build].

A thin layer over the public pieces: the model comes from `randfeat.eval`'s model sources
(`digits-cnn` or a timm name, with `--pretrained` / `--checkpoint`), the data from its data sets
(`digits`, `cifar10:PATH`, `imagenet:PATH`), ν from [calibrate_nu][randfeat.calibrate_nu] at
`target_drop` on a random subset of those images (or as given), and the defense from
[randfeat.wrap][randfeat.wrap], seeded from OS entropy (or keyed: `noise="keyed"`). The result
is the module and its [ModelCard][randfeat.serve.config.ModelCard], what
[create_app][randfeat.serve.app.create_app] and [run_server][randfeat.serve.run.run_server] take.
[calibrate_detector][randfeat.cli.served_model.calibrate_detector] sets the query detector's
threshold on [benign_images][randfeat.cli.served_model.benign_images];
[read_noise_key][randfeat.cli.served_model.read_noise_key] reads the key of keyed noise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from randfeat.calibration import calibrate_nu
from randfeat.checks import (
    check_choice,
    check_int,
    check_nonnegative_float,
    check_optional,
    check_positive_int,
    check_probability,
)
from randfeat.detect import Detector, StoreMismatch
from randfeat.eval.data import loaders as rf_data
from randfeat.eval.data.registry import DataSpec, Pool
from randfeat.eval.errors import ConfigError
from randfeat.eval.models.sources import ModelRequest, model_source
from randfeat.keyed import KEY_BYTES, NoiseKind, check_key
from randfeat.serve.config import ModelCard
from randfeat.wrapper import wrap

__all__ = [
    "DEFENSES",
    "ModelSpec",
    "benign_images",
    "build",
    "calibrate_detector",
    "read_noise_key",
]

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
            noise is always drawn from OS entropy, or keyed).
        device: where the model runs.
        noise: `"fresh"` (a new draw at every query) or `"keyed"` (a function of a secret key
            and the image: the same image gets the same answer every time).
        noise_key: the 32-byte key of keyed noise; `None` draws one from OS entropy. Never in
            the `repr`.
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
    noise: NoiseKind = "fresh"
    noise_key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_choice(self.defense, "defense", DEFENSES)
        check_choice(self.noise, "noise", ("fresh", "keyed"))
        if self.noise == "keyed" and self.defense == "base":
            raise ValueError(
                "Expected a defense with keyed noise, but got defense 'base' (no noise to key). "
                "Use --defense feature or input."
            )
        if self.noise_key is not None:
            if self.noise != "keyed":
                raise ValueError("Expected no `noise_key` with fresh noise; use noise='keyed'.")
            check_key(self.noise_key)
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
        defended = wrap(model, layers, nu=nu, noise=spec.noise, key=spec.noise_key)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"Cannot defend {spec.model!r}: {err}") from err
    card = ModelCard(
        spec.model, shape, k, nu > 0, spec.defense, tuple(defended.layers), nu, spec.noise
    )
    logger.info(
        "serving %s with %s%s noise ν = %.4g at %s",
        spec.model,
        "keyed " if spec.noise == "keyed" else "",
        spec.defense,
        nu,
        card.layers,
    )
    return defended, card


def _resized(x: Tensor, shape: tuple[int, int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == shape[1:]:
        return x
    x = torch.nn.functional.interpolate(x, size=shape[1:], mode="bilinear")
    return x.clamp_(0.0, 1.0)


def benign_images(spec: ModelSpec, n: int, shape: tuple[int, int, int]) -> tuple[Tensor, str]:
    """Up to `n` benign images of `spec`'s data that the server uses for nothing else, in a
    random order (seeded by `spec.seed`), to calibrate the query detector's threshold.

    They are the data set's training images where randfeat can read them (`digits`,
    `fashion-mnist`, `cifar10`): the test images are what ν is calibrated on and what an
    evaluation attacks. Other data sets give their images that the ν calibration did not draw.

    Returns:
        The images `[m, C, H, W]` (`m <= n`) and a phrase saying where they come from.

    Raises:
        ConfigError: no `--data`, or unreadable files.
    """
    data = (
        spec.data if spec.data is not None else ("digits" if spec.model == "digits-cnn" else None)
    )
    if data is None:
        raise ConfigError(
            "Calibrating the query detector needs benign images: give --data (e.g. cifar10:PATH)."
        )
    dataspec = DataSpec.parse(data)
    name = dataspec.dataset.name
    g = torch.Generator().manual_seed(spec.seed + 1)
    try:
        if name == "digits":
            x, where = rf_data.digits().x_train, "digits training images"
        elif dataspec.dataset.split is not None:  # in memory (fashion-mnist)
            x, where = dataspec.dataset.split(dataspec.path).x_train, f"{name} training images"
        elif name == "cifar10":
            size = None if shape[1:] == (32, 32) else shape[1]
            train = rf_data.load_cifar10(str(dataspec.path), train=True, image_size=size)
            idx = torch.randperm(len(train), generator=g)[:n].sort().values  # type: ignore[arg-type]
            x, _ = rf_data.materialize(train, idx)
            where = "cifar10 training images"
        else:  # the pool's images that the ν calibration did not draw
            size = spec.image_size or (shape[1] if dataspec.dataset.native_size else None)
            pool = dataspec.load(size)
            m = pool.labels.numel()
            order = torch.randperm(m, generator=torch.Generator().manual_seed(spec.seed))
            rest = order[min(spec.calib_images, m) :].sort().values
            x, _ = pool.images(rest) if rest.numel() else (torch.empty(0, *shape), None)
            where = f"{name} images not used to calibrate ν"
    except (OSError, ValueError) as err:
        raise ConfigError(f"Could not read benign images of --data {data}: {err}") from err
    x = x[torch.randperm(x.shape[0], generator=g)[:n]]
    return _resized(x.float(), shape), where


def calibrate_detector(
    detector: Detector, spec: ModelSpec, shape: tuple[int, int, int], *, fpr: float, images: int
) -> float:
    """Set the detector's threshold to flag about `fpr` of the benign images of `spec`'s data
    (at most `images` of them, from [benign_images][randfeat.cli.served_model.benign_images]),
    as ν is set to its target drop; this binds the detector's store to `shape`.

    Returns:
        The threshold.

    Raises:
        ConfigError: fewer than `1 / fpr` benign images, or a store that holds another
            detector's queries.
    """
    x, where = benign_images(spec, images, shape)
    need = math.ceil(1 / fpr - 1e-9)
    if x.shape[0] < need:
        raise ConfigError(
            f"Calibrating the detector to --detect-fpr {fpr:g} needs at least {need} benign "
            f"images, but --data offers {x.shape[0]} ({where}). Raise --detect-fpr to "
            f"{1 / max(1, x.shape[0]):.2g} or more, or give a larger --data."
        )
    try:
        threshold = detector.calibrate(x, target_fpr=fpr)
    except StoreMismatch as err:
        raise ConfigError(f"--detect-store: {err}") from err
    logger.info(
        "detector %s: threshold %.4g, calibrated to flag %g of %d benign images (%s)",
        detector.name,
        threshold,
        fpr,
        x.shape[0],
        where,
    )
    return threshold


_MAKE_KEY = "python -c 'import secrets; print(secrets.token_hex(32))'"


def _parse_key(text: str, source: str) -> bytes:
    """A noise key from 64 hex digits; the message never shows the key."""
    digits = text.strip()
    try:
        key = bytes.fromhex(digits)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"Expected {source} to hold a noise key of {2 * KEY_BYTES} hex digits "
            f"({KEY_BYTES} bytes), but it holds {len(digits)} characters that are not one. "
            f"Make one with: {_MAKE_KEY}."
        )
    return key


def read_noise_key(path: str | None, env: str = "") -> bytes | None:
    """The key of keyed noise: from the file `path` (64 hex digits, or 32 raw bytes), else from
    `env` (the value of `$RANDFEAT_NOISE_KEY`, 64 hex digits), else `None` (a fresh key).

    Raises:
        ConfigError: a file that is missing, unreadable, empty or not a key; an `env` that is
            not a key. The message never shows a key.
    """
    if path is None:
        return _parse_key(env, "$RANDFEAT_NOISE_KEY") if env.strip() else None
    file = Path(path).expanduser()
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise ConfigError(
            f"Cannot read --noise-key-file {str(file)!r} ({err.strerror or err}). Write a key "
            f"into it with: {_MAKE_KEY} > FILE."
        ) from err
    if not raw.strip():
        raise ConfigError(
            f"--noise-key-file {str(file)!r} is empty. Write a key into it with: {_MAKE_KEY} > FILE."
        )
    if len(raw) == KEY_BYTES and not raw.isascii():  # 32 raw bytes
        return raw
    return _parse_key(raw.decode("ascii", "replace"), f"--noise-key-file {str(file)!r}")
