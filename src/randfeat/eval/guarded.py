"""Query detection in front of a model, in process: [Guarded][randfeat.eval.guarded.Guarded].

`Guarded(model, detector, on_detect=...)` is a model (a callable from images to scores) that
shows every row of every call to a stateful detector of [randfeat.detect][] before the model
answers, with the semantics of a detecting server (`randfeat serve --detect`,
[Guard][randfeat.serve.guard.Guard]), so that an evaluation in one process measures what an
attacker of the server would meet:

| `on_detect` | a call with a flagged row | later calls |
| --- | --- | --- |
| `reject` | refused whole ([QueryFlagged][randfeat.eval.guarded.QueryFlagged]), rows listed | checked as usual |
| `ban` | the same | [KeyBanned][randfeat.eval.guarded.KeyBanned] once the account has `ban_after` flagged rows |
| `log` | answered; counted | answered |

Every row of a call is observed (fingerprinted, compared with every earlier query, stored) and
counted, also when the call is refused; a call refused by a ban is not observed (the server
answers 403 `key_banned` before its detector sees the request). Both errors are
[QueryRefused][randfeat.eval.errors.QueryRefused]: the [Oracle][randfeat.eval.oracle.Oracle]
charges the refused rows to their samples and lets the error end the attack's call.

A flag caused by a stored benign image (a RayS start of pure 0/1 pixels matches dark
backgrounds) is told apart from a flag caused by the attack's own earlier queries: benign
traffic is observed under its own account and tag (`preload(x, tag="benign")`), and
[GuardStats][randfeat.eval.guarded.GuardStats] counts the flags by the source of the closest
earlier query.

**Sybil attacker.** `Guarded(..., accounts=K)` spreads the calls over `K` API keys
(`attacker-0`, ..., `attacker-{K-1}`) round-robin: per-key state (the ban after `ban_after`
flagged rows, per-key counts) sees a `K`-th of the stream, while the detector's one index sees
all of it. A banned key leaves the rotation (the attacker reads the ban off the server's count);
[KeyBanned][randfeat.eval.guarded.KeyBanned] comes only when every key is banned. A flag whose
closest earlier query came from any of the `K` keys is the attacker's own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from randfeat.checks import check_choice, check_positive_int, expected
from randfeat.detect import Detector
from randfeat.eval.errors import QueryRefused
from randfeat.serve.protocol import KEY_BANNED, QUERY_FLAGGED

__all__ = ["ON_DETECT", "GuardStats", "Guarded", "KeyBanned", "OnDetect", "QueryFlagged"]

OnDetect = Literal["reject", "ban", "log"]
ON_DETECT: tuple[OnDetect, ...] = ("reject", "ban", "log")
OWN = "own"
"""The source of a flag whose closest earlier query is the account's own (untagged) query."""


class QueryFlagged(QueryRefused):
    """A call refused whole because the detector flagged some of its rows (`query_flagged`).

    Attributes:
        code: `"query_flagged"`, the server's error code.
        rows: the indices of the flagged rows in the call (0-based).
        n: the rows of the call (all recorded, none answered).
    """

    code = QUERY_FLAGGED

    def __init__(self, rows: tuple[int, ...], n: int) -> None:
        self.rows = rows
        self.n = n
        super().__init__(
            f"The query detector flagged {len(rows)} of the {n} images of this call (rows "
            f"{list(rows)}) as too close to earlier queries: the call is refused whole, and its "
            "images were recorded."
        )


class KeyBanned(QueryRefused):
    """A call refused because the account is banned (`key_banned`): it had `ban_after` rows
    flagged. The rows were not observed.

    Attributes:
        code: `"key_banned"`, the server's error code.
        n: the rows of the call.
    """

    code = KEY_BANNED

    def __init__(self, account: str, flagged: int, n: int) -> None:
        self.n = n
        super().__init__(
            f"The account {account!r} is banned: {flagged} of its queries were flagged by the "
            "query detector. Use another account (or another Guarded) to query again."
        )


