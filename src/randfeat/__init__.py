"""randfeat: randomized feature defense against query-based black-box attacks."""

from __future__ import annotations

import randfeat.forking  # noqa: F401  (registers the after-fork thread policy)
from randfeat.calibration import Calibration as Calibration
from randfeat.calibration import calibrate_nu as calibrate_nu
from randfeat.theory import theorem1_fooling_probability as theorem1_fooling_probability
from randfeat.wrapper import RandomizedFeatureWrapper as RandomizedFeatureWrapper
from randfeat.wrapper import wrap as wrap

__version__ = "0.1.0.dev0"

__all__ = [
    "Calibration",
    "RandomizedFeatureWrapper",
    "__version__",
    "calibrate_nu",
    "theorem1_fooling_probability",
    "wrap",
]
