"""What every detector does: check the queries, fingerprint them, look up, score, store, count.

A detector subclass says how a query becomes `K` keys and a payload (its fingerprint), and how
similar a query is to the stored queries that share a key with it (its score); this base class
does the rest, the same way for every detector and every store:

1. check the batch, the account and the tag before any work;
2. fingerprint every row (vectorized, on the batch's device);
3. in chunks of rows: look the chunk's keys up in the store, score each row against the live
   stored queries it shares a key with *and against the earlier rows of its chunk* (an attacker
   may send all its probes in one batch), then store the chunk: so every row is compared with
   every query observed before it, as if the rows had come one at a time;
4. flag the rows whose score exceeds the threshold, and count queries and flags per account.

Calibration (`calibrate`) replays benign images through a private in-memory store and sets the
threshold at the $(1 - \\text{fpr})$ quantile of their scores.
"""

from __future__ import annotations

import copy
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar, TypedDict

import torch
from torch import Tensor

from randfeat.checks import (
    check_float,
    check_int,
    check_optional,
    check_positive_float,
    check_positive_int,
    check_probability,
    expected,
)
from randfeat.detect.hashing import make_key
from randfeat.detect.inputs import check_images, check_name, check_shape, refuse
from randfeat.detect.stores import open_store
from randfeat.detect.stores.base import AccountCounts, Candidates, Layout, Store, bucket_count
from randfeat.detect.stores.memory import MemoryStore
from randfeat.detect.verdict import Verdict

__all__ = ["Detector", "DetectorOptions"]


class DetectorOptions(TypedDict, total=False):
    """The keyword arguments every detector takes (see [Detector][randfeat.detect.base.Detector])."""

    threshold: float | None
    store: str | Store
    capacity: int
    ttl: float | None
    posting_cap: int | None
    seed: int | None
    shape: Sequence[int] | None
    clock: Callable[[], float]


