"""Training a timm model on a data set in memory: what `randfeat train` runs.

No pretrained weights can be downloaded on an offline machine, and an ImageNet model is the wrong
shape for 28×28 grey images anyway. [train][randfeat.eval.models.training.train] trains
`timm.create_model(name, in_chans=C, num_classes=K)` with a stem suited to small images
([STEMS][randfeat.eval.models.timm_models.STEMS]) on the training split of a `--data` set that
offers one (Fashion-MNIST), then writes a
[TrainedCheckpoint][randfeat.eval.models.checkpoint.TrainedCheckpoint] that `randfeat eval
--checkpoint` rebuilds exactly.

The recipe ([TrainConfig][randfeat.eval.models.training.TrainConfig]) is a standard one for small
images: SGD with Nesterov momentum under a one-cycle learning-rate schedule (Smith and Topin,
"Super-Convergence", 2019), weight decay, label smoothing, and the usual augmentation (a random
crop of the image padded with zeros, and a random horizontal flip). The model takes images in
$[0, 1]$ with the training images' mean and standard deviation folded in, as every model of
`randfeat.eval` does.

Training is resumable: the checkpoint is written atomically after every epoch with the optimizer,
schedule and generator states, and the same command continues from the last epoch done (the
weights then equal those of an uninterrupted run on the same machine and thread count). The
global RNG is left as it was: the initial weights are drawn under `torch.random.fork_rng`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from randfeat.eval.data.loaders import Split
from randfeat.eval.data.registry import DATA_SETS, DataSpec
from randfeat.eval.errors import ConfigError
from randfeat.eval.models.cache import top1_accuracy
from randfeat.eval.models.checkpoint import TrainedCheckpoint
from randfeat.eval.models.timm_models import STEMS, Preprocessed, create_model

__all__ = ["NON_RECIPE_SETTINGS", "TrainConfig", "augment", "train"]

logger = logging.getLogger(__name__)

NON_RECIPE_SETTINGS = frozenset({"out", "quiet", "threads"})
"""Settings that do not change the trained model: a resumed run may change them."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of `randfeat train`.

    The defaults are the recipe measured on Fashion-MNIST (docs/results/fashion-mnist.md gives
    the accuracy and the time it took).

    Attributes:
        model: a timm model name.
        data: a `--data` set with a training split (`fashion-mnist[:PATH]`).
        epochs: passes over the training images.
        out: the checkpoint file (written after every epoch; resumed from when it exists).
        stem: a key of `STEMS` (default `3x3s2-maxpool`: a 3×3 stride-2 first convolution and
            the max-pool, 7×7 maps after the stem of a 28×28 image).
        batch_size: images per step.
        lr: the peak learning rate of the one-cycle schedule.
        momentum: SGD's (Nesterov) momentum.
        weight_decay: L2 penalty on every weight.
        label_smoothing: of the cross-entropy loss.
        crop_padding: zero padding of the random crop, in pixels (0: no crop).
        flip: random horizontal flips.
        train_images: train on a seeded random subset of this size (None: all).
        test_images: measure on a seeded random subset of the test images (None: all).
        seed: seed of the weights, the image order and the augmentation.
        threads: torch threads while training (None: torch's setting).
        quiet: no progress bar.
    """

    model: str = "resnet18"
    data: str = "fashion-mnist"
    epochs: int = 8
    out: str = "checkpoint.pt"
    stem: str = "3x3s2-maxpool"
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    crop_padding: int = 2
    flip: bool = True
    train_images: int | None = None
    test_images: int | None = None
    seed: int = 0
    threads: int | None = None
    quiet: bool = False

    def recipe(self) -> dict[str, Any]:
        """The settings that make the trained model (all but `NON_RECIPE_SETTINGS`)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in NON_RECIPE_SETTINGS
        }

    def check(self) -> DataSpec:
        """Validate every setting before any work; returns the parsed `data`.

        Raises:
            ConfigError: a bad value, an unknown stem, or a data set without a training split.
        """
        for name in ("epochs", "batch_size"):
            _positive_int(name, getattr(self, name))
        for name in ("train_images", "test_images", "threads"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"Expected `seed` to be an int >= 0, but got {self.seed!r}.")
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int):
            raise ConfigError(
                f"Expected `crop_padding` to be an int >= 0, got {self.crop_padding!r}."
            )
        if self.crop_padding < 0:
            raise ConfigError(
                f"Expected `crop_padding` to be an int >= 0, got {self.crop_padding}."
            )
        for name, low, high in (
            ("lr", 0.0, math.inf),
            ("momentum", -1e-12, 1.0),
            ("weight_decay", -1e-12, math.inf),
            ("label_smoothing", -1e-12, 1.0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"Expected `{name}` to be a number, but got {value!r}.")
            if not (low < value < high):
                allowed = "> 0" if name == "lr" else f"in [0, {high:g})"
                raise ConfigError(f"Expected `{name}` to be {allowed}, but got {value!r}.")
        if self.stem not in STEMS:
            raise ConfigError(f"Unknown stem {self.stem!r}. Valid stems: {', '.join(STEMS)}.")
        spec = DataSpec.parse(self.data)
        if spec.dataset.split is None:
            offered = [d.usage for d in DATA_SETS.values() if d.split is not None]
            raise ConfigError(
                f"--data {spec.dataset.name} has no training split that randfeat can read; "
                f"randfeat train takes --data {', '.join(offered)}."
            )
        return spec


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"Expected `{name}` to be an int >= 1, but got {value!r}.")


