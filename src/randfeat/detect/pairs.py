"""Rows of one chunk that share a key: the within-batch comparison of every detector."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["shared_pairs"]


def shared_pairs(keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every pair of rows `i > j` of `keys: [n, K]` (`-1` unused) that share a key, and how many.

    Sort the (key, row) entries, and pair each entry with the earlier entries of its key: the
    work is the number of such pairs, not $n^2 K^2$.

    Returns:
        `(i, j, count)`, int64 `[pairs]` each: the later row, the earlier row, shared keys.
    """
    n, k = keys.shape
    dev = keys.device
    rows = torch.arange(n, device=dev).repeat_interleave(k)
    flat = keys.reshape(-1)
    used = flat >= 0
    flat, rows = flat[used], rows[used]
    empty = torch.empty(0, dtype=torch.long, device=dev)
    if flat.numel() < 2:
        return empty, empty, empty
    order = torch.argsort(flat, stable=True)  # rows ascending within a key
    flat, rows = flat[order], rows[order]
    _, size = torch.unique_consecutive(flat, return_counts=True)
    start = torch.repeat_interleave(torch.cumsum(size, 0) - size, size)
    before = torch.arange(flat.numel(), device=dev) - start  # earlier entries of the same key
    total = int(before.sum())
    if total == 0:
        return empty, empty, empty
    later = torch.repeat_interleave(torch.arange(flat.numel(), device=dev), before)
    offset = torch.arange(total, device=dev) - torch.repeat_interleave(
        torch.cumsum(before, 0) - before, before
    )
    i, j = rows[later], rows[start[later] + offset]
    keep = i != j  # a row repeating a key (Blacklight keeps distinct hashes: never)
    pairs, count = torch.unique((i[keep] << 32) | j[keep], return_counts=True)
    return pairs >> 32, pairs & 0xFFFFFFFF, count
