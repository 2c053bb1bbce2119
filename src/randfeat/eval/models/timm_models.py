"""timm models that take images in $[0, 1]$: their normalisation folded into the model.

The paper (Nguyen et al., ICLR 2024, §5) attacks timm/torchvision classifiers whose inputs are
images in $[0, 1]$; the attacks' ε-balls are defined in that pixel space. Normalisation therefore
belongs *inside* the model: [load_timm][randfeat.eval.models.timm_models.load_timm] folds the
model's own mean/std into a [Preprocessed][randfeat.eval.models.timm_models.Preprocessed]
wrapper. Its submodules are `normalize` and `model`, so a layer of the inner timm model is
addressed with the `model.` prefix (e.g. the penultimate features are `"model.head.pre"` for a
ViT, `"model.fc.pre"` for a ResNet); `"penultimate"` works either way because
`Preprocessed.get_classifier` forwards to the inner model.

Models trained by `randfeat train` on small images get a new stem
([STEMS][randfeat.eval.models.timm_models.STEMS]) and their own preprocessing; their checkpoints
([randfeat.eval.models.checkpoint][]) record both, and `load_timm` rebuilds them from it
([build_trained][randfeat.eval.models.timm_models.build_trained]).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from randfeat.checks import check_optional, check_positive_int
from randfeat.eval.models.checkpoint import TrainedCheckpoint, is_trained_checkpoint

__all__ = [
    "STEMS",
    "Normalize",
    "Preprocessed",
    "Stem",
    "build_trained",
    "create_model",
    "load_timm",
]


class Normalize(nn.Module):
    """Per-channel normalisation `(x - mean) / std` for `x: [N, C, H, W]`.

    `mean` and `std` are non-persistent buffers: they follow `.to(device)` and stay out of
    the `state_dict`, so a checkpoint of the inner model loads unchanged.

    Args:
        mean: `[C]` channel means.
        std: `[C]` channel standard deviations (> 0).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        m = torch.as_tensor(mean, dtype=torch.float32).flatten()
        s = torch.as_tensor(std, dtype=torch.float32).flatten()
        if m.numel() == 0 or m.shape != s.shape:
            raise ValueError(
                "Expected arguments `mean` and `std` to be non-empty with one value per "
                f"channel each, but got {m.numel()} and {s.numel()} values."
            )
        if not bool(torch.isfinite(m).all()) or not bool((torch.isfinite(s) & (s > 0)).all()):
            raise ValueError(
                "Expected finite `mean` and finite `std` > 0, but got "
                f"mean={m.tolist()}, std={s.tolist()}."
            )
        self.register_buffer("mean", m.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", s.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """`(x - mean) / std`, broadcast over `[N, C, H, W]`."""
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class Preprocessed(nn.Module):
    """A model that takes `[0, 1]` pixels: `model(normalize(x))`.

    Submodules are `normalize` and `model`, so layer names of the inner model gain a
    `model.` prefix (`"model.head.pre"`, `"model.fc.pre"`, `"model.blocks.11"`).

    Args:
        model: the classifier that expects normalised inputs.
        mean: `[C]` channel means of its preprocessing.
        std: `[C]` channel standard deviations of its preprocessing.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        """Logits `[N, K]` of `x: [N, C, H, W]` in `[0, 1]`."""
        return self.model(self.normalize(x))

    def get_classifier(self) -> nn.Module:
        """The inner model's classifier (timm's `get_classifier()` contract)."""
        get = getattr(self.model, "get_classifier", None)
        if not callable(get):
            raise TypeError(
                f"The inner model {type(self.model).__name__} has no get_classifier(); address "
                "its classifier by name instead (e.g. 'model.fc')."
            )
        classifier = get()
        if not isinstance(classifier, nn.Module):
            raise TypeError(
                f"Expected get_classifier() to return an nn.Module, but got {type(classifier)}."
            )
        return classifier


@dataclass(frozen=True)
class Stem:
    """A first convolution (and whether to keep the max-pool) for a ResNet-style timm model.

    ImageNet stems (a 7×7 stride-2 convolution, then a stride-2 max-pool) shrink a 224×224 image
    4× before the first block; on 28×28 images they leave 7×7 maps and lose the finest detail in
    the 7×7 kernel. A 3×3 first convolution keeps the detail; its stride and the max-pool set the
    cost (measured for resnet18 at 28×28, batch 128, one CPU thread: 3×3 stride 2 with the max-pool
    0.96 CPU-seconds a step, about timm's own stem; 3×3 stride 2 without it 2.5; stride 1 with
    it 2.1; stride 1 without it about 4× the stride-2 cost).

    Attributes:
        name: its name in `STEMS` and in checkpoints.
        kernel: side of the first convolution's kernel.
        stride: its stride.
        maxpool: keep the model's max-pool after it.
    """

    name: str
    kernel: int
    stride: int
    maxpool: bool

    def apply(self, model: nn.Module) -> nn.Module:
        """Replace `model.conv1` (and `model.maxpool` unless kept), in place; returns `model`.

        Raises:
            ValueError: the model has no `conv1` convolution and `maxpool` (not ResNet-style).
        """
        conv = getattr(model, "conv1", None)
        if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
            raise ValueError(
                f"Stem {self.name!r} replaces `conv1` and `maxpool`, which "
                f"{type(model).__name__} does not have as a single convolution; use stem 'timm' "
                "(the model unchanged) or a ResNet-style model (resnet18, resnet34, resnet50)."
            )
        model.conv1 = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            self.kernel,
            self.stride,
            self.kernel // 2,
            bias=conv.bias is not None,
        )
        if not self.maxpool:
            model.maxpool = nn.Identity()
        return model


