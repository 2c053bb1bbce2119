"""Rows of a repeated batch, a model call at a time.

Judging a point by the rule of Definition 1 and appendix D.4, rejudging an attack's points, the
oracle's verification, EOT queries and `RandomizedFeatureWrapper.predict` all run `times`
independent forwards of each of `N` points. Laying them out as `x.repeat_interleave(times)` first
holds `N * times` images at once (5.4 GB for 1,000 ImageNet images and 9 votes in float32), and
splitting per image instead leaves model calls part-empty (50 rows of a 64-row batch for 50 fresh
forwards). [repeated_rows][randfeat.batches.repeated_rows] gives the same rows in the same order,
full batches that span image boundaries, gathered one batch at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["repeated_rows"]


def repeated_rows(x: Tensor, times: int, batch_size: int) -> Iterator[Tensor]:
    """The rows of `x.repeat_interleave(times, dim=0)`, `batch_size` of them at a time.

    Every batch but the last holds exactly `batch_size` rows, so `N` points with `times`
    forwards each take $\\lceil N \\cdot times / b \\rceil$ calls of `b = batch_size` rows, and
    only one batch of copies is in memory at a time. With `times == 1` the batches are views of
    `x` (no copy).

    Args:
        x: `[N, ...]` points.
        times: how many consecutive copies of each point (`>= 1`).
        batch_size: rows per batch (`>= 1`).

    Examples:
        >>> x = torch.tensor([[0.0], [1.0], [2.0]])
        >>> [b.flatten().tolist() for b in repeated_rows(x, 2, 4)]
        [[0.0, 0.0, 1.0, 1.0], [2.0, 2.0]]
    """
    if times < 1 or batch_size < 1:
        raise ValueError(
            f"Expected `times` and `batch_size` >= 1, but got times={times}, "
            f"batch_size={batch_size}."
        )
    if times == 1:  # no copies to make: views of `x`
        yield from x.split(batch_size)
        return
    total = x.shape[0] * times
    for start in range(0, total, batch_size):
        rows = torch.arange(start, min(start + batch_size, total), device=x.device) // times
        yield x.index_select(0, rows)