def augment(x: Tensor, padding: int, flip: bool, generator: torch.Generator) -> Tensor:
    """A random crop of each zero-padded image and a random horizontal flip, per image.

    Args:
        x: `[N, C, H, W]` images.
        padding: pixels of zeros on each side before an `H × W` crop (0: no crop).
        flip: flip each image left-right with probability 1/2.
        generator: the source of the crop offsets and flips.

    Returns:
        `[N, C, H, W]` augmented images.
    """
    n, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (top[:, None] + torch.arange(h))[:, :, None]  # [N, H, 1]
        cols = (left[:, None] + torch.arange(w))[:, None, :]  # [N, 1, W]
        x = padded.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols]
        x = x.permute(0, 3, 1, 2)
    if flip:
        flipped = torch.rand(n, generator=generator) < 0.5
        x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


def _subset(n_all: int, n: int | None, seed: int, what: str) -> Tensor | None:
    """A seeded random subset of `n` of `n_all` indices (None: all of them)."""
    if n is None:
        return None
    if n > n_all:
        raise ConfigError(f"{what} {n} exceeds the {n_all} images there are.")
    return torch.randperm(n_all, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def _resume_from(cfg: TrainConfig) -> TrainedCheckpoint | None:
    path = Path(cfg.out).expanduser()
    if not path.exists():
        if not path.parent.is_dir():
            raise ConfigError(
                f"--out {cfg.out!r}: the directory {str(path.parent)!r} does not exist."
            )
        return None
    try:
        ckpt = TrainedCheckpoint.read(path)
    except ValueError as err:
        raise ConfigError(f"--out {cfg.out!r}: {err} Remove it or choose another --out.") from err
    want = cfg.recipe()
    differ = [
        f"{k}: file has {ckpt.recipe.get(k)!r}, this run has {v!r}"
        for k, v in want.items()
        if ckpt.recipe.get(k) != v
    ]
    if differ:
        raise ConfigError(
            f"--out {cfg.out!r} holds a training with other settings ({'; '.join(differ)}); "
            "rerun with its settings to resume, or choose another --out."
        )
    return ckpt


def _batches(n: int, size: int, generator: torch.Generator) -> Iterator[Tensor]:
    order = torch.randperm(n, generator=generator)
    yield from order.split(size)


def _progress(total: int, desc: str, quiet: bool) -> Any:
    from tqdm.auto import tqdm

    disable = quiet or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="step", disable=disable, leave=False)


