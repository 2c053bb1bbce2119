"""Models to evaluate: the embedded digits CNN, timm models that take $[0, 1]$, model sources.

- [randfeat.eval.models.digits][]: the offline default model, trained and cached.
- [randfeat.eval.models.timm_models][]: timm models with their normalisation folded in.
- [randfeat.eval.models.hf_models][]: saved Hugging Face image classifiers (`hf:PATH`), likewise.
- [randfeat.eval.models.sources][]: which `--model` names load from where.
"""

from __future__ import annotations

from randfeat.eval.models.digits import DigitsCNN as DigitsCNN
from randfeat.eval.models.digits import default_cache_dir as default_cache_dir
from randfeat.eval.models.digits import digits_cnn as digits_cnn
from randfeat.eval.models.timm_models import Normalize as Normalize
from randfeat.eval.models.timm_models import Preprocessed as Preprocessed
from randfeat.eval.models.timm_models import load_timm as load_timm

__all__ = ["DigitsCNN", "Normalize", "Preprocessed", "default_cache_dir", "digits_cnn", "load_timm"]
