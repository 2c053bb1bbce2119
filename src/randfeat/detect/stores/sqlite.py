"""`sqlite:PATH`: stored queries in one SQLite file that every process of a machine shares.

The file is in WAL mode (readers never block the writer); each chunk of queries is looked up and
stored inside one `BEGIN IMMEDIATE` transaction, so two processes never interleave between the
lookup and the store of a chunk, and every query is compared with every query stored before it,
whichever process stored it. Tables:

- `meta`: the layout (JSON), the secret key of the first detector bound to the file, and the
  next query number;
- `ring`: slot (`seq mod capacity`), `seq`, time, account, tag and payload of each stored query;
- `postings`: for each bucket (`key mod buckets`), its newest `posting_cap` entries as one blob
  (int64 little-endian, newest first);
- `accounts`: queries and flags per account.

The key is stored in the file: protect the file like the key (it is the same secret).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import struct
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from randfeat.detect.stores.base import (
    AccountCounts,
    Candidates,
    Layout,
    Store,
    check_key,
    check_layout,
    pack_entries,
    unpack_entries,
)

__all__ = ["SQLiteStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS ring (
    slot INTEGER PRIMARY KEY, seq INTEGER NOT NULL, time REAL NOT NULL,
    account TEXT NOT NULL, tag TEXT, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS postings (bucket INTEGER PRIMARY KEY, entries BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    account TEXT PRIMARY KEY, queries INTEGER NOT NULL, flagged INTEGER NOT NULL);
"""
_BATCH = 500  # parameters per IN (...) query