@dataclass(frozen=True)
class GuardStats:
    """What a [Guarded][randfeat.eval.guarded.Guarded] saw of its account since it was built
    (or since `reset_stats`).

    Attributes:
        queries: rows observed for the account (answered or refused, not the banned calls).
        first_flag: the query index (1-based, in `queries`) of the first flagged row, `-1` if
            none.
        flagged: rows flagged.
        flags_by_source: flagged rows by the source of the closest earlier query: `"own"` for
            the account's own untagged queries, else that query's tag, or its account when it
            has no tag (e.g. `{"own": 12, "benign": 1}`).
        rejected: rows refused, flagged or not (`reject`, `ban`), banned calls included.
        calls: calls made, refused ones included.
        refused_calls: calls refused.
    """

    queries: int = 0
    first_flag: int = -1
    flagged: int = 0
    flags_by_source: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    calls: int = 0
    refused_calls: int = 0

    @property
    def own_flags(self) -> int:
        """Flags caused by the account's own earlier queries."""
        return self.flags_by_source.get(OWN, 0)

    @property
    def other_flags(self) -> int:
        """Flags caused by stored queries of another account or tag (e.g. a benign preload)."""
        return self.flagged - self.own_flags


class Guarded:
    """A model behind a stateful detector, with a server's semantics (see the module docstring).

    Args:
        model: any callable from `[n, C, H, W]` in $[0, 1]$ to an output (scores or labels).
        detector: a [Detector][randfeat.detect.Detector], its threshold set (e.g. by
            `detector.calibrate(benign, target_fpr)`).
        on_detect: `"reject"`, `"ban"` or `"log"`.
        ban_after: flagged rows after which `"ban"` refuses the account (`>= 1`; the server's
            default, 10).
        account: the account every call is observed for (the attacker's API key).
        tag: stored with every row of the account (`None`: untagged); a flag whose closest
            earlier query has this tag is counted as the account's own.
        accounts: API keys the calls are spread over, round-robin (`>= 1`; see the module
            docstring): `account` itself when 1, else `f"{account}-{k}"` for `k < accounts`.

    Raises:
        TypeError: `model` not callable, `detector` not a Detector, `account` / `tag` not
            strings.
        ValueError: an unknown `on_detect`, `ban_after < 1`, an empty `account`,
            `accounts < 1`.

    Examples:
        >>> import torch
        >>> from randfeat.detect import DETECTORS, DEFAULT
        >>> model = Guarded(lambda x: x.flatten(1)[:, :2], DETECTORS[DEFAULT](seed=0))
        >>> x = torch.rand(1, 1, 8, 8)
        >>> model(x).shape
        torch.Size([1, 2])
        >>> try:
        ...     model(x)  # the same image again
        ... except QueryFlagged as err:
        ...     err.rows
        (0,)
        >>> model.stats.first_flag, model.stats.rejected
        (2, 1)
    """

    def __init__(
        self,
        model: Callable[[Tensor], Tensor],
        detector: Detector,
        *,
        on_detect: OnDetect = "reject",
        ban_after: int = 10,
        account: str = "attacker",
        tag: str | None = None,
        accounts: int = 1,
    ) -> None:
        if not callable(model):
            raise TypeError(expected("model", "a callable from images to scores", model))
        if not isinstance(detector, Detector):
            raise TypeError(
                expected("detector", "a randfeat.detect Detector", detector)
                + " Build one with randfeat.detect.DETECTORS[name](...)."
            )
        self.on_detect: OnDetect = check_choice(on_detect, "on_detect", ON_DETECT)
        self.ban_after = check_positive_int(ban_after, "ban_after")
        self.account = _check_name(account, "account")
        self.tag = None if tag is None else _check_name(tag, "tag")
        self.accounts = check_positive_int(accounts, "accounts")
        self.keys: tuple[str, ...] = (
            (self.account,) if accounts == 1 else tuple(f"{account}-{k}" for k in range(accounts))
        )
        self._turn = 0  # the next key in turn
        self.module = model  # `module`: what `independent_votes` looks through
        self.unguarded = model  # the evaluator's own forwards bypass the detector (`uncharged`)
        self.detector = detector
        self.reset_stats()

    def __repr__(self) -> str:
        return (
            f"Guarded({self.module!r}, {self.detector!r}, on_detect={self.on_detect!r}, "
            f"ban_after={self.ban_after}, account={self.account!r}"
            + (f", accounts={self.accounts})" if self.accounts > 1 else ")")
        )

    @property
    def stats(self) -> GuardStats:
        """The counts so far (a snapshot)."""
        return GuardStats(
            queries=self._queries,
            first_flag=self._first_flag,
            flagged=sum(self._sources.values()),
            flags_by_source=dict(self._sources),
            rejected=self._rejected,
            calls=self._calls,
            refused_calls=self._refused_calls,
        )

    def reset_stats(self) -> None:
        """Start the counts afresh (the detector's store, and so its memory, stays)."""
        self._queries = 0
        self._first_flag = -1
        self._sources: Counter[str] = Counter()
        self._rejected = 0
        self._calls = 0
        self._refused_calls = 0

    def preload(self, x: Tensor, *, tag: str = "benign", account: str = "benign") -> int:
        """Observe benign images `x: [n, C, H, W]` (stored under `account` and `tag`, not
        answered, not counted in `stats`), as the traffic a server saw before the attack.

        Returns:
            How many of them the detector flagged (benign false positives).

        Raises:
            ValueError: `account` is the guarded account (its flags would count as its own).
        """
        account = _check_name(account, "account")
        if account == self.account or account in self.keys:
            raise ValueError(
                expected(
                    "account",
                    f"an account other than the guarded ones ({self.account!r}, {self.keys!r})",
                    account,
                    "Preload benign traffic under its own account.",
                )
            )
        return self.detector.observe(x, account, tag=_check_name(tag, "tag")).n_flagged

    def __call__(self, x: Tensor) -> Tensor:
        """Observe every row of `x`, then answer, or refuse the whole call (see the module
        docstring).

        Raises:
            QueryFlagged: `reject` or `ban`, and a row of `x` was flagged.
            KeyBanned: `ban`, and the account (every one of its keys) already had `ban_after`
                flagged rows.
        """
        n = int(x.shape[0])
        self._calls += 1
        key = self._next_key(n)
        verdict = self.detector.observe(x, key, tag=self.tag)
        flags: list[bool] = verdict.flagged.tolist()  # one host sync per call
        rows = tuple(r for r, f in enumerate(flags) if f)
        if rows:
            if self._first_flag < 0:
                self._first_flag = self._queries + rows[0] + 1
            for r in rows:
                tag, account = verdict.match_tag[r], verdict.match_account[r]
                if account in self.keys and tag == self.tag:
                    self._sources[OWN] += 1
                else:
                    self._sources[tag if tag is not None else (account or "unknown")] += 1
        self._queries += n
        if rows and self.on_detect != "log":
            self._refuse(n)
            raise QueryFlagged(rows, n)
        return self.module(x)

    def _next_key(self, n: int) -> str:
        """The key of this call: the next one in turn that is not banned (`ban`)."""
        k = len(self.keys)
        if self.on_detect != "ban":
            self._turn += 1
            return self.keys[(self._turn - 1) % k]
        every = self.detector.accounts()  # one read of the counts; a banned key is skipped
        flags = [every[key].flagged if key in every else 0 for key in self.keys]
        for step in range(k):
            i = (self._turn + step) % k
            if flags[i] < self.ban_after:
                self._turn = i + 1
                return self.keys[i]
        flagged = sum(flags)
        self._refuse(n)
        raise KeyBanned(self.account if self.accounts == 1 else f"{self.account}-*", flagged, n)

    def _refuse(self, n: int) -> None:
        self._rejected += n
        self._refused_calls += 1


def _check_name(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(expected(name, "a non-empty string", value))
    if not value:
        raise ValueError(expected(name, "a non-empty string", value))
    return value
