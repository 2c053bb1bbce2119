"""`memory`: the default store, tensors in one process (on the device of the first queries).

The ring and the index start small and double as queries arrive, up to `capacity` (the index is
rebuilt from the ring's keys at each doubling, so its posting lists stay about half full); then
the ring overwrites its oldest slot. Memory at `n` stored queries: the ring, `n·(8K + D + 16)`
bytes (keys, payload, time, account and tag numbers), and the index, `B·(P + 1)·8` bytes with
`B` the power of two >= `2nK/P`. For the default detector on 28×28 images (`K = 16`, `D = 196`,
`P = 8`) at 1,000,000 stored: 340 + 302 = 642 bytes a query (measured in
`benchmarks/detect.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from randfeat.detect.stores.base import (
    AccountCounts,
    Candidates,
    Layout,
    Store,
    bucket_count,
    check_layout,
    pack_entries,
    unpack_entries,
)

__all__ = ["MemoryStore"]

_MIN_ROWS = 1024


class MemoryStore(Store):
    """Stored queries and their index in tensors of this process (see the module docstring)."""

    def __init__(self) -> None:
        self.spec = "memory"
        self._layout: Layout | None = None
        self._device = torch.device("cpu")
        self._counts: dict[str, list[int]] = {}
        self._names: list[str] = []
        self._name_ids: dict[str, int] = {}
        self._tags: list[str | None] = []
        self._tag_ids: dict[str | None, int] = {}
        self._next = 0
        self._rows = 0
        self._alloc(0, torch.device("cpu"))

    # ------------------------------------------------------------------ layout and memory
    @property
    def layout(self) -> Layout:
        if self._layout is None:
            raise RuntimeError("The store is not bound to a detector yet.")
        return self._layout

    def bind(self, layout: Layout, key: bytes, *, explicit_key: bool) -> bytes:
        check_layout(None if self._layout is None else self._layout.to_json(), layout, self.spec)
        if self._layout is None:
            self._layout = layout
            self._alloc(0, self._device)
        return key

    def _alloc(self, rows: int, device: torch.device) -> None:
        """Empty ring of `rows` slots and an empty index sized for it."""
        lay = self._layout
        k, d, p = (lay.keys, lay.payload, lay.posting_cap) if lay else (1, 0, 1)
        buckets = bucket_count(rows, k, p) if lay else 1
        self._device = device
        self._rows = rows
        self._ring_keys = torch.full((rows, k), -1, dtype=torch.long, device=device)
        self._ring_payload = torch.zeros((rows, d), dtype=torch.uint8, device=device)
        self._ring_time = torch.zeros(rows, dtype=torch.float64, device=device)
        self._ring_account = torch.zeros(rows, dtype=torch.int32, device=device)
        self._ring_tag = torch.zeros(rows, dtype=torch.int32, device=device)
        self._postings = torch.full((buckets, p), -1, dtype=torch.long, device=device)
        self._fill = torch.zeros(buckets, dtype=torch.long, device=device)

    def _grow(self, need: int, device: torch.device) -> None:
        """Make room for `need` rows (<= capacity): double the ring, rebuild the index."""
        cap = self.layout.capacity
        rows = min(cap, max(_MIN_ROWS, 1 << (need - 1).bit_length()))
        old = (self._ring_keys, self._ring_payload, self._ring_time, self._ring_account)
        old_tag, n = self._ring_tag, self._next  # no query was evicted yet: slots 0..n-1
        self._alloc(rows, device)
        for new, src in zip(
            (self._ring_keys, self._ring_payload, self._ring_time, self._ring_account),
            old,
            strict=True,
        ):
            new[:n] = src[:n].to(device)
        self._ring_tag[:n] = old_tag[:n].to(device)
        self._index(torch.arange(n, device=device), self._ring_keys[:n])

    def nbytes(self) -> int:
        """Bytes held by the ring and the index tensors."""
        tensors = (
            self._ring_keys,
            self._ring_payload,
            self._ring_time,
            self._ring_account,
            self._ring_tag,
            self._postings,
            self._fill,
        )
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------ the index
    def _index(self, seqs: Tensor, keys: Tensor) -> None:
        """Append `seqs: [n]` under their keys `[n, K]` (seq order); keep the newest P a list."""
        p = self.layout.posting_cap
        seq = seqs.unsqueeze(1).expand_as(keys).reshape(-1)
        key = keys.reshape(-1)
        used = key >= 0
        seq, key = seq[used], key[used]
        if key.numel() == 0:
            return
        bucket = key & (self._postings.shape[0] - 1)
        bucket, order = torch.sort(bucket, stable=True)  # within a bucket: seq order
        entry = pack_entries(seq[order], key[order])
        uniq, size = torch.unique_consecutive(bucket, return_counts=True)
        start = torch.cumsum(size, 0) - size
        rank = torch.arange(bucket.numel(), device=bucket.device) - torch.repeat_interleave(
            start, size
        )
        keep = rank >= torch.repeat_interleave(size, size) - p  # the newest p of each bucket
        slot = (self._fill[bucket] + rank) % p
        self._postings[bucket[keep], slot[keep]] = entry[keep]
        self._fill[uniq] += size

    def _alive(self, seqs: Tensor, now: float) -> Tensor:
        """Which `seqs` (any shape, -1 = none) are stored and live at `now`."""
        lay = self.layout
        ok = (seqs >= max(0, self._next - lay.capacity)) & (seqs >= 0)
        if lay.ttl is not None and self._rows:
            slot = torch.where(ok, seqs % lay.capacity, torch.zeros_like(seqs))
            ok &= self._ring_time[slot] >= now - lay.ttl
        return ok

    # ------------------------------------------------------------------ Store
    def lookup(self, keys: Tensor, now: float) -> Candidates:
        lay = self.layout
        keys = keys.to(self._device)
        bucket = torch.where(keys >= 0, keys & (self._postings.shape[0] - 1), 0)
        entries = self._postings.index_select(0, bucket.reshape(-1)).view(*keys.shape, -1)
        seqs = unpack_entries(entries, keys)  # [n, K, P]
        seqs = torch.where((keys >= 0).unsqueeze(-1), seqs, -1)
        seqs = torch.where(self._alive(seqs, now), seqs, -1)
        uniq = torch.unique(seqs[seqs >= 0])
        slots = uniq % lay.capacity  # index_select: much faster than indexing on the CPU
        payload = self._ring_payload.index_select(0, slots)
        accounts = self._ring_account.index_select(0, slots)
        tags = self._ring_tag.index_select(0, slots)

        def describe(positions: Sequence[int]) -> list[tuple[str, str | None]]:
            idx = torch.as_tensor(list(positions), dtype=torch.long, device=uniq.device)
            a, t = accounts[idx].tolist(), tags[idx].tolist()
            return [(self._names[i], self._tags[j]) for i, j in zip(a, t, strict=True)]

        return Candidates(seqs, uniq, payload, describe)

    def add(
        self, keys: Tensor, payload: Tensor, account: str, tag: str | None, now: float
    ) -> Tensor:
        lay = self.layout
        n = keys.shape[0]
        if self._next == 0 and keys.device != self._device:  # live where the queries are
            self._alloc(0, keys.device)
        dev = self._device
        seqs = torch.arange(self._next, self._next + n, device=dev)
        if self._next + n >= 2**39:
            raise OverflowError("The store numbered 2^39 queries; clear it.")
        keep = slice(max(0, n - lay.capacity), n)  # more than capacity at once: the newest
        if self._rows < lay.capacity and self._next + n > self._rows:
            self._grow(min(lay.capacity, self._next + n), dev)
        stored = seqs[keep]
        slot = stored % lay.capacity
        keys, payload = keys[keep].to(dev), payload[keep].to(dev)
        self._ring_keys[slot] = keys
        self._ring_payload[slot] = payload
        self._ring_time[slot] = now
        self._ring_account[slot] = self._intern_name(account)
        self._ring_tag[slot] = self._intern_tag(tag)
        self._index(stored, keys)
        self._next += n
        return seqs

    def _intern_name(self, account: str) -> int:
        if account not in self._name_ids:
            self._name_ids[account] = len(self._names)
            self._names.append(account)
        return self._name_ids[account]

    def _intern_tag(self, tag: str | None) -> int:
        if tag not in self._tag_ids:
            self._tag_ids[tag] = len(self._tags)
            self._tags.append(tag)
        return self._tag_ids[tag]

    def count(self, account: str, queries: int, flagged: int) -> None:
        c = self._counts.setdefault(account, [0, 0])
        c[0] += queries
        c[1] += flagged

    def counts(self) -> dict[str, AccountCounts]:
        return {a: AccountCounts(q, f) for a, (q, f) in self._counts.items()}

    def live(self, now: float) -> int:
        if self._layout is None or self._next == 0:
            return 0
        first = max(0, self._next - self.layout.capacity)
        seqs = torch.arange(first, self._next, device=self._device)
        return int(self._alive(seqs, now).sum())

    def clear(self) -> None:
        self._counts.clear()
        self._names.clear()
        self._name_ids.clear()
        self._tags.clear()
        self._tag_ids.clear()
        self._next = 0
        self._alloc(0, self._device)
