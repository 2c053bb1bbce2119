"""Query detection in front of the model: the [Guard][randfeat.serve.guard.Guard] of a server.

With `randfeat serve --detect`, every row of every request goes through a stateful detector of
[randfeat.detect][] (fingerprinted, compared with every earlier query of every key, stored)
before the model answers. The guard runs in the micro-batcher's inference thread, on the merged
batch: the rows of one key's requests are observed in one call, in arrival order, so a batch of
requests costs one detector call per key instead of one per request, and the detector is only
ever used by one thread. What a flagged row changes is
[DetectOptions][randfeat.serve.config.DetectOptions]'s `on_detect`:

| `on_detect` | a request with a flagged row | later requests of that key |
| --- | --- | --- |
| `reject` | 403 `query_flagged`, refused whole, rows listed | checked as usual |
| `ban` | the same | 403 `key_banned` once the key has `ban_after` flagged queries |
| `log` | answered as usual; counted and logged | answered as usual |

**A request of several images is refused whole** when one row is flagged, with the indices of
the flagged rows; every row is recorded (stored and counted) all the same. A partial answer
would let an attacker pad each request with many probes and be refused only the flagged ones:
detection would then cost it nothing but those rows, and the answered rows would be exactly the
probes that evade it. The indices tell no more than sending the rows one per request would,
and let an honest client find the duplicate in its batch.

**Fails closed.** When the detector raises (its SQLite or Redis store is unreachable), no row
of the batch is answered unchecked: every request of it gets 503 `detector_unavailable` with
`Retry-After`, and the server leaves the store alone for `retry_after_s` seconds, then tries it
again with the next batch, so it recovers by itself when the store is back. `fail_open`
answers unchecked instead, and logs it.

The detector's accounts are 64-bit hashes of the client keys
([account_of][randfeat.serve.guard.account_of]): its store, possibly a Redis server shared with
other services, never holds a key.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from randfeat.checks import check_float, closest_names, expected
from randfeat.detect import DETECTORS, AccountCounts, Detector
from randfeat.detect.stores import SCHEMES
from randfeat.serve.config import DetectOptions
from randfeat.serve.protocol import (
    DETECTOR_UNAVAILABLE,
    KEY_BANNED,
    QUERY_FLAGGED,
    RETRY_AFTER_HEADER,
)
from randfeat.serve.usage import ANONYMOUS

__all__ = ["Decision", "DetectorSpec", "Guard", "account_of", "check_store_spec", "refusal"]

logger = logging.getLogger("randfeat.serve")


def account_of(key: str | None) -> str:
    """The detector's account for a client key: `"-"` without one, else a 64-bit hash of it."""
    if key is None:
        return ANONYMOUS
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


