"""`redis://HOST:PORT/DB`: stored queries in a Redis (>= 7) database shared by several machines.

Keys, all under the prefix `randfeat:detect:` of the database the URL names:

- `meta` (hash): the layout (JSON) and the secret key of the first detector bound to it;
- `next` (string): the next query number, taken with `INCRBY` (atomic across clients);
- `r:<slot>` (string): a stored query (`seq`, time, account, tag, payload) in slot
  `seq mod capacity`; expires after `ttl` seconds when a `ttl` is set;
- `p:<bucket>` (list): the bucket's newest `posting_cap` entries (`LPUSH` then `LTRIM`); expires
  `ttl` seconds after its last push;
- `accounts` (hash): `q:<account>` and `f:<account>`, queries and flags (`HINCRBY`).

Memory is bounded by `capacity` ring keys and `buckets` lists of `posting_cap` entries. A chunk's
lookup and store are two round trips (pipelines), not one transaction: two clients storing
near-duplicates at the same instant may each miss the other's, and every query is compared with
every query stored before its lookup. The key is stored in the database: protect the database
like the key (it is the same secret). The `redis` client is imported when this store is opened.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

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

__all__ = ["PREFIX", "RedisStore"]

PREFIX = "randfeat:detect:"
"""The prefix of every key the store writes."""
_HEAD = struct.Struct("<qdHH")  # seq, time, len(account), len(tag) + 1 (0: no tag)
_MIN_VERSION = (7, 0)


def _pack_row(seq: int, t: float, account: str, tag: str | None, payload: bytes) -> bytes:
    a = account.encode()
    g = b"" if tag is None else tag.encode()
    return _HEAD.pack(seq, t, len(a), 0 if tag is None else len(g) + 1) + a + g + payload


def _unpack_row(raw: bytes) -> tuple[int, float, str, str | None, bytes]:
    seq, t, la, lg = _HEAD.unpack_from(raw)
    at = _HEAD.size
    account = raw[at : at + la].decode()
    at += la
    tag = None if lg == 0 else raw[at : at + lg - 1].decode()
    at += max(0, lg - 1)
    return seq, t, account, tag, raw[at:]


def _import_redis() -> Any:
    try:
        import redis
    except ImportError as err:
        raise ImportError(
            "The Redis store needs the `redis` client: `pip install redis` (or "
            "`pip install 'randfeat[detect]'`)."
        ) from err
    return redis


class RedisStore(Store):
    """The `redis://HOST:PORT/DB` store (see the module docstring).

    Args:
        url: `redis://HOST:PORT/DB` (a password as `redis://:PASSWORD@HOST:PORT/DB`).

    Raises:
        ValueError: a malformed URL.
        ImportError: the `redis` client is not installed.
        ConnectionError: no Redis server answers at the URL, or one older than 7.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            raise ValueError(
                f"Expected argument `store` to be a Redis URL 'redis://HOST:PORT/DB', but got "
                f"{url!r}."
            )
        try:
            parts.port  # noqa: B018  (raises on a port that is not a number)
            db = int(parts.path.strip("/") or 0)
        except ValueError as err:
            raise ValueError(
                f"Expected argument `store` to be a Redis URL 'redis://HOST:PORT/DB' with a "
                f"numeric port and database, but got {url!r}."
            ) from err
        redis = _import_redis()
        safe = url if parts.password is None else url.replace(parts.password, "***")
        self.spec = safe
        self._layout: Layout | None = None
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._client = redis.Redis(
            host=parts.hostname,
            port=parts.port or 6379,
            db=db,
            password=parts.password,
            socket_connect_timeout=5,
            socket_timeout=30,
            # one immediate retry (a pooled connection that died with a restarted server), no
            # back-off: an outage fails fast, and the caller decides (a server fails closed)
            retry=Retry(NoBackoff(), 1),
        )
        try:
            info = self._client.info("server")
        except redis.exceptions.RedisError as err:
            raise ConnectionError(
                f"Cannot reach the Redis store at {safe}: {str(err).rstrip('.')}. Start Redis there "
                f"(`redis-server --port {parts.port or 6379}`) or fix the URL."
            ) from err
        version = tuple(int(v) for v in str(info.get("redis_version", "0.0")).split(".")[:2])
        if version < _MIN_VERSION:
            raise ConnectionError(
                f"The Redis server at {safe} is version {info.get('redis_version')}; the store "
                "needs Redis >= 7. Upgrade it."
            )

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            raise RuntimeError("The store is not bound to a detector yet.")
        return self._layout

    def bind(self, layout: Layout, key: bytes, *, explicit_key: bool) -> bytes:
        meta = PREFIX + "meta"
        # the first detector writes layout and key at once; later ones read what it wrote
        self._client.hsetnx(meta, "layout", layout.to_json())
        self._client.hsetnx(meta, "key", key)
        found_layout, found_key = self._client.hmget(meta, ["layout", "key"])
        check_layout(found_layout.decode(), layout, self.spec)
        used = check_key(bytes(found_key), key, explicit_key, self.spec)
        self._layout = layout
        return used

    def _next(self) -> int:
        raw = self._client.get(PREFIX + "next")
        return 0 if raw is None else int(raw)

    def lookup(self, keys: Tensor, now: float) -> Candidates:
        lay = self.layout
        keys = keys.cpu()
        p = lay.posting_cap
        bucket = torch.where(keys >= 0, keys & (lay.buckets - 1), -1)
        wanted = sorted(set(bucket[bucket >= 0].tolist()))
        pipe = self._client.pipeline(transaction=False)
        pipe.get(PREFIX + "next")
        for b in wanted:
            pipe.lrange(f"{PREFIX}p:{b}", 0, p - 1)
        answers = pipe.execute()
        first_live = max(0, (0 if answers[0] is None else int(answers[0])) - lay.capacity)
        table = torch.full((len(wanted) + 1, p), -1, dtype=torch.long)
        for i, entries in enumerate(answers[1:]):
            if entries:
                values = [struct.unpack("<q", e)[0] for e in entries]
                table[i, : len(values)] = torch.tensor(values, dtype=torch.long)
        index = torch.tensor(wanted, dtype=torch.long)
        pos = torch.searchsorted(index, bucket.clamp(min=0))
        pos = torch.where(bucket >= 0, pos, len(wanted))
        seqs = unpack_entries(table[pos], keys)
        seqs = torch.where(seqs >= first_live, seqs, -1)
        uniq = torch.unique(seqs[seqs >= 0]).tolist()
        raws = self._client.mget([f"{PREFIX}r:{s % lay.capacity}" for s in uniq]) if uniq else []
        rows: dict[int, tuple[str, str | None, bytes]] = {}
        for s, raw in zip(uniq, raws, strict=True):
            if raw is None:
                continue
            seq, t, account, tag, data = _unpack_row(raw)
            if seq == s and (lay.ttl is None or t >= now - lay.ttl):
                rows[s] = (account, tag, data)
        alive = sorted(rows)
        live = torch.tensor(alive, dtype=torch.long)
        seqs = torch.where(torch.isin(seqs, live), seqs, -1)
        payload = torch.tensor([list(rows[s][2]) for s in alive], dtype=torch.uint8)
        payload = payload.reshape(len(alive), lay.payload)
        meta = [(rows[s][0], rows[s][1]) for s in alive]

        def describe(positions: Sequence[int]) -> list[tuple[str, str | None]]:
            return [meta[i] for i in positions]

        return Candidates(seqs, live, payload, describe)

    def add(
        self, keys: Tensor, payload: Tensor, account: str, tag: str | None, now: float
    ) -> Tensor:
        lay = self.layout
        keys, payload = keys.cpu(), payload.cpu()
        n = keys.shape[0]
        last = int(self._client.incrby(PREFIX + "next", n))
        first = last - n
        seqs = torch.arange(first, last)
        keep = slice(max(0, n - lay.capacity), n)
        stored, keys, payload = seqs[keep], keys[keep], payload[keep]
        ttl = None if lay.ttl is None else max(1, int(-(-lay.ttl // 1)))
        pipe = self._client.pipeline(transaction=False)
        for s, row in zip(stored.tolist(), payload.tolist(), strict=True):
            pipe.set(
                f"{PREFIX}r:{s % lay.capacity}", _pack_row(s, now, account, tag, bytes(row)), ex=ttl
            )
        entries = pack_entries(stored.unsqueeze(1).expand_as(keys), keys)
        bucket = torch.where(keys >= 0, keys & (lay.buckets - 1), -1)
        new: dict[int, list[bytes]] = {}
        for b, e in zip(bucket.reshape(-1).tolist(), entries.reshape(-1).tolist(), strict=True):
            if b >= 0:
                new.setdefault(b, []).append(struct.pack("<q", e))  # oldest first: LPUSH
        for b, es in new.items():
            name = f"{PREFIX}p:{b}"
            pipe.lpush(name, *es)
            pipe.ltrim(name, 0, lay.posting_cap - 1)
            if ttl is not None:
                pipe.expire(name, ttl)
        pipe.execute()
        return seqs

    def count(self, account: str, queries: int, flagged: int) -> None:
        pipe = self._client.pipeline(transaction=False)
        pipe.hincrby(PREFIX + "accounts", f"q:{account}", queries)
        pipe.hincrby(PREFIX + "accounts", f"f:{account}", flagged)
        pipe.execute()

    def counts(self) -> dict[str, AccountCounts]:
        raw = self._client.hgetall(PREFIX + "accounts")
        q: dict[str, int] = {}
        f: dict[str, int] = {}
        for field, value in raw.items():
            kind, account = field.decode().split(":", 1)
            (q if kind == "q" else f)[account] = int(value)
        return {a: AccountCounts(q.get(a, 0), f.get(a, 0)) for a in sorted(q.keys() | f.keys())}

    def live(self, now: float) -> int:
        lay = self.layout
        first = max(0, self._next() - lay.capacity)
        count = 0
        batch: list[bytes] = []
        for name in self._client.scan_iter(match=PREFIX + "r:*", count=1000):
            batch.append(name)
            if len(batch) >= 1000:
                count += self._count_live(batch, first, now)
                batch = []
        return count + (self._count_live(batch, first, now) if batch else 0)

    def _count_live(self, names: list[bytes], first: int, now: float) -> int:
        ttl = self.layout.ttl
        count = 0
        for raw in self._client.mget(names):
            if raw is not None:
                seq, t, *_ = _unpack_row(raw)
                count += seq >= first and (ttl is None or t >= now - ttl)
        return count

    def clear(self) -> None:
        names = [
            n
            for n in self._client.scan_iter(match=PREFIX + "*", count=1000)
            if n != (PREFIX + "meta").encode()
        ]
        for i in range(0, len(names), 1000):
            self._client.unlink(*names[i : i + 1000])

    def close(self) -> None:
        self._client.close()
