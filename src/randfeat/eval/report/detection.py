"""The query-detection figures of a report (`randfeat eval --detect`): per cell, and the legend.

[summarize][randfeat.eval.report.summary.summarize] puts a
[Detection][randfeat.eval.report.detection.Detection] in every cell whose rows carry what the
detector saw, and one legend line with the detector and the benign workloads' false positives.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from randfeat.eval.results.records import AttackRow, Header

__all__ = ["Detection", "detection_cell", "detection_legend"]


@dataclass(frozen=True)
class Detection:
    """What the query detector saw in one cell (`randfeat eval --detect`).

    Attributes:
        detected: the fraction of images with at least one flagged query.
        median_first_flag: the median, over the detected images, of the query index of the
            first flag (None: none detected).
        undetected: the fraction of images fooled before their first flag (the attack won
            before the owner could see it).
        rejected: refused queries per image, on average.
        benign_flags: flags caused by a stored benign image, over all images.
    """

    detected: float
    median_first_flag: float | None
    undetected: float
    rejected: float
    benign_flags: int


def detection_cell(rows: Sequence[AttackRow]) -> Detection | None:
    """What the detector saw in one cell's rows (`None`: rows without detection)."""
    seen = [r.detection for r in rows if r.detection is not None]
    if not seen:
        return None
    n = len(rows)
    first = [d.first_flag for d in seen if d.first_flag > 0]
    return Detection(
        detected=len(first) / n,
        median_first_flag=statistics.median(first) if first else None,
        undetected=sum(r.undetected for r in rows) / n,
        rejected=sum(d.rejected for d in seen) / n,
        benign_flags=sum(d.benign_flags for d in seen),
    )


def detection_legend(header: Header) -> str:
    """One line on the run's detector and the false positives of every benign workload."""
    d = header.detection
    if d is None:
        return ""
    rates = ", ".join(
        f"{w} {100 * r.rate:.3g}% ({r.flagged}/{r.queries})" for w, r in d.workloads.items()
    )
    return (
        f"Query detection: `{d.name}`, threshold {d.threshold:.4g} calibrated to "
        f"{100 * d.target_fpr:.3g}% benign false positives on {len(d.history_indices)} benign "
        f"images (also stored before every attack); on_detect = {d.on_detect}"
        + (f" after {d.ban_after} flags" if d.on_detect == "ban" else "")
        + (f"; the attacker spreads its queries over {d.accounts} keys" if d.accounts > 1 else "")
        + f". Benign false positives per workload: {rates}. Detection cells: images with a "
        "flagged query (%) · median queries to the first flag · fooled before the first flag "
        "(%); each image attacked on its own behind the detector."
    )
