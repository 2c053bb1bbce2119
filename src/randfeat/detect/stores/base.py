"""What every store of a detector holds and does: a ring of stored queries and capped postings.

A store keeps the last `capacity` queries a detector observed (a ring: query number `seq` lives
in slot `seq mod capacity`, so the oldest is overwritten first) and an inverted index from each
of a query's `K` keys to the queries that had it. The index has `buckets` posting lists of at
most `posting_cap` entries each (the newest kept): a lookup reads exactly `K` lists of at most
`posting_cap` entries, however many queries are stored and however common a key is (a blank
background, say). An entry packs the query number and 24 other bits of the key, so that two
keys sharing a bucket are told apart (wrongly merged with probability $2^{-24}$).

A stored query is *live* while it is among the last `capacity` stored and younger than `ttl`
seconds; a lookup returns live queries only. Eviction is oldest first in both cases: by number
(the ring) and by age (the time-to-live, checked at lookup; Redis also expires the data itself).
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

__all__ = [
    "AccountCounts",
    "Candidates",
    "Layout",
    "Store",
    "StoreMismatch",
    "check_bits",
    "pack_entries",
    "unpack_entries",
]

CHECK_BITS = 24
"""Bits of the key kept in a posting entry to tell keys of one bucket apart."""
_CHECK_SHIFT = 38  # the key's bits 38..61: above any bucket index (buckets <= 2^30)
_CHECK_MASK = (1 << CHECK_BITS) - 1
MAX_BUCKETS = 1 << 30
MAX_SEQ = 1 << 39  # query numbers fit in the 63 - 24 bits left of an entry


class StoreMismatch(ValueError):
    """The store was written by a detector of another kind, shape, layout or key."""


@dataclass(frozen=True)
class Layout:
    """What a detector puts in its store; a shared store refuses a detector of another layout.

    Attributes:
        detector: the detector's name and settings, e.g. `"blacklight(window=20, ...)"`.
        shape: the image shape `[C, H, W]` the fingerprints are computed for.
        keys: `K`, keys per stored query (`-1` marks an unused key).
        payload: bytes stored per query besides its keys (an embedding), `D`.
        posting_cap: most entries per posting list, `P`.
        capacity: most queries stored (the ring's size).
        ttl: seconds a stored query stays live, or `None` (until evicted by capacity).
        buckets: posting lists in the index, a power of two `B` (the memory store grows it).
    """

    detector: str
    shape: tuple[int, ...]
    keys: int
    payload: int
    posting_cap: int
    capacity: int
    ttl: float | None
    buckets: int

    def to_json(self) -> str:
        """The layout as a JSON string (what a shared store remembers)."""
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class AccountCounts:
    """Queries observed and queries flagged for one account (or for all of them)."""

    queries: int = 0
    flagged: int = 0


@dataclass(frozen=True)
class Candidates:
    """The live stored queries that share a key with each query of a chunk.

    Attributes:
        postings: `[n, K, P]` int64: for each query and each of its keys, the numbers `seq` of
            the live stored queries with that key (in no order), `-1` where there are fewer.
        seqs: `[M]` int64, the distinct numbers in `postings`, ascending.
        payload: `[M, D]` uint8, their payloads (what the detector stored besides keys).
        describe: gives `(account, tag)` of the stored queries at positions of `seqs`.
    """

    postings: Tensor
    seqs: Tensor
    payload: Tensor
    describe: Callable[[Sequence[int]], list[tuple[str, str | None]]]


def check_bits(keys: Tensor) -> Tensor:
    """The 24 bits of each key that a posting entry keeps (`keys` int64 >= 0)."""
    return (keys >> _CHECK_SHIFT) & _CHECK_MASK


def pack_entries(seqs: Tensor, keys: Tensor) -> Tensor:
    """Posting entries: `seq << 24 | check_bits(key)` (int64 >= 0)."""
    return (seqs << CHECK_BITS) | check_bits(keys)


def unpack_entries(entries: Tensor, keys: Tensor) -> Tensor:
    """The query numbers of `entries: [..., P]` whose check bits match `keys: [...]`, else -1."""
    ok = (entries >= 0) & ((entries & _CHECK_MASK) == check_bits(keys).unsqueeze(-1))
    return torch.where(ok, entries >> CHECK_BITS, torch.full_like(entries, -1))


def bucket_count(capacity: int, keys: int, posting_cap: int) -> int:
    """Buckets for `capacity` queries of `keys` keys: the power of two >= 2 · entries / cap."""
    want = max(256, -(-2 * capacity * max(keys, 1) // posting_cap))
    return min(MAX_BUCKETS, 1 << (want - 1).bit_length())


class Store(ABC):
    """Where a detector keeps its stored queries; one interface for memory, SQLite and Redis.

    A detector calls `bind` once, then for each chunk of queries `lookup` (the candidates) and
    `add` (store them), inside `transaction()` so that another process sharing the store sees
    either none or all of a chunk's queries and cannot interleave between lookup and add.
    """

    spec: str
    """How the store was named: `"memory"`, `"sqlite:PATH"`, `"redis://HOST:PORT/DB"`."""

    @abstractmethod
    def bind(self, layout: Layout, key: bytes, *, explicit_key: bool) -> bytes:
        """Prepare the store for `layout`; return the secret key the detector must use.

        A shared store keeps the key of the first detector bound to it, and later detectors
        adopt it (every process of a deployment then computes the same fingerprints), unless
        `explicit_key` (the detector was given a seed): a different key is then an error.

        Raises:
            StoreMismatch: the store holds queries of another layout or key.
        """

    @abstractmethod
    def lookup(self, keys: Tensor, now: float) -> Candidates:
        """The live stored queries sharing a key with each row of `keys: [n, K]` (int64)."""

    @abstractmethod
    def add(
        self,
        keys: Tensor,
        payload: Tensor,
        account: str,
        tag: str | None,
        now: float,
    ) -> Tensor:
        """Store `n` queries of one account (keys `[n, K]`, payload `[n, D]` uint8) at time `now`.

        Returns:
            their numbers `seq`, `[n]` int64, consecutive: the query numbers count every query
            ever stored (the first is 0), across all processes sharing the store.
        """

    @abstractmethod
    def count(self, account: str, queries: int, flagged: int) -> None:
        """Add to an account's counts of queries and flagged queries."""

    @abstractmethod
    def counts(self) -> dict[str, AccountCounts]:
        """Every account's counts."""

    @abstractmethod
    def live(self, now: float) -> int:
        """How many stored queries are live at time `now`."""

    @abstractmethod
    def clear(self) -> None:
        """Forget every stored query and count (the key and layout stay)."""

    def close(self) -> None:  # noqa: B027  (nothing to close by default)
        """Release connections and files."""

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A block in which no other process sharing the store writes (default: nothing)."""
        yield

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


def check_layout(found: str | None, layout: Layout, spec: str) -> None:
    """Refuse a store holding queries of another layout (`found`: its JSON, or `None` if new)."""
    if found is None or found == layout.to_json():
        return
    raise StoreMismatch(
        f"The store {spec!r} holds queries of another detector layout ({found}); this detector "
        f"has {layout.to_json()}. Use another store (a new path, database or prefix) for it, or "
        "clear that store."
    )


def check_key(found: bytes | None, key: bytes, explicit: bool, spec: str) -> bytes:
    """The key to use: the store's (if any) unless the detector's was given explicitly."""
    if found is None or found == key:
        return key
    if explicit:
        raise StoreMismatch(
            f"The store {spec!r} was written with another secret key than this detector's seed "
            "gives; its fingerprints cannot be compared. Use another store, or no seed (the "
            "detector then adopts the store's key)."
        )
    return found