def check_store_spec(store: object) -> str:
    """A store spec of a known scheme (`memory`, `sqlite:PATH`, `redis://HOST:PORT/DB`), checked
    without opening it.

    Raises:
        TypeError: not a string.
        ValueError: another scheme (with the closest one), or no path / host.
    """
    allowed = ", ".join(repr(s) for s in SCHEMES)
    if not isinstance(store, str):
        raise TypeError(expected("store", f"a store spec: one of {allowed}", store))
    if store == "memory":
        return store
    for scheme in ("sqlite:", "redis://"):
        if store.startswith(scheme):
            if not store.removeprefix(scheme).strip("/"):
                raise ValueError(expected("store", f"a store spec: one of {allowed}", store))
            return store
    close = closest_names(store.split(":", 1)[0], ["memory", "sqlite", "redis"], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(expected("store", f"a store spec: one of {allowed}", store) + hint)


@dataclass(frozen=True)
class DetectorSpec:
    """How to build the same detector in every worker process of a server.

    Every worker builds `DETECTORS[name](store=store, threshold=threshold, **settings)`. On a
    shared store (`sqlite:PATH`, `redis://...`) the first detector bound to it leaves its
    secret key there and every later one adopts it, so all workers fingerprint alike: a query
    seen by one is matched by another. The threshold is the one calibrated at start-up.

    Attributes:
        name: a key of [DETECTORS][randfeat.detect.DETECTORS].
        store: `"memory"` (one process), `"sqlite:PATH"` or `"redis://HOST:PORT/DB"`.
        threshold: flag above this score; `None` for the detector's default.
        settings: further keyword arguments of the detector (`capacity`, `ttl`, ...).

    Raises:
        ValueError: an unknown detector name (with the closest ones) or store scheme.
    """

    name: str
    store: str = "memory"
    threshold: float | None = None
    settings: tuple[tuple[str, object], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.name not in DETECTORS:
            close = closest_names(str(self.name), list(DETECTORS), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                expected("detector", f"one of {', '.join(map(repr, DETECTORS))}", self.name) + hint
            )
        check_store_spec(self.store)
        if self.threshold is not None:
            check_float(self.threshold, "threshold")

    def build(self, shape: tuple[int, int, int] | None = None) -> Detector:
        """The detector, its store opened (and bound to `shape` when given).

        Raises:
            ConnectionError: a Redis store that does not answer.
            OSError: an SQLite file that cannot be opened.
            StoreMismatch: the store holds queries of another detector or shape.
        """
        cls = DETECTORS[self.name]
        kwargs = dict(self.settings)
        return cls(store=self.store, threshold=self.threshold, shape=shape, **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Decision:
    """What the guard decided for one request.

    Attributes:
        answer: whether the model answers it.
        code: why not (`query_flagged`, `key_banned`, `detector_unavailable`), `None` if it does.
        rows: the indices of its flagged rows (0-based, in the request).
        checked: `False` when it is answered without a check (`fail_open`, store down).
    """

    answer: bool
    code: str | None = None
    rows: tuple[int, ...] = ()
    checked: bool = True


class Guard:
    """The detector and the policy of one server process (see the module docstring).

    Args:
        detector: a [Detector][randfeat.detect.Detector], its threshold set (calibrated).
        options: what a flagged query gets; the defaults when `None`.
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        detector: Detector,
        options: DetectOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(detector, Detector):
            raise TypeError(expected("detector", "a randfeat.detect Detector", detector))
        self.detector = detector
        self.options = options or DetectOptions()
        self._clock = clock
        self._lock = threading.Lock()  # the detector is used by one thread at a time
        self._banned: set[str] = set()  # bans seen by this process (a ban is never lifted)
        self._retry_at = 0.0  # while the store is down: when to try it again
        self._down = False

    @property
    def name(self) -> str:
        """The detector's name."""
        return self.detector.name

    def is_banned(self, account: str) -> bool:
        """Whether this process has seen `account` banned (a fast path: no store access)."""
        return self.options.on_detect == "ban" and account in self._banned

    def counts(self) -> dict[str, AccountCounts]:
        """Queries and flagged queries of every account, from the store.

        Raises:
            Exception: whatever the store raises when it cannot be reached.
        """
        with self._lock:
            return self.detector.accounts()

    def close(self) -> None:
        """Close the detector's store."""
        with self._lock:
            self.detector.close()

    def screen(self, xs: Sequence[Tensor], accounts: Sequence[str]) -> list[Decision]:
        """Observe the requests `xs` (images `[n_i, C, H, W]`) of `accounts`, in order.

        Returns:
            One [Decision][randfeat.serve.guard.Decision] per request.
        """
        decisions: list[Decision | None] = [None] * len(xs)
        with self._lock:
            if self._clock() < self._retry_at:  # the store failed a moment ago: leave it be
                return [self._unavailable()] * len(xs)
            try:
                self._screen(xs, accounts, decisions)
            except Exception as err:  # the store (or the detector) failed: fail closed
                self._retry_at = self._clock() + self.options.retry_after_s
                if not self._down:
                    self._down = True
                    how = "answering unchecked" if self.options.fail_open else "refusing (503)"
                    logger.error(
                        "query detector unavailable (%s: %s); %s until it is back",
                        type(err).__name__,
                        err,
                        how,
                        exc_info=logger.isEnabledFor(logging.DEBUG),
                    )
                return [d if d is not None else self._unavailable() for d in decisions]
            if self._down:
                self._down = False
                logger.warning("query detector available again")
        return [d if d is not None else Decision(True) for d in decisions]

    def _unavailable(self) -> Decision:
        if self.options.fail_open:
            return Decision(True, checked=False)
        return Decision(False, DETECTOR_UNAVAILABLE)

    def _screen(
        self, xs: Sequence[Tensor], accounts: Sequence[str], out: list[Decision | None]
    ) -> None:
        """Fill `out` account by account (an exception leaves the rest `None`)."""
        opts = self.options
        groups: dict[str, list[int]] = {}
        for i, account in enumerate(accounts):
            groups.setdefault(account, []).append(i)
        before = self.detector.accounts() if opts.on_detect == "ban" else {}
        for account, jobs in groups.items():
            flagged_before = before.get(account, AccountCounts()).flagged
            if opts.on_detect == "ban" and flagged_before >= opts.ban_after:
                self._banned.add(account)
                for i in jobs:
                    out[i] = Decision(False, KEY_BANNED)
                continue
            x = xs[jobs[0]] if len(jobs) == 1 else torch.cat([xs[i] for i in jobs])
            verdict = self.detector.observe(x, account)
            flags: list[bool] = verdict.flagged.tolist()  # one host sync per account
            total, start = 0, 0
            for i in jobs:
                n = xs[i].shape[0]
                hit = tuple(r for r in range(n) if flags[start + r])
                start += n
                total += len(hit)
                refuse = bool(hit) and opts.on_detect != "log"
                out[i] = Decision(not refuse, QUERY_FLAGGED if refuse else None, hit)
            if total and logger.isEnabledFor(logging.INFO):
                own = int(verdict.same_account[verdict.flagged].sum())
                logger.info(
                    "detector flagged %d of %d queries of %s (%d matched its own earlier "
                    "queries, %d another key's); %s",
                    total,
                    x.shape[0],
                    account,
                    own,
                    total - own,
                    "answered (log)" if opts.on_detect == "log" else "refused",
                )
            if opts.on_detect == "ban" and flagged_before + total >= opts.ban_after:
                self._banned.add(account)
                logger.warning("%s banned: %d queries flagged", account, flagged_before + total)


def refusal(
    decision: Decision, n: int, options: DetectOptions | None
) -> tuple[int, str, dict[str, object], dict[str, str]]:
    """The answer to a refused request of `n` images: status, message, detail and headers."""
    opts = options or DetectOptions()
    if decision.code == QUERY_FLAGGED:
        rows = list(decision.rows)
        return (
            403,
            f"The query detector flagged {len(rows)} of the {n} images of this request (rows "
            f"{rows}) as too close to earlier queries, the pattern of a query-based attack: the "
            "request is refused whole, and its images were recorded.",
            {"rows": rows},
            {},
        )
    if decision.code == KEY_BANNED:
        return (
            403,
            "This key is banned: too many of its queries were flagged by the query detector. "
            "Ask the service owner.",
            {},
            {},
        )
    wait = opts.retry_after_s
    return (
        503,
        f"The query detector cannot reach its store, and this server answers nothing unchecked. "
        f"Retry in {wait} s.",
        {"retry_after": wait},
        {RETRY_AFTER_HEADER: str(wait)},
    )
