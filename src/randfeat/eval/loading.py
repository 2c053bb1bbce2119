"""The model and the pool of images that an evaluation's configuration names, loaded for the run.

Part of ``randfeat eval``, the protocol of Nguyen et al., "Understanding the Robustness of
Randomized Feature Defense Against Query-Based Adversarial Attacks", ICLR 2024 (§5): the 8×8
digits (embedded), a CIFAR-10 test set or an ImageFolder from a local path
(:mod:`randfeat.eval.data`), and the digits CNN or a timm model with its preprocessing folded in
(:mod:`randfeat.eval.models`). Failures become a :class:`~randfeat.eval.config.ConfigError` that
says what to fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from randfeat.eval.config import ConfigError, EvalConfig, _split_data


@dataclass
class _Pool:
    """The images to draw from: the digits test split, a CIFAR-10 test set or an ImageFolder."""

    name: str
    path: str | None
    labels: Tensor
    x: Tensor | None = None
    dataset: Any = None

    def images(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        if self.x is not None:
            return self.x[idx], self.labels[idx]
        from randfeat.eval.data import materialize

        try:
            return materialize(self.dataset, idx)
        except (OSError, ValueError) as err:
            raise ConfigError(f"Could not read images from {self.path!r}: {err}") from err


class _Batches:
    """Re-iterable ``(x, y)`` batches of a pool subset (calibration data without holding it all)."""

    def __init__(self, pool: _Pool, idx: Tensor, size: int) -> None:
        self.pool, self.idx, self.size = pool, idx, size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for part in self.idx.split(self.size):
            yield self.pool.images(part)


def _load_pool(cfg: EvalConfig, image_size: int | None) -> _Pool:
    from randfeat.eval import data as rf_data

    kind, path = _split_data(cfg.data)
    if kind == "digits":
        d = rf_data.digits()
        return _Pool("digits", None, d.y_test, x=d.x_test)
    root = str(path)
    ds: Any
    try:
        if kind == "cifar10":
            ds = rf_data.load_cifar10(root, train=False, image_size=image_size)
        else:
            ds = rf_data.load_image_folder(root, image_size=image_size or 224)
    except (OSError, ValueError) as err:
        raise ConfigError(f"Cannot load --data {cfg.data!r}: {err}") from err
    labels = torch.as_tensor(list(ds.targets), dtype=torch.int64)
    if labels.numel() == 0:
        raise ConfigError(f"--data {cfg.data!r} holds no images.")
    return _Pool(kind, root, labels, dataset=ds)


def _check_data_path(cfg: EvalConfig) -> None:
    """Fail fast (before loading a model) on a data path that is not a readable directory."""
    _, path = _split_data(cfg.data)
    if path is None:
        return
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(
            f"--data {cfg.data!r}: {str(p)!r} does not exist or is not a directory. randfeat "
            "never downloads data: point it at a local copy."
        )
    if not os.access(p, os.R_OK | os.X_OK):
        raise ConfigError(f"--data {cfg.data!r}: {str(p)!r} is not readable.")


def _load_model(cfg: EvalConfig) -> nn.Module:
    """The model, taking ``[0, 1]`` images (timm models get their normalisation folded in)."""
    from randfeat.eval import models as rf_models

    if cfg.model == "digits-cnn":
        if cfg.checkpoint is None:
            return rf_models.digits_cnn()
        model = rf_models.DigitsCNN(cfg.num_classes or 10, generator=torch.Generator())
        try:
            model.load_state_dict(torch.load(cfg.checkpoint, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError, KeyError, ValueError) as err:
            raise ConfigError(f"Cannot load --checkpoint {cfg.checkpoint!r}: {err}") from err
        return model.eval()
    num_classes = cfg.num_classes or (10 if cfg.data.startswith("cifar10:") else None)
    try:
        return rf_models.load_timm(
            cfg.model,
            pretrained=cfg.pretrained,
            checkpoint=cfg.checkpoint,
            num_classes=num_classes,
        )
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        raise ConfigError(f"Cannot load model {cfg.model!r}: {err}") from err
    except Exception as err:  # e.g. no network for pretrained weights: say what to do
        raise ConfigError(
            f"Cannot create timm model {cfg.model!r} (pretrained={cfg.pretrained}): "
            f"{type(err).__name__}: {err}. Offline, pass --checkpoint PATH instead."
        ) from err


def _image_size(cfg: EvalConfig, model: nn.Module) -> int | None:
    """``--image-size``, else the timm model's native size for ImageFolder data (CIFAR-10: 32)."""
    if cfg.image_size is not None or not cfg.data.startswith("imagenet:"):
        return cfg.image_size
    inner = getattr(model, "model", model)
    size = getattr(inner, "pretrained_cfg", {}).get("input_size")
    return int(size[-1]) if size else 224


def _load(cfg: EvalConfig) -> tuple[nn.Module, _Pool, int | None]:
    model = _load_model(cfg)
    size = _image_size(cfg, model)
    return model, _load_pool(cfg, size), size
