"""The search over ν: bracket the target by steps of ×10, then bisect in log space.

Start at a data-derived guess, step ×10 / ÷10 until the target is bracketed (within
`MAX_DECADES` decades, else a clear error), then bisect in log ν. Stop within `tol` of the target
(`stopped="tol"`) or at the resolution the data allow (`stopped="resolution"`: the bracket's
relative width is below `NARROW`, or its two ends differ by one correct draw so no ν in between can
do better). The accuracy need not be monotone in ν (noise can rescue a misclassified image), so the
search keeps the tightest consistent bracket instead of assuming it. Every evaluated candidate is
cached and shared by every target.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from randfeat.calibration.result import Stopped

__all__ = ["MAX_DECADES", "NARROW", "SATURATED_DECADES", "NonFiniteLogits", "Search"]

logger = logging.getLogger(__name__)

MAX_DECADES = 60
"""The bracket search gives up after moving this many decades away from the first candidate."""
SATURATED_DECADES = 4
"""Stop stepping up (error) when this many ×10 steps leave the accuracy unchanged below the base."""
NARROW = 1e-3
"""Stop bisecting when `hi / lo - 1` falls below this."""


class NonFiniteLogits(ValueError):
    """A candidate ν made the model's logits NaN or infinite (raised by the candidate counters)."""


class Search:
    """Candidate ν → correct-draw count, cached and shared by every target (counts are integers).

    Args:
        evaluate: the number of correct draws at a candidate ν (out of `total`).
        total: N·draws, the draws of one candidate.
        base_count: the correct draws with the noise off (N·draws times the clean accuracy).
        guess: the first candidate ν.

    Attributes:
        cache: every candidate evaluated → its correct-draw count.
        order: the candidates in the order they were evaluated.
    """

    def __init__(
        self, evaluate: Callable[[float], int], total: int, base_count: int, guess: float
    ) -> None:
        self.evaluate, self.total, self.base_count, self.guess = evaluate, total, base_count, guess
        self.cache: dict[float, int] = {}
        self.order: list[float] = []

    def count(self, nu: float) -> int:
        """The correct draws at `nu` (evaluated once, then cached)."""
        if nu not in self.cache:
            self.cache[nu] = self.evaluate(nu)
            self.order.append(nu)
            logger.info("calibrate_nu: ν=%.6g accuracy=%.5f", nu, self.cache[nu] / self.total)
        return self.cache[nu]

    def _bounds(self, need: float) -> tuple[float | None, float | None]:
        """hi: the smallest ν below `need`; lo: the largest ν < hi at or above `need`."""
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
        """The best ν for `need` correct draws (within `tol_count`), and why the search stopped.

        Raises:
            ValueError: no ν within `MAX_DECADES` decades of the guess reaches `need`, the
                accuracy levels off above it, or the logits overflow on the way.
        """
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
                except NonFiniteLogits as err:
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
