"""Per-key query accounting: how many images each client key has had answered, and a limit.

A query-based attack needs hundreds to thousands of queries per image, so a per-key quota is the
simplest real lever a service owner has. The ledger is an SQLite table, so that every worker
process of one server charges the **same** counts (one file, `BEGIN`-free atomic upserts) and, with
a file on disk, counts survive a restart; `path=None` keeps them in memory (one process).

One query is one image answered. A request is charged before its forward (so concurrent requests
cannot overrun the limit together) and refunded if the model fails: a client that retries after a
server error is not charged twice.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from randfeat.checks import check_optional, check_positive_int

__all__ = ["ANONYMOUS", "Charge", "KeyUsage", "UsageLedger"]

ANONYMOUS = "-"
"""The key under which requests without an `X-API-Key` header are counted."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key TEXT PRIMARY KEY,
    queries INTEGER NOT NULL,
    requests INTEGER NOT NULL
)
"""


@dataclass(frozen=True)
class Charge:
    """The outcome of [UsageLedger.charge][randfeat.serve.usage.UsageLedger.charge].

    Attributes:
        allowed: whether the queries were charged (and may be answered).
        used: the key's queries after this charge (before it, when refused).
        limit: the per-key limit, `None` for none.
    """

    allowed: bool
    used: int
    limit: int | None


@dataclass(frozen=True)
class KeyUsage:
    """One key's counts: images answered (`queries`) and requests."""

    queries: int
    requests: int


class UsageLedger:
    """Query counts per client key, shared by every process that opens the same file.

    Args:
        path: an SQLite file (created if missing; every worker of one server opens the same one),
            or `None` for counts in this process's memory.
        limit: the most queries (images) a key may have answered, `None` for no limit.

    Examples:
        >>> ledger = UsageLedger(limit=3)
        >>> ledger.charge("alice", 2).allowed, ledger.charge("alice", 2).allowed
        (True, False)
        >>> ledger.usage()["alice"]
        KeyUsage(queries=2, requests=1)
    """

    def __init__(self, path: str | Path | None = None, *, limit: int | None = None) -> None:
        self.limit = check_optional(check_positive_int, limit, "limit")
        self.path = None if path is None else Path(path)
        # one connection shared by the threads of this process, serialised by a lock; autocommit,
        # so each statement is its own transaction (atomic across processes)
        self._db = sqlite3.connect(
            ":memory:" if path is None else str(path),
            timeout=30.0,
            isolation_level=None,
            check_same_thread=False,
        )
        self._lock = threading.Lock()
        with self._lock:
            if path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)

    def charge(self, key: str, n: int) -> Charge:
        """Charge `n` queries to `key` if that keeps it within the limit (atomically)."""
        cap = self.limit
        with self._lock:
            if cap is None or n <= cap:
                cur = self._db.execute(
                    "INSERT INTO usage(key, queries, requests) VALUES (?, ?, 1) "
                    "ON CONFLICT(key) DO UPDATE SET queries = queries + excluded.queries, "
                    "requests = requests + 1 WHERE ? IS NULL OR queries + excluded.queries <= ?",
                    (key, n, cap, cap),
                )
                charged = cur.rowcount == 1
            else:
                charged = False
            row = self._db.execute("SELECT queries FROM usage WHERE key = ?", (key,)).fetchone()
        return Charge(charged, 0 if row is None else int(row[0]), cap)

    def refund(self, key: str, n: int) -> None:
        """Give back `n` queries (and the request) charged to `key` that were not answered."""
        with self._lock:
            self._db.execute(
                "UPDATE usage SET queries = max(0, queries - ?), requests = max(0, requests - 1) "
                "WHERE key = ?",
                (n, key),
            )

    def usage(self) -> dict[str, KeyUsage]:
        """Every key's counts, sorted by key."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, queries, requests FROM usage ORDER BY key"
            ).fetchall()
        return {str(k): KeyUsage(int(q), int(r)) for k, q, r in rows}

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()