def _ints(blob: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(blob) // 8}q", blob))


def _blob(values: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(values)}q", *values)


class SQLiteStore(Store):
    """The `sqlite:PATH` store (see the module docstring).

    Args:
        path: the database file; created with its tables if missing.

    Raises:
        OSError: the file cannot be created or opened (the message names the path).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.spec = f"sqlite:{self.path}"
        self._lock = threading.RLock()
        self._layout: Layout | None = None
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        try:
            self._connection()
        except sqlite3.Error as err:
            raise OSError(
                f"Cannot open the SQLite store {str(self.path)!r}: {err}. Check that its folder "
                "exists and is writable."
            ) from err

    def _connection(self) -> sqlite3.Connection:
        """This process's connection (a forked child opens its own)."""
        if self._conn is None or self._pid != os.getpid():
            conn = sqlite3.connect(
                self.path, timeout=60, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            raise RuntimeError("The store is not bound to a detector yet.")
        return self._layout

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            conn = self._connection()
            if conn.in_transaction:  # nested: the outer block commits
                yield
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _meta(self, name: str) -> bytes | None:
        row = (
            self._connection().execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        )
        return None if row is None else bytes(row[0])

    def _set_meta(self, name: str, value: bytes) -> None:
        self._connection().execute(
            "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value)
        )

    def _next(self) -> int:
        raw = self._meta("next")
        return 0 if raw is None else int(raw.decode())

    def bind(self, layout: Layout, key: bytes, *, explicit_key: bool) -> bytes:
        with self.transaction():
            found = self._meta("layout")
            check_layout(None if found is None else found.decode(), layout, self.spec)
            used = check_key(self._meta("key"), key, explicit_key, self.spec)
            if found is None:
                self._set_meta("layout", layout.to_json().encode())
                self._set_meta("key", used)
                self._set_meta("next", b"0")
        self._layout = layout
        return used

    # ------------------------------------------------------------------ lookup
    def _postings(self, buckets: list[int]) -> dict[int, list[int]]:
        conn, out = self._connection(), {}
        for i in range(0, len(buckets), _BATCH):
            part = buckets[i : i + _BATCH]
            marks = ",".join("?" * len(part))
            for bucket, blob in conn.execute(
                f"SELECT bucket, entries FROM postings WHERE bucket IN ({marks})", part
            ):
                out[int(bucket)] = _ints(blob)
        return out

    def lookup(self, keys: Tensor, now: float) -> Candidates:
        lay = self.layout
        keys = keys.cpu()
        n, k, p = keys.shape[0], keys.shape[1], lay.posting_cap
        bucket = torch.where(keys >= 0, keys & (lay.buckets - 1), -1)
        wanted = sorted(set(bucket[bucket >= 0].tolist()))
        lists = self._postings(wanted)
        table = torch.full((len(wanted) + 1, p), -1, dtype=torch.long)  # last row: no bucket
        for i, b in enumerate(wanted):
            entries = lists.get(b, [])
            if entries:
                table[i, : len(entries)] = torch.tensor(entries, dtype=torch.long)
        index = torch.tensor(wanted, dtype=torch.long)
        pos = torch.searchsorted(index, bucket.clamp(min=0))
        pos = torch.where(bucket >= 0, pos, len(wanted))
        seqs = unpack_entries(table[pos], keys)  # [n, K, P]
        seqs = torch.where(seqs >= max(0, self._next() - lay.capacity), seqs, -1)
        # the ring rows of the candidates: still theirs (not overwritten) and not expired
        uniq = torch.unique(seqs[seqs >= 0]).tolist()
        rows: dict[int, tuple[float, str, str | None, bytes]] = {}
        conn = self._connection()
        for i in range(0, len(uniq), _BATCH):
            part = [s % lay.capacity for s in uniq[i : i + _BATCH]]
            marks = ",".join("?" * len(part))
            for seq, t, account, tag, payload in conn.execute(
                f"SELECT seq, time, account, tag, payload FROM ring WHERE slot IN ({marks})", part
            ):
                rows[int(seq)] = (float(t), str(account), tag, bytes(payload))
        alive = [s for s in uniq if s in rows and (lay.ttl is None or rows[s][0] >= now - lay.ttl)]
        live = torch.tensor(alive, dtype=torch.long)
        seqs = torch.where(torch.isin(seqs, live), seqs, -1) if n * k else seqs
        payload = torch.tensor([list(rows[s][3]) for s in alive], dtype=torch.uint8).reshape(
            len(alive), lay.payload
        )
        meta = [(rows[s][1], rows[s][2]) for s in alive]

        def describe(positions: Sequence[int]) -> list[tuple[str, str | None]]:
            return [meta[i] for i in positions]

        return Candidates(seqs, live, payload, describe)

    # ------------------------------------------------------------------ add
    def add(
        self, keys: Tensor, payload: Tensor, account: str, tag: str | None, now: float
    ) -> Tensor:
        lay = self.layout
        keys, payload = keys.cpu(), payload.cpu()
        n = keys.shape[0]
        with self.transaction():
            first = self._next()
            if first + n >= 2**39:
                raise OverflowError("The store numbered 2^39 queries; clear it.")
            seqs = torch.arange(first, first + n)
            keep = slice(max(0, n - lay.capacity), n)
            stored, keys, payload = seqs[keep], keys[keep], payload[keep]
            conn = self._connection()
            conn.executemany(
                "INSERT OR REPLACE INTO ring (slot, seq, time, account, tag, payload) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (s % lay.capacity, s, now, account, tag, bytes(row))
                    for s, row in zip(stored.tolist(), payload.tolist(), strict=True)
                ],
            )
            entries = pack_entries(stored.unsqueeze(1).expand_as(keys), keys)
            bucket = torch.where(keys >= 0, keys & (lay.buckets - 1), -1)
            new: dict[int, list[int]] = {}
            for b, e in zip(
                bucket.flip(0).reshape(-1).tolist(),
                entries.flip(0).reshape(-1).tolist(),
                strict=True,
            ):
                if b >= 0:
                    new.setdefault(b, []).append(e)  # newest first
            old = self._postings(sorted(new))
            conn.executemany(
                "INSERT OR REPLACE INTO postings (bucket, entries) VALUES (?, ?)",
                [(b, _blob((e + old.get(b, []))[: lay.posting_cap])) for b, e in new.items()],
            )
            self._set_meta("next", str(first + n).encode())
        return seqs

    # ------------------------------------------------------------------ counts and upkeep
    def count(self, account: str, queries: int, flagged: int) -> None:
        with self.transaction():
            self._connection().execute(
                "INSERT INTO accounts (account, queries, flagged) VALUES (?, ?, ?) "
                "ON CONFLICT(account) DO UPDATE SET queries = queries + excluded.queries, "
                "flagged = flagged + excluded.flagged",
                (account, queries, flagged),
            )

    def counts(self) -> dict[str, AccountCounts]:
        with self._lock:
            rows = self._connection().execute("SELECT account, queries, flagged FROM accounts")
            return {str(a): AccountCounts(int(q), int(f)) for a, q, f in rows}

    def live(self, now: float) -> int:
        lay = self.layout
        with self._lock:
            first = max(0, self._next() - lay.capacity)
            oldest = -1e300 if lay.ttl is None else now - lay.ttl
            (count,) = (
                self._connection()
                .execute("SELECT COUNT(*) FROM ring WHERE seq >= ? AND time >= ?", (first, oldest))
                .fetchone()
            )
        return int(count)

    def clear(self) -> None:
        with self.transaction():
            conn = self._connection()
            for table in ("ring", "postings", "accounts"):
                conn.execute(f"DELETE FROM {table}")
            self._set_meta("next", b"0")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None
