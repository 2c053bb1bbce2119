"""Calibration: the noise scale ν chosen by its clean-accuracy cost (paper §5, Tables 1–3 and 14).

[calibrate_nu][randfeat.calibration.calibrate_nu] finds the ν that costs a given drop of clean
accuracy and returns a [Calibration][randfeat.calibration.Calibration] per target. The modules, in
the order a call runs through them:

- `calibrate`: `calibrate_nu`, its argument checks and defaults;
- `data`: the data as batches on the model's device, and the checks of the logits;
- `clean_pass`: one pass with the noise off (accuracy, feature moments, which path is verified);
- `search`: the bracket-and-bisect search over ν;
- `candidates`: how one candidate ν is evaluated (projected logits, cached head or full forwards);
- `result`: the `Calibration` record.
"""

from __future__ import annotations

from randfeat.calibration.calibrate import calibrate_nu as calibrate_nu
from randfeat.calibration.result import Calibration as Calibration

__all__ = ["Calibration", "calibrate_nu"]