def train(cfg: TrainConfig) -> TrainedCheckpoint:
    """Train (or resume training) `cfg.model` on `cfg.data`; returns the final checkpoint.

    Every epoch ends with the test accuracy and an atomic write of `cfg.out`. When `cfg.out`
    already holds this training, it continues after the last epoch done (nothing is trained when
    every epoch is done).

    Raises:
        ConfigError: a bad setting, unreadable data, or an `out` that holds something else.
    """
    spec = cfg.check()
    ckpt = _resume_from(cfg)
    if ckpt is not None and ckpt.done:
        logger.info("%s is trained already (%d epochs); nothing to do.", cfg.out, ckpt.epoch)
        return ckpt
    read_split = spec.dataset.split
    if read_split is None:  # pragma: no cover - cfg.check() refuses such data sets
        raise ConfigError(f"--data {cfg.data!r} has no training split.")
    try:
        split = read_split(spec.path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"Cannot load --data {cfg.data!r}: {err}") from err
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, split, ckpt)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: TrainConfig, split: Split, ckpt: TrainedCheckpoint | None) -> TrainedCheckpoint:
    train_idx = _subset(split.y_train.numel(), cfg.train_images, cfg.seed, "--train-images")
    test_idx = _subset(split.y_test.numel(), cfg.test_images, cfg.seed + 1, "--test-images")
    x_train = split.x_train if train_idx is None else split.x_train[train_idx]
    y_train = split.y_train if train_idx is None else split.y_train[train_idx]
    x_test = split.x_test if test_idx is None else split.x_test[test_idx]
    y_test = split.y_test if test_idx is None else split.y_test[test_idx]
    channels = int(x_train.shape[1])
    mean = tuple(float(m) for m in x_train.mean(dim=(0, 2, 3)))
    std = tuple(float(s) for s in x_train.std(dim=(0, 2, 3)))
    with torch.random.fork_rng(devices=[]):  # timm draws initial weights from the global RNG
        torch.manual_seed(cfg.seed)
        inner = create_model(cfg.model, in_chans=channels, num_classes=split.classes, stem=cfg.stem)
    model = Preprocessed(inner, mean, std).to(memory_format=torch.channels_last)
    steps = math.ceil(x_train.shape[0] / cfg.batch_size)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps, cycle_momentum=False
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    start = 0
    if ckpt is not None:
        inner.load_state_dict(dict(ckpt.state_dict))
        optimizer.load_state_dict(ckpt.resume["optimizer"])
        schedule.load_state_dict(ckpt.resume["schedule"])
        generator.set_state(ckpt.resume["generator"])
        history = [dict(h) for h in ckpt.history]
        start = ckpt.epoch
        logger.info("Resuming %s after epoch %d of %d.", cfg.out, start, cfg.epochs)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        total_loss, correct = 0.0, 0
        bar = _progress(steps, f"epoch {epoch + 1}/{cfg.epochs}", cfg.quiet)
        try:
            for idx in _batches(x_train.shape[0], cfg.batch_size, generator):
                x = augment(x_train[idx], cfg.crop_padding, cfg.flip, generator)
                x = x.to(memory_format=torch.channels_last)
                logits = model(x)
                loss = loss_fn(logits, y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                value = float(loss.detach())
                total_loss += value * idx.numel()
                correct += int((logits.argmax(1) == y_train[idx]).sum())
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}")
        finally:
            bar.close()
        model.eval()
        accuracy = top1_accuracy(
            model, x_test.contiguous(memory_format=torch.channels_last), y_test, 500
        )
        n = x_train.shape[0]
        history.append(
            {
                "epoch": epoch + 1,
                "loss": total_loss / n,
                "train_accuracy": correct / n,
                "test_accuracy": accuracy,
                "seconds": time.perf_counter() - t0,
            }
        )
        ckpt = TrainedCheckpoint(
            model=cfg.model,
            in_chans=channels,
            num_classes=split.classes,
            stem=cfg.stem,
            mean=mean,
            std=std,
            image_size=int(x_train.shape[-1]),
            data=cfg.data,
            epoch=epoch + 1,
            epochs=cfg.epochs,
            recipe=cfg.recipe(),
            history=tuple(history),
            state_dict={k: v.contiguous() for k, v in inner.state_dict().items()},
            resume={
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "generator": generator.get_state(),
            },
        )
        try:
            ckpt.save(cfg.out)
        except OSError as err:
            raise ConfigError(f"Cannot write --out {cfg.out!r}: {err}") from err
        logger.info(
            "Epoch %d/%d: loss %.4f, train accuracy %.4f, test accuracy %.4f (%d images), %.0f s.",
            epoch + 1,
            cfg.epochs,
            history[-1]["loss"],
            history[-1]["train_accuracy"],
            accuracy,
            y_test.numel(),
            history[-1]["seconds"],
        )
    if ckpt is None:  # pragma: no cover - train() returns early when every epoch is done
        raise ConfigError(f"--epochs {cfg.epochs}: no epoch to train.")
    return ckpt
