"""Where a detector keeps its stored queries, by name: [open_store][randfeat.detect.stores.open_store].

| spec | store | shared by |
| --- | --- | --- |
| `memory` | [MemoryStore][randfeat.detect.stores.memory.MemoryStore] (default) | one process |
| `sqlite:PATH` | [SQLiteStore][randfeat.detect.stores.sqlite.SQLiteStore] (WAL mode) | the processes of one machine |
| `redis://HOST:PORT/DB` | [RedisStore][randfeat.detect.stores.redis.RedisStore] (Redis >= 7; `pip install redis`) | several machines |

Every store has the same layout (see [randfeat.detect.stores.base][]): a ring of the last
`capacity` queries and an index with posting lists capped at `posting_cap` entries.
"""

from __future__ import annotations

from randfeat.checks import closest_names, expected
from randfeat.detect.stores.base import AccountCounts as AccountCounts
from randfeat.detect.stores.base import Candidates as Candidates
from randfeat.detect.stores.base import Layout as Layout
from randfeat.detect.stores.base import Store as Store
from randfeat.detect.stores.base import StoreMismatch as StoreMismatch
from randfeat.detect.stores.memory import MemoryStore as MemoryStore

__all__ = [
    "SCHEMES",
    "AccountCounts",
    "Candidates",
    "Layout",
    "MemoryStore",
    "Store",
    "StoreMismatch",
    "open_store",
]

SCHEMES = ("memory", "sqlite:PATH", "redis://HOST:PORT/DB")
"""The store specs `open_store` accepts."""


def open_store(spec: str | Store) -> Store:
    """The store that `spec` names, opened (and, for Redis, reached) now.

    Args:
        spec: `"memory"`, `"sqlite:PATH"` (a file; created if missing), `"redis://HOST:PORT/DB"`,
            or a [Store][randfeat.detect.stores.base.Store], returned as it is.

    Raises:
        TypeError: `spec` is neither a string nor a store.
        ValueError: an unknown scheme (the message lists the allowed ones), an empty path, or
            a malformed Redis URL.
        ImportError: a Redis URL without the `redis` client installed.
        ConnectionError: the Redis server does not answer (the message names the URL and the fix).
        OSError: the SQLite file cannot be opened or created.
    """
    if isinstance(spec, Store):
        return spec
    allowed = ", ".join(repr(s) for s in SCHEMES)
    what = f"a store spec: one of {allowed}"
    if not isinstance(spec, str):
        raise TypeError(expected("store", what, spec))
    if spec == "memory":
        return MemoryStore()
    if spec.startswith("sqlite:"):
        path = spec.removeprefix("sqlite:")
        if path.startswith("//"):  # sqlite:///abs/path, as in SQLAlchemy URLs
            path = path[2:]
        if not path:
            raise ValueError(
                expected("store", what, spec, "Name the file: 'sqlite:/var/lib/app/detect.db'.")
            )
        from randfeat.detect.stores.sqlite import SQLiteStore

        return SQLiteStore(path)
    if spec.startswith("redis://"):
        from randfeat.detect.stores.redis import RedisStore

        return RedisStore(spec)
    scheme = spec.split(":", 1)[0]
    close = closest_names(scheme, ["memory", "sqlite", "redis"], n=1)
    hint = f"Did you mean {close[0]!r}?" if close else ""
    raise ValueError(expected("store", what, spec, hint))