STEMS: Mapping[str, Stem | None] = MappingProxyType(
    {
        "timm": None,
        "3x3s1": Stem("3x3s1", 3, 1, False),
        "3x3s1-maxpool": Stem("3x3s1-maxpool", 3, 1, True),
        "3x3s2": Stem("3x3s2", 3, 2, False),
        "3x3s2-maxpool": Stem("3x3s2-maxpool", 3, 2, True),
    }
)
"""The stems `randfeat train --stem` offers, by name; `timm` keeps the model's own."""


def create_model(name: str, *, in_chans: int, num_classes: int, stem: str = "timm") -> nn.Module:
    """An untrained timm model with `in_chans` inputs, `num_classes` outputs and the named stem.

    Its weights are drawn from the global RNG (as timm does); seed it for a reproducible start.

    Raises:
        ValueError: an unknown model or stem name (with close matches), or a stem the model
            cannot take.
    """
    timm = _require_timm()
    _check_name(timm, name)
    if stem not in STEMS:
        close = difflib.get_close_matches(stem, list(STEMS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"Unknown stem {stem!r}.{hint} Valid stems: {', '.join(STEMS)}.")
    model = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_classes)
    change = STEMS[stem]
    return model if change is None else change.apply(model)


def build_trained(ckpt: TrainedCheckpoint) -> Preprocessed:
    """The model a `randfeat train` checkpoint describes, with its weights, in eval mode.

    Raises:
        ValueError: the checkpoint names an unknown model or stem.
        RuntimeError: its weights do not fit that model.
    """
    model = create_model(
        ckpt.model, in_chans=ckpt.in_chans, num_classes=ckpt.num_classes, stem=ckpt.stem
    )
    try:
        model.load_state_dict(dict(ckpt.state_dict))
    except RuntimeError as err:
        raise RuntimeError(
            f"The checkpoint's weights do not fit {ckpt.model} with stem {ckpt.stem!r}: {err}"
        ) from err
    return Preprocessed(model, ckpt.mean, ckpt.std).eval()


def _require_timm() -> Any:
    try:
        import timm
    except ImportError as err:  # pragma: no cover - timm is a core dependency
        raise ImportError("load_timm needs timm: pip install timm.") from err
    return timm


def load_timm(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
) -> Preprocessed:
    """Create a timm model that takes `[0, 1]` pixels, with its own normalisation folded in.

    The mean/std come from `timm.data.resolve_data_config(model=model)` (i.e. the model's
    `pretrained_cfg`) and are applied by a `Normalize` module in front of the model.

    Args:
        name: a timm model name (see `timm.list_models()`).
        pretrained: load timm's pretrained weights (may need the network or the HF cache).
        checkpoint: a local state_dict file for the inner model, loaded with
            `torch.load(weights_only=True)`; a `{"state_dict": ...}` or `{"model": ...}`
            wrapper is unwrapped.
        num_classes: number of classes `K` (default: the model's own).

    Returns:
        `Preprocessed(model, mean, std)` in eval mode; inner layers are named `model.<name>`.

    Raises:
        ValueError: unknown model name (the message lists close matches), or `num_classes` < 1.
        FileNotFoundError: `checkpoint` does not exist.
        RuntimeError: `checkpoint` is unreadable or does not fit the model.
    """
    timm = _require_timm()
    check_optional(check_positive_int, num_classes, "num_classes")
    _check_name(timm, name)
    blob = None if checkpoint is None else _read_checkpoint(Path(checkpoint).expanduser())
    if is_trained_checkpoint(blob):
        return _from_trained(
            TrainedCheckpoint.from_blob(blob, repr(str(checkpoint))), name, num_classes
        )
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if blob is not None:
        _load_state(model, blob, str(checkpoint))
    config = timm.data.resolve_data_config(model=model)
    wrapped = Preprocessed(model, config["mean"], config["std"])
    return wrapped.eval()


def _check_name(timm: Any, name: str) -> None:
    known = timm.list_models()
    # timm also accepts "arch.tag" names (e.g. "vit_base_patch16_224.augreg_in21k").
    if not isinstance(name, str) or name.split(".")[0] not in known:
        close = difflib.get_close_matches(str(name), known, n=5, cutoff=0.6)
        hint = f" Close matches: {close}." if close else ""
        raise ValueError(f"Unknown timm model name {name!r}.{hint} See timm.list_models().")


def _from_trained(ckpt: TrainedCheckpoint, name: str, num_classes: int | None) -> Preprocessed:
    """A `randfeat train` checkpoint, checked against what the caller asked for."""
    if name.split(".")[0] != ckpt.model:
        raise ValueError(
            f"The checkpoint holds a trained {ckpt.model!r}, not {name!r}: pass --model "
            f"{ckpt.model}."
        )
    if num_classes is not None and num_classes != ckpt.num_classes:
        raise ValueError(
            f"The checkpoint's {ckpt.model} has {ckpt.num_classes} outputs, not the "
            f"{num_classes} asked for."
        )
    return build_trained(ckpt)


def _read_checkpoint(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(
            f"Expected argument `checkpoint` to be an existing file, but got {str(path)!r}."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(
            f"Could not read checkpoint {str(path)!r} with torch.load(weights_only=True): {err}. "
            "Save a plain state_dict (torch.save(model.state_dict(), path))."
        ) from err


def _load_state(model: nn.Module, state: Any, path: str) -> None:
    if isinstance(state, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            inner = state.get(key)
            if isinstance(inner, dict):
                state = inner
                break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise RuntimeError(f"Checkpoint {path!r} does not hold a state_dict (a dict of tensors).")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise RuntimeError(
            f"Checkpoint {path!r} does not fit timm model {type(model).__name__}: {err}"
        ) from err
