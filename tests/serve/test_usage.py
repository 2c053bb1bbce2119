"""The per-key ledger: limits, refunds, and one count shared by every process on one file."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from randfeat.serve.usage import KeyUsage, UsageLedger


def test_a_charge_that_would_pass_the_limit_is_refused_whole() -> None:
    ledger = UsageLedger(limit=5)
    assert ledger.charge("a", 3).allowed
    refused = ledger.charge("a", 3)
    assert (refused.allowed, refused.used, refused.limit) == (False, 3, 5)
    assert ledger.charge("a", 2).used == 5
    assert not ledger.charge("a", 1).allowed
    assert not ledger.charge("b", 6).allowed  # more than the limit in one request
    assert ledger.usage() == {"a": KeyUsage(5, 2)}


def test_a_refund_gives_back_the_queries_and_the_request() -> None:
    ledger = UsageLedger(limit=4)
    ledger.charge("a", 4)
    ledger.refund("a", 4)
    assert ledger.usage()["a"] == KeyUsage(0, 0)
    assert ledger.charge("a", 4).allowed


def test_no_limit_counts_everything() -> None:
    ledger = UsageLedger()
    for _ in range(3):
        assert ledger.charge("a", 1000).allowed
    assert ledger.usage()["a"] == KeyUsage(3000, 3)


def _charge_many(path: str, n: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    ledger = UsageLedger(path, limit=150)
    out.put(sum(ledger.charge("k", 1).allowed for _ in range(n)))


def test_processes_on_one_file_share_one_limit(tmp_path: Path) -> None:
    path = str(tmp_path / "usage.sqlite")
    ctx = mp.get_context("fork")  # each child opens its own connection after the fork
    out = ctx.Queue()
    procs = [ctx.Process(target=_charge_many, args=(path, 100, out)) for _ in range(2)]
    for p in procs:
        p.start()
    allowed = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    # 200 charges of one query against a limit of 150: exactly 150 allowed, none lost
    assert sum(allowed) == 150
    assert UsageLedger(path).usage()["k"] == KeyUsage(150, 150)


@pytest.mark.parametrize("limit", [0, -1, True, 1.5])
def test_a_bad_limit_is_refused(limit: object) -> None:
    with pytest.raises((TypeError, ValueError), match="limit"):
        UsageLedger(limit=limit)  # type: ignore[arg-type]
