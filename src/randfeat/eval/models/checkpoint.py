"""Checkpoints written by `randfeat train`: [TrainedCheckpoint][randfeat.eval.models.checkpoint.TrainedCheckpoint].

A trained model is only useful to `randfeat eval` (or a server) if it can be rebuilt exactly: the
same timm architecture, the same changes to it, the same preprocessing. A checkpoint of
`randfeat train` therefore carries, beside the weights:

- the model: its timm name, input channels, classes and the stem it was given
  ([STEMS][randfeat.eval.models.timm_models.STEMS]: e.g. a 3×3 stride-2 first convolution for
  28×28 images);
- the preprocessing: the per-channel mean and standard deviation of the training images, folded
  into the model so that it takes images in $[0, 1]$ (as every model of `randfeat.eval` does), and
  the image side it was trained at;
- where the training stands: the epochs done and planned, the recipe, the history of losses and
  accuracies, and the optimizer, schedule and generator states to resume from.

The file is a plain `dict` of tensors, numbers, strings and lists, read with
`torch.load(weights_only=True)`, written atomically once per epoch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import torch
from torch import Tensor

from randfeat.eval.models.cache import save_atomic

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "TrainedCheckpoint", "is_trained_checkpoint"]

CHECKPOINT_FORMAT = "randfeat-train-checkpoint"
"""The `format` entry that marks a checkpoint of `randfeat train`."""
CHECKPOINT_VERSION = 1
"""Version of its layout; bump it when the layout changes."""


@dataclass(frozen=True)
class TrainedCheckpoint:
    """A checkpoint of `randfeat train`: what rebuilds the model, and where training stands.

    Attributes:
        model: the timm model name (`"resnet18"`).
        in_chans: input channels (1 for Fashion-MNIST).
        num_classes: classifier outputs.
        stem: the name of the stem it was given (a key of `STEMS`; `"timm"`: unchanged).
        mean: `[C]` channel means of the preprocessing (of the training images).
        std: `[C]` channel standard deviations of the preprocessing.
        image_size: the side of the square images it was trained on.
        data: the `--data` it was trained on.
        epoch: epochs done.
        epochs: epochs planned.
        recipe: the training settings (compared when resuming).
        history: one entry per epoch done: loss, accuracies, seconds.
        state_dict: the inner timm model's weights (without the preprocessing).
        resume: the optimizer, schedule and generator states to continue from.
    """

    model: str
    in_chans: int
    num_classes: int
    stem: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    data: str
    epoch: int
    epochs: int
    recipe: Mapping[str, Any]
    history: tuple[Mapping[str, float], ...] = ()
    state_dict: Mapping[str, Tensor] = field(default_factory=dict, repr=False)
    resume: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def done(self) -> bool:
        """Whether every planned epoch is done."""
        return self.epoch >= self.epochs

    def to_blob(self) -> dict[str, Any]:
        """The dict written to the file."""
        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "model": {
                "name": self.model,
                "in_chans": self.in_chans,
                "num_classes": self.num_classes,
                "stem": self.stem,
            },
            "preprocessing": {
                "mean": list(self.mean),
                "std": list(self.std),
                "image_size": self.image_size,
            },
            "data": self.data,
            "epoch": self.epoch,
            "epochs": self.epochs,
            "recipe": dict(self.recipe),
            "history": [dict(h) for h in self.history],
            "state_dict": dict(self.state_dict),
            "resume": dict(self.resume),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the checkpoint atomically (a temporary file, then `os.replace`).

        Raises:
            OSError: it cannot be written (`path` is then untouched).
        """
        save_atomic(Path(path).expanduser(), self.to_blob())

    @classmethod
    def from_blob(cls, blob: Mapping[str, Any], where: str = "checkpoint") -> TrainedCheckpoint:
        """Read the dict of a file (see `is_trained_checkpoint`).

        Raises:
            ValueError: it is not a `randfeat train` checkpoint of this version, or an entry is
                missing or of the wrong type (the message names it).
        """
        if blob.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{where} is not a checkpoint of `randfeat train`.")
        if blob.get("format_version") != CHECKPOINT_VERSION:
            raise ValueError(
                f"{where} has checkpoint format version {blob.get('format_version')!r}; this "
                f"randfeat reads version {CHECKPOINT_VERSION}. Retrain it with this version."
            )
        try:
            model, pre = blob["model"], blob["preprocessing"]
            state = blob["state_dict"]
            if not isinstance(state, dict) or not all(
                isinstance(v, Tensor) for v in state.values()
            ):
                raise TypeError("state_dict is not a dict of tensors")
            return cls(
                model=str(model["name"]),
                in_chans=int(model["in_chans"]),
                num_classes=int(model["num_classes"]),
                stem=str(model["stem"]),
                mean=tuple(float(m) for m in pre["mean"]),
                std=tuple(float(s) for s in pre["std"]),
                image_size=int(pre["image_size"]),
                data=str(blob["data"]),
                epoch=int(blob["epoch"]),
                epochs=int(blob["epochs"]),
                recipe=dict(blob["recipe"]),
                history=tuple(dict(h) for h in blob["history"]),
                state_dict=state,
                resume=dict(blob.get("resume", {})),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{where} is a damaged `randfeat train` checkpoint ({type(err).__name__}: {err})."
            ) from err

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> TrainedCheckpoint:
        """Read a checkpoint file with `torch.load(weights_only=True)`.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: it cannot be read, or it is not a `randfeat train` checkpoint.
        """
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"Checkpoint {str(p)!r} does not exist or is not a file.")
        try:
            blob = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"Checkpoint {str(p)!r} cannot be read with torch.load(weights_only=True): {err}"
            ) from err
        if not isinstance(blob, dict):
            raise ValueError(f"Checkpoint {str(p)!r} is not a checkpoint of `randfeat train`.")
        return cls.from_blob(blob, repr(str(p)))


def is_trained_checkpoint(blob: object) -> TypeGuard[dict[str, Any]]:
    """Whether a loaded checkpoint dict was written by `randfeat train`."""
    return isinstance(blob, dict) and blob.get("format") == CHECKPOINT_FORMAT
