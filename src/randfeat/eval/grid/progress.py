"""Progress of an evaluation run on rank 0: a tqdm bar per (defense, attack, budget), a log line.

Part of `randfeat eval`, the protocol of Nguyen et al., "Understanding the Robustness of
Randomized Feature Defense Against Query-Based Adversarial Attacks", ICLR 2024 (§5). tqdm is
optional (the `eval` extra): without it, or when the bars are off, only the summary lines are
logged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from randfeat.eval.results.records import AttackRow, Row, Unit

__all__ = ["Progress"]

logger = logging.getLogger(__name__)


@dataclass
class _Tally:
    images: int = 0
    queries: int = 0
    wrong: int = 0  # fooled (attack units) or misclassified (clean units)
    skipped: int = 0
    t0: float = field(default_factory=time.perf_counter)


class Progress:
    """One tqdm bar per (defense, attack, budget) on rank 0 (images, queries/s, ETA) + a log line.

    The bars are off unless asked for and stderr is a terminal; the summary lines are logged.
    """

    def __init__(self, n_images: int, enabled: bool) -> None:
        self.n, self.enabled = n_images, enabled
        self.tally: dict[tuple[object, ...], _Tally] = {}
        self.bars: dict[tuple[object, ...], Any] = {}
        self.started: set[tuple[object, ...]] = set()

    def skip(self, unit: Unit, images: int) -> None:
        """Count a unit already in the file (bars and summaries include it)."""
        t = self.tally.setdefault(unit.group, _Tally())
        t.images += images
        t.skipped += images

    def begin(self, units: list[Unit]) -> None:
        """Start the clocks (and bars) of the groups a round of units is about to run."""
        for u in units:
            t = self.tally.setdefault(u.group, _Tally())
            if u.group not in self.started:
                self.started.add(u.group)
                t.t0 = time.perf_counter()
                self._bar(u, t)

    def update(self, unit: Unit, rows: list[Row]) -> None:
        """Count a finished unit's rows; log the group's summary when its last unit is in."""
        t = self.tally.setdefault(unit.group, _Tally())
        t.images += len(rows)
        for r in rows:
            if isinstance(r, AttackRow):
                t.queries += r.queries
                t.wrong += r.success
            else:
                t.wrong += not r.correct
        bar = self._bar(unit, t)
        if bar is not None:
            bar.update(len(rows))
            if unit.kind == "attack":
                rate = t.queries / max(time.perf_counter() - t.t0, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} queries/s")
        if t.images >= self.n:
            self._finish(unit, t)

    def _bar(self, unit: Unit, t: _Tally) -> Any:
        if not self.enabled:
            return None
        if unit.group not in self.bars:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # optional (the eval extra): no bars, the log lines remain
                self.enabled = False
                return None

            desc = f"{unit.defense} " + (
                "clean" if unit.kind == "clean" else f"{unit.attack} B={unit.budget}"
            )
            self.bars[unit.group] = tqdm(
                total=self.n, initial=t.skipped, desc=desc, unit="img", leave=False
            )
        return self.bars[unit.group]

    def _finish(self, unit: Unit, t: _Tally) -> None:
        bar = self.bars.pop(unit.group, None)
        if bar is not None:
            bar.close()
        done = t.images - t.skipped
        if unit.kind == "clean":
            logger.info(
                "%s: clean accuracy (this run's images) %d/%d", unit.defense, done - t.wrong, done
            )
        else:
            logger.info(
                "%s %s budget %d: fooled %d/%d of this run's images, %.1f queries per image",
                unit.defense,
                unit.attack,
                unit.budget,
                t.wrong,
                done,
                t.queries / max(done, 1),
            )

    def close(self) -> None:
        """Close every bar."""
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
