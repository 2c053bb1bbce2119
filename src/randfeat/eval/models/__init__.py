"""Models to evaluate: the embedded CNNs, timm models that take $[0, 1]$, model sources.

- [randfeat.eval.models.digits][]: the offline default model, trained and cached.
- [randfeat.eval.models.fashion][]: `fashion-cnn`, the Fashion-MNIST CNN, trained and cached.
- [randfeat.eval.models.cache][]: how the embedded models are trained on first use and cached.
- [randfeat.eval.models.timm_models][]: timm models with their normalisation folded in, stems for
  small images.
- [randfeat.eval.models.checkpoint][]: the checkpoints `randfeat train` writes.
- [randfeat.eval.models.hf_models][]: saved Hugging Face image classifiers (`hf:PATH`), likewise.
- [randfeat.eval.models.sources][]: which `--model` names load from where.
"""

from __future__ import annotations

from randfeat.eval.models.cache import default_cache_dir as default_cache_dir
from randfeat.eval.models.digits import DigitsCNN as DigitsCNN
from randfeat.eval.models.digits import digits_cnn as digits_cnn
from randfeat.eval.models.fashion import FashionCNN as FashionCNN
from randfeat.eval.models.fashion import fashion_cnn as fashion_cnn
from randfeat.eval.models.timm_models import Normalize as Normalize
from randfeat.eval.models.timm_models import Preprocessed as Preprocessed
from randfeat.eval.models.timm_models import load_timm as load_timm

__all__ = [
    "DigitsCNN",
    "FashionCNN",
    "Normalize",
    "Preprocessed",
    "default_cache_dir",
    "digits_cnn",
    "fashion_cnn",
    "load_timm",
]
