"""Argument checks, the search over ν and the progress bar behind :func:`randfeat.calibration.calibrate_nu`.

Nguyen et al., "Understanding the Robustness of Randomized Feature Defense Against Query-Based
Adversarial Attacks", ICLR 2024, §5: defenses are compared at noise scales ν with equal
clean-accuracy drops. :mod:`randfeat.calibration` holds the public API; this module holds the checks
of its arguments, :class:`_Search` (step ×10 / ÷10 until the target is bracketed, then bisect in log
space; see :mod:`randfeat.calibration` for the full description) and the optional tqdm bar. The
passes over the data are in :mod:`randfeat._calibration_data`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from torch import nn

from randfeat._calibration_data import _NonFinite
from randfeat.checks import (
    check_choice,
    check_optional,
    check_positive_int,
    check_probability,
    check_seed,
    expected,
)
from randfeat.wrapper import RandomizedFeatureWrapper

logger = logging.getLogger("randfeat.calibration")  # the records keep the public module's name

Stopped = Literal["tol", "resolution"]

MAX_DECADES = 60
"""The bracket search gives up after moving this many decades away from the first candidate."""
SATURATED_DECADES = 4
"""Stop stepping up (error) when this many ×10 steps leave the accuracy unchanged below the base."""
NARROW = 1e-3
"""Stop bisecting when ``hi / lo - 1`` falls below this."""


# ---------------------------------------------------------------------------- argument checks
def _check_targets(target_drop: object) -> tuple[list[float], bool]:
    many = isinstance(target_drop, Sequence) and not isinstance(target_drop, (str, bytes))
    values = list(target_drop) if many else [target_drop]  # type: ignore[call-overload]
    if not values:
        raise ValueError(
            expected(
                "target_drop", "an accuracy drop in (0, 1) or a non-empty sequence of them", []
            )
        )
    return [check_probability(t, "target_drop") for t in values], many


def _check_args(
    model: object, noise: object, seed: object, tol: object, draws: object, batch_size: object
) -> None:
    if isinstance(model, RandomizedFeatureWrapper):
        raise TypeError(
            "Expected argument `model` to be the undefended model, but got a "
            "RandomizedFeatureWrapper. Pass `wrapper.model` (or `wrapper.unwrap()`)."
        )
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"Expected argument `model` to be an nn.Module, but got {type(model).__name__}."
        )
    check_choice(noise, "noise", ("isotropic", "feature-variance"))
    check_seed(seed)
    check_optional(check_probability, tol, "tol")
    check_optional(check_positive_int, draws, "draws")
    check_optional(check_positive_int, batch_size, "batch_size")


# ---------------------------------------------------------------------------- the search
class _Search:
    """Candidate ν → correct-draw count, cached and shared by every target (counts are integers)."""

    def __init__(
        self, evaluate: Callable[[float], int], total: int, base_count: int, guess: float
    ) -> None:
        self.evaluate, self.total, self.base_count, self.guess = evaluate, total, base_count, guess
        self.cache: dict[float, int] = {}
        self.order: list[float] = []

    def count(self, nu: float) -> int:
        if nu not in self.cache:
            self.cache[nu] = self.evaluate(nu)
            self.order.append(nu)
            logger.info("calibrate_nu: ν=%.6g accuracy=%.5f", nu, self.cache[nu] / self.total)
        return self.cache[nu]

    def _bounds(self, need: float) -> tuple[float | None, float | None]:
        """hi: the smallest ν below ``need``; lo: the largest ν < hi at or above ``need``."""
        below = [v for v, c in self.cache.items() if c < need]
        hi = min(below) if below else None
        above = [v for v, c in self.cache.items() if c >= need and (hi is None or v < hi)]
        return (max(above) if above else None), hi

    def _unreachable(self, need: float, why: str) -> ValueError:
        floor = min(self.cache.values()) / self.total
        return ValueError(
            f"Cannot reach accuracy {need / self.total:.5f} with this noise: {why} (lowest "
            f"accuracy seen {floor:.5f}, base accuracy {self.base_count / self.total:.5f}). "
            "Choose a smaller `target_drop`, or other `layers`."
        )

    def solve(self, need: float, tol_count: float) -> tuple[float, Stopped]:
        """The best ν for ``need`` correct draws, and why the search stopped."""
        if not self.cache:
            self.count(self.guess)
        for _ in range(4 * MAX_DECADES):
            lo, hi = self._bounds(need)
            if hi is None:
                top = sorted(self.cache)[-SATURATED_DECADES:]
                counts = {self.cache[v] for v in top}
                if (
                    len(top) == SATURATED_DECADES
                    and top[-1] >= top[0] * 10 ** (SATURATED_DECADES - 1.5)
                    and len(counts) == 1
                    and self.base_count not in counts
                ):
                    raise self._unreachable(need, f"accuracy levels off for ν >= {top[0]:.3g}")
                nu = max(self.cache) * 10.0
                if nu > self.guess * 10.0**MAX_DECADES:
                    raise self._unreachable(need, f"no ν up to {nu / 10:.3g} is noisy enough")
                try:
                    self.count(nu)
                except _NonFinite as err:
                    raise self._unreachable(need, f"ν={nu:.3g} overflows ({err})") from None
            elif lo is None:
                nu = min(self.cache) / 10.0
                if nu < self.guess / 10.0**MAX_DECADES:
                    raise self._unreachable(need, f"even ν={nu * 10:.3g} costs too much accuracy")
                self.count(nu)
            else:
                best = min(self.cache, key=lambda v: (abs(self.cache[v] - need), v))
                if abs(self.cache[best] - need) <= tol_count:
                    return best, "tol"
                if hi / lo - 1.0 < NARROW or self.cache[lo] - self.cache[hi] <= 1:
                    return best, "resolution"
                self.count(math.sqrt(lo * hi))
        raise RuntimeError("calibrate_nu: the search did not terminate (please report this).")


# ---------------------------------------------------------------------------- progress
class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional dependency
        return _NoBar()
    return tqdm(desc="calibrate ν: clean pass", unit="batch", disable=None, leave=False)
