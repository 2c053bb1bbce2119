"""randfeat: randomized feature defense against query-based black-box attacks."""

from __future__ import annotations

from randfeat.theory import theorem1_fooling_probability as theorem1_fooling_probability
from randfeat.wrapper import RandomizedFeatureWrapper as RandomizedFeatureWrapper
from randfeat.wrapper import wrap as wrap

__version__ = "0.1.0.dev0"

__all__ = ["RandomizedFeatureWrapper", "__version__", "theorem1_fooling_probability", "wrap"]
