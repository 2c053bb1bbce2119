"""timm models that take images in $[0, 1]$: their normalisation folded into the model.

The paper (Nguyen et al., ICLR 2024, §5) attacks timm/torchvision classifiers whose inputs are
images in $[0, 1]$; the attacks' ε-balls are defined in that pixel space. Normalisation therefore
belongs *inside* the model: [load_timm][randfeat.eval.models.timm_models.load_timm] folds the
model's own mean/std into a [Preprocessed][randfeat.eval.models.timm_models.Preprocessed]
wrapper. Its submodules are `normalize` and `model`, so a layer of the inner timm model is
addressed with the `model.` prefix (e.g. the penultimate features are `"model.head.pre"` for a
ViT, `"model.fc.pre"` for a ResNet); `"penultimate"` works either way because
`Preprocessed.get_classifier` forwards to the inner model.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from randfeat.checks import check_optional, check_positive_int

__all__ = ["Normalize", "Preprocessed", "load_timm"]


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
    known = timm.list_models()
    # timm also accepts "arch.tag" names (e.g. "vit_base_patch16_224.augreg_in21k").
    if not isinstance(name, str) or name.split(".")[0] not in known:
        close = difflib.get_close_matches(str(name), known, n=5, cutoff=0.6)
        hint = f" Close matches: {close}." if close else ""
        raise ValueError(f"Unknown timm model name {name!r}.{hint} See timm.list_models().")
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint is not None:
        _load_checkpoint(model, Path(checkpoint).expanduser())
    config = timm.data.resolve_data_config(model=model)
    wrapped = Preprocessed(model, config["mean"], config["std"])
    return wrapped.eval()


def _load_checkpoint(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"Expected argument `checkpoint` to be an existing file, but got {str(path)!r}."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(
            f"Could not read checkpoint {str(path)!r} with torch.load(weights_only=True): {err}. "
            "Save a plain state_dict (torch.save(model.state_dict(), path))."
        ) from err
    if isinstance(state, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            inner = state.get(key)
            if isinstance(inner, dict):
                state = inner
                break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise RuntimeError(
            f"Checkpoint {str(path)!r} does not hold a state_dict (a dict of tensors)."
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise RuntimeError(
            f"Checkpoint {str(path)!r} does not fit timm model {type(model).__name__}: {err}"
        ) from err