class Detector(ABC):
    """Stateful detection of query-based attacks: flag a query close to an earlier one.

    Subclasses set `name`, `default_threshold`, and implement `_settings`, `_prepare`,
    `_fingerprint`, `_score_store` and `_score_within`.

    Args:
        threshold: flag a query when its score exceeds this (`None`: the detector's default;
            `calibrate` sets it from benign traffic).
        store: where stored queries live: `"memory"` (default), `"sqlite:PATH"`,
            `"redis://HOST:PORT/DB"`, or a [Store][randfeat.detect.stores.base.Store].
        capacity: most queries stored; the oldest is evicted first.
        ttl: seconds a stored query is kept (`None`: until evicted by `capacity`).
        posting_cap: most stored queries per key kept in the index (the newest), which bounds
            the cost of a lookup to `K · posting_cap` entries (`None`: the detector's default,
            8 for `pooled-linf`, 16 for `blacklight`).
        seed: `None` (default) draws the secret key from OS entropy; an int gives a fixed key
            (tests, reproducible benchmarks). A shared store keeps the first key it sees and
            later detectors without a seed adopt it.
        shape: the image shape `[C, H, W]`, to bind the store now (a server does, to fail at
            start-up on a store of another layout); else bound by the first batch.
        clock: the time in seconds (default `time.time`); tests pass a fake clock for `ttl`.

    A detector is used by one thread at a time (a server holds a lock around `observe`); the
    SQLite and Redis stores are shared by processes, each with its own detector.
    """

    name: ClassVar[str]
    default_threshold: ClassVar[float]
    default_posting_cap: ClassVar[int] = 16

    def __init__(
        self,
        *,
        threshold: float | None = None,
        store: str | Store = "memory",
        capacity: int = 1_000_000,
        ttl: float | None = None,
        posting_cap: int | None = None,
        seed: int | None = None,
        shape: Sequence[int] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._threshold = (
            self.default_threshold if threshold is None else check_float(threshold, "threshold")
        )
        self.capacity = check_int(capacity, "capacity", low=1, high=2**38)
        self.ttl = check_optional(check_positive_float, ttl, "ttl")
        cap = self.default_posting_cap if posting_cap is None else posting_cap
        self.posting_cap = check_int(cap, "posting_cap", low=1, high=4096)
        if not callable(clock):
            raise TypeError(expected("clock", "a callable returning seconds", clock))
        self._clock = clock
        self._explicit_key = seed is not None
        self._key = make_key(seed)
        self._store = open_store(store)
        self._shape: tuple[int, int, int] | None = None
        if shape is not None:
            self._bind(check_shape(shape))

    # ------------------------------------------------------------------ what a subclass says
    @abstractmethod
    def _settings(self) -> dict[str, object]:
        """The fingerprint's settings, for `repr` and the store's layout (no secrets)."""

    @abstractmethod
    def _keys_per_query(self, shape: tuple[int, int, int]) -> int:
        """`K` for images of `shape`."""

    @abstractmethod
    def _payload_bytes(self, shape: tuple[int, int, int]) -> int:
        """`D`, the payload bytes per query for images of `shape`."""

    @abstractmethod
    def _prepare(self, shape: tuple[int, int, int], key: bytes) -> None:
        """Derive the secret tensors (salts, coefficients, projections) from the key."""

    @abstractmethod
    def _fingerprint(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys `[N, K]` (int64 >= 0, `-1` unused) and payload `[N, D]` (uint8) of `x`."""

    @abstractmethod
    def _score_store(
        self, keys: Tensor, payload: Tensor, found: Candidates
    ) -> tuple[Tensor, Tensor]:
        """Per row: the best score against the candidates, and that candidate's position in
        `found.seqs` (`-1` when none); float32 `[n]`, int64 `[n]`."""

    @abstractmethod
    def _score_within(self, keys: Tensor, payload: Tensor) -> tuple[Tensor, Tensor]:
        """Per row: the best score against the *earlier* rows of the chunk, and that row
        (`-1` when none); float32 `[n]`, int64 `[n]`."""

    def _chunk_rows(self) -> int:
        """Rows per chunk (the within-chunk comparison is quadratic in it)."""
        return 256

    # ------------------------------------------------------------------ public API
    @property
    def threshold(self) -> float:
        """Flag a query when its score is above this."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = check_float(value, "threshold")

    @property
    def store(self) -> Store:
        """The store (read-only use: `counts`, `live`; the detector writes it)."""
        return self._store

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._settings().items())
        ttl = "" if self.ttl is None else f", ttl={self.ttl:g}"
        return (
            f"{type(self).__name__}({fields}, threshold={self._threshold:g}, "
            f"capacity={self.capacity}{ttl}, posting_cap={self.posting_cap}, "
            f"store={self._store.spec!r})"
        )

    def observe(self, x: Tensor, account: str = "default", *, tag: str | None = None) -> Verdict:
        """Check each row of `x` against every earlier query, then store it.

        Args:
            x: `[N, C, H, W]` images in $[0, 1]$ (any float dtype, any device).
            account: who sent them (an API key, a user); one index serves every account, and
                queries and flags are counted per account.
            tag: stored with the rows and reported back when a later query matches one of
                them (e.g. `"benign"`).

        Returns:
            A [Verdict][randfeat.detect.verdict.Verdict] (tensors on `x`'s device).

        Raises:
            TypeError: `x` is not a float tensor, or `account` / `tag` not strings.
            ValueError: `x` is not `[N, C, H, W]` in $[0, 1]$ with `N >= 1` and finite values;
                `account` is empty; the images have another shape than the store's.
        """
        x = check_images(x)
        name = check_name(account, "account")
        tag = None if tag is None else check_name(tag, "tag", optional=True)
        self._bind(self._check_shape_of(x))
        keys, payload = self._fingerprint(x)
        return self._record(keys, payload, name, tag, self._store)

    def fingerprint(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The keys `[N, K]` (int64, `-1` unused) and payload `[N, D]` (uint8) of `x`, as
        `observe` would store them (nothing is stored).

        Raises:
            TypeError, ValueError: bad images, as for `observe`.
        """
        x = check_images(x)
        self._bind(self._check_shape_of(x))
        return self._fingerprint(x)

    def calibrate(
        self, benign: Tensor | Iterable[Tensor], target_fpr: float = 1e-3, *, batch_size: int = 512
    ) -> float:
        """Set the threshold so that about `target_fpr` of benign queries would be flagged.

        Rule: every benign image is scored against all the *other* benign images (replayed in
        order and in reverse through a private in-memory store with this detector's key and
        settings, keeping each image's larger score); the threshold is the
        $\\lfloor \\text{fpr} \\cdot n \\rfloor + 1$-th largest score, so that at most
        `target_fpr` of these images score above it. It holds for a store of about `n` benign
        queries: a store that holds more (a larger `capacity` and `ttl`) finds closer
        neighbours and flags more. With `n` images only about `fpr · n` scores lie above the
        threshold: `n >= 1 / target_fpr` is required, and `n >= 10 / target_fpr` (10,000
        images for 0.1%) gives a threshold whose false-positive rate is within about a third
        of the target (the relative standard error of a count of 10).

        Args:
            benign: `[n, C, H, W]` images in $[0, 1]$, or an iterable of such batches (or of
                `(x, y)` pairs), in the order the traffic would come.
            target_fpr: the fraction of benign queries to flag, in `(0, 0.5]`.
            batch_size: images fingerprinted at once.

        Returns:
            The threshold, also set on the detector.

        Raises:
            ValueError: fewer than `1 / target_fpr` images, or bad images (as for `observe`).
        """
        fpr = check_probability(target_fpr, "target_fpr")
        if fpr > 0.5:
            raise ValueError(expected("target_fpr", "a fraction in (0, 0.5]", target_fpr))
        check_positive_int(batch_size, "batch_size")
        batches = [benign] if isinstance(benign, Tensor) else list(benign)
        xs: list[Tensor] = []  # every batch checked before any work
        for i, b in enumerate(batches):
            xb = b[0] if isinstance(b, (tuple, list)) and b else b
            xb = check_images(xb, "benign" if isinstance(benign, Tensor) else f"benign[{i}]")
            if xs and xb.shape[1:] != xs[0].shape[1:]:
                raise ValueError(
                    refuse(f"benign[{i}]", "images of one shape", f"shape {list(xb.shape[1:])}")
                )
            xs.append(xb)
        n = sum(xb.shape[0] for xb in xs)
        need = math.ceil(1 / fpr - 1e-9)
        if n < need:
            raise ValueError(
                refuse(
                    "benign",
                    f"at least 1 / target_fpr = {need} images",
                    f"{n} images",
                    f"Pass more benign images (>= {math.ceil(10 / fpr - 1e-9)} for a stable "
                    "threshold) or a larger target_fpr.",
                )
            )
        self._bind(self._check_shape_of(xs[0], "benign"))
        keys, payloads = [], []
        for xb in xs:
            for start in range(0, xb.shape[0], batch_size):
                k, p = self._fingerprint(xb[start : start + batch_size])
                keys.append(k)
                payloads.append(p)
        all_keys, all_payload = torch.cat(keys), torch.cat(payloads)
        scores = []
        for flip in (False, True):
            twin = self._private_twin(n)
            k, p = (all_keys.flip(0), all_payload.flip(0)) if flip else (all_keys, all_payload)
            s = twin._record(k, p, "calibration", None, twin._store).score
            scores.append(s.flip(0) if flip else s)
        score = torch.maximum(scores[0], scores[1]).float()
        m = math.floor(fpr * n + 1e-9)
        threshold = float(torch.sort(score, descending=True).values[m])
        self.threshold = threshold
        return threshold

    def counts(self, account: str | None = None) -> AccountCounts:
        """Queries observed and flagged for `account`, or for all accounts (`None`)."""
        every = self._store.counts()
        if account is not None:
            return every.get(account, AccountCounts())
        return AccountCounts(
            sum(c.queries for c in every.values()), sum(c.flagged for c in every.values())
        )

    def accounts(self) -> dict[str, AccountCounts]:
        """Every account's counts."""
        return self._store.counts()

    def stored(self) -> int:
        """How many stored queries are live now (within `capacity` and `ttl`)."""
        return self._store.live(self._clock()) if self._shape is not None else 0

    def clear(self) -> None:
        """Forget every stored query and count (the key, threshold and settings stay)."""
        self._store.clear()

    def close(self) -> None:
        """Close the store's connections."""
        self._store.close()

    # ------------------------------------------------------------------ internals
    def _check_shape_of(self, x: Tensor, name: str = "x") -> tuple[int, int, int]:
        shape = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
        if self._shape is not None and shape != self._shape:
            raise ValueError(
                refuse(
                    name,
                    f"images of shape {list(self._shape)} (the shape this detector's store holds)",
                    f"images of shape {list(shape)}",
                    "Use one detector (and store) per input shape.",
                )
            )
        return shape

    def layout(self, shape: tuple[int, int, int]) -> Layout:
        """What this detector stores for images of `shape`."""
        k = self._keys_per_query(shape)
        settings = ", ".join(f"{a}={b!r}" for a, b in self._settings().items())
        return Layout(
            detector=f"{self.name}({settings})",
            shape=shape,
            keys=k,
            payload=self._payload_bytes(shape),
            posting_cap=self.posting_cap,
            capacity=self.capacity,
            ttl=self.ttl,
            buckets=bucket_count(self.capacity, k, self.posting_cap),
        )

    def _bind(self, shape: tuple[int, int, int]) -> None:
        if self._shape is not None:
            return
        key = self._store.bind(self.layout(shape), self._key, explicit_key=self._explicit_key)
        self._key = key
        self._prepare(shape, key)
        self._shape = shape

    def _private_twin(self, n: int) -> Detector:
        """This detector (same key, settings, prepared tensors) on a fresh memory store."""
        if self._shape is None:
            raise RuntimeError(
                "The detector has no image shape yet: observe or calibrate a batch first."
            )
        twin = copy.copy(self)
        twin.capacity, twin.ttl = max(n, 1), None
        twin._store = MemoryStore()
        twin._store.bind(twin.layout(self._shape), self._key, explicit_key=True)
        return twin

    def _record(
        self, keys: Tensor, payload: Tensor, account: str, tag: str | None, store: Store
    ) -> Verdict:
        """Steps 3-4 of the module docstring, for fingerprints already computed."""
        n, dev = keys.shape[0], keys.device
        score = torch.zeros(n, dtype=torch.float32, device=dev)
        match = torch.full((n,), -1, dtype=torch.long, device=dev)
        ids = torch.empty(n, dtype=torch.long, device=dev)
        same = [False] * n
        match_account: list[str | None] = [None] * n
        match_tag: list[str | None] = [None] * n
        rows = self._chunk_rows()
        now = float(self._clock())
        with store.transaction():
            for start in range(0, n, rows):
                k, p = keys[start : start + rows], payload[start : start + rows]
                found = store.lookup(k, now)
                s_store, pos = self._score_store(k, p, found)
                s_within, row = self._score_within(k, p)
                seqs = store.add(k, p, account, tag, now).to(dev)
                within = (row >= 0) & (s_within >= s_store)
                chunk = slice(start, start + k.shape[0])
                ids[chunk] = seqs
                score[chunk] = torch.where(within, s_within, s_store)
                from_store = (~within) & (pos >= 0)
                stored = torch.cat([found.seqs.to(dev), seqs.new_full((1,), -1)])  # [-1]: none
                match[chunk] = torch.where(
                    within, seqs[row.clamp(min=0)], stored[torch.where(from_store, pos, -1)]
                )
                rows_store = from_store.nonzero().squeeze(1).tolist()
                described = found.describe(pos[rows_store].tolist()) if rows_store else []
                for r, (acc, tg) in zip(rows_store, described, strict=True):
                    match_account[start + r] = acc
                    match_tag[start + r] = tg
                    same[start + r] = acc == account
                for r in within.nonzero().squeeze(1).tolist():
                    match_account[start + r] = account
                    match_tag[start + r] = tag
                    same[start + r] = True
            flagged = score > self._threshold
            store.count(account, n, int(flagged.sum()))
        return Verdict(
            flagged=flagged,
            score=score,
            threshold=self._threshold,
            ids=ids,
            match=match,
            same_account=torch.tensor(same, dtype=torch.bool, device=dev),
            match_account=tuple(match_account),
            match_tag=tuple(match_tag),
            account=account,
        )
