"""Hugging Face image classifiers from a local directory, taking images in $[0, 1]$.

`--model hf:PATH` (in `randfeat eval` and `randfeat serve`) loads a `transformers`
`AutoModelForImageClassification` saved with `save_pretrained` in `PATH` (`config.json` and the
weights, plus the `preprocessor_config.json` of its image processor when there is one), offline.
[load_hf][randfeat.eval.models.hf_models.load_hf] folds the processor's mean/std into an
[HFClassifier][randfeat.eval.models.hf_models.HFClassifier] whose forward returns the logits
tensor, so every attack, the calibration and the grid see a plain classifier. Its submodules are
`normalize` and `model`; `"penultimate"` is the input of the model's `classifier` head.

Needs the `hf` extra (`transformers`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from randfeat.eval.models.timm_models import Normalize

__all__ = ["HFClassifier", "load_hf"]


class HFClassifier(nn.Module):
    """A `transformers` image classifier on images in $[0, 1]$ that returns its logits.

    Args:
        model: an `AutoModelForImageClassification` model (ViT, ConvNeXt, ResNet, ...).
        mean: `[C]` channel means of its image processor.
        std: `[C]` channel standard deviations.
        image_size: the side its image processor resizes to (`None`: unknown).
    """

    def __init__(
        self, model: nn.Module, mean: Any, std: Any, image_size: int | None = None
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model
        self.image_size = image_size

    def forward(self, x: Tensor) -> Tensor:
        """Logits `[N, K]` of `x: [N, C, H, W]` in $[0, 1]$."""
        return self.model(pixel_values=self.normalize(x)).logits

    def get_classifier(self) -> nn.Module:
        """The model's classification head (timm's contract), whose input is "penultimate"."""
        head = getattr(self.model, "classifier", None)
        if not isinstance(head, nn.Module):
            raise AttributeError(
                f"{type(self.model).__name__} has no `classifier` module: name the layer to "
                "perturb instead of 'penultimate'."
            )
        return head


def _side(size: object) -> int | None:
    """The square side of an image processor's `size` / `crop_size` setting, if it has one."""
    if isinstance(size, int):
        return size
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    for key in ("height", "shortest_edge"):
        v = get(key)
        if isinstance(v, int):
            return v
    return None


def load_hf(path: str | Path, *, num_classes: int | None = None) -> HFClassifier:
    """The image classifier saved in `path`, in eval mode, with its normalisation folded in.

    Nothing is downloaded (`local_files_only`). Without a `preprocessor_config.json`, the
    normalisation is ImageNet's mean/std.

    Raises:
        ImportError: `transformers` is not installed.
        ValueError: `path` holds no image classifier, or one with another number of classes
            than `num_classes`.
    """
    try:
        from transformers import AutoImageProcessor, AutoModelForImageClassification
    except ImportError as err:
        raise ImportError('hf: models need transformers: pip install "randfeat[hf]".') from err
    root = Path(path).expanduser()
    try:
        model = AutoModelForImageClassification.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{str(root)!r} holds no transformers image classifier: {err}") from err
    labels = int(model.config.num_labels)
    if num_classes is not None and num_classes != labels:
        raise ValueError(
            f"The classifier in {str(root)!r} has {labels} classes, not --num-classes "
            f"{num_classes}."
        )
    mean: Any = (0.485, 0.456, 0.406)
    std: Any = (0.229, 0.224, 0.225)
    side = None
    if (root / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(str(root), local_files_only=True)
        mean = getattr(processor, "image_mean", None) or mean
        std = getattr(processor, "image_std", None) or std
        side = _side(getattr(processor, "crop_size", None)) or _side(processor.size)
    return HFClassifier(model, mean, std, side).eval()
