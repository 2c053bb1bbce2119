"""The stores: SQLite shared by processes, Redis by clients, growth, mismatches, clear errors."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _detect_images import smooth_images

from randfeat.detect import DEFAULT, DETECTORS, AccountCounts, StoreMismatch, open_store
from randfeat.detect.stores import MemoryStore

SRC = Path(__file__).resolve().parents[2] / "src"


def _observe_in_child(spec: str, seed: int, account: str, rows: int) -> list[int]:
    """A worker process: its own detector (no seed: it adopts the store's key) and rows."""
    det = DETECTORS[DEFAULT](store=spec)
    v = det.observe(smooth_images(rows, seed=seed), account=account)
    det.close()
    return [int(i) for i in v.ids.tolist()] + [int(v.flagged.sum())]


@pytest.mark.slow
def test_sqlite_is_shared_by_processes(tmp_path: Path) -> None:
    spec = f"sqlite:{tmp_path / 'shared.db'}"
    parent = DETECTORS[DEFAULT](store=spec)  # the first bound: its OS-entropy key is stored
    parent.observe(smooth_images(1, seed=99), account="parent")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:  # two processes storing at once, different images
        results = pool.starmap(_observe_in_child, [(spec, 1, "w1", 30), (spec, 2, "w2", 30)])
    ids = sorted(i for r in results for i in r[:-1])
    assert ids == list(range(1, 61))  # one numbering across processes, nothing lost
    assert [r[-1] for r in results] == [0, 0]
    # the parent sees what the children stored, under its own key (the children adopted it)
    v = parent.observe(smooth_images(30, seed=2)[7:8], account="parent")
    assert v.flagged.tolist() == [True] and v.match_account == ("w2",)
    assert parent.accounts() == {
        "parent": AccountCounts(2, 1),
        "w1": AccountCounts(30, 0),
        "w2": AccountCounts(30, 0),
    }


def test_sqlite_keeps_the_queries_when_reopened(tmp_path: Path) -> None:
    spec = f"sqlite:{tmp_path / 'd.db'}"
    x = smooth_images(3, seed=4)
    first = DETECTORS[DEFAULT](store=spec)
    first.observe(x, account="a")
    first.close()
    again = DETECTORS[DEFAULT](store=spec)
    assert again.stored() == 0  # not bound yet: no shape
    assert again.observe(x[1:2], account="b").match_account == ("a",)


def test_redis_is_shared_by_clients(redis_url: str) -> None:
    one = DETECTORS[DEFAULT](store=redis_url)
    two = DETECTORS[DEFAULT](store=redis_url)  # adopts one's key at its first batch
    x = smooth_images(5, seed=5)
    one.observe(x, account="a", tag="benign")
    v = two.observe(x[3:4], account="b")
    assert v.flagged.tolist() == [True] and v.match_tag == ("benign",)
    assert two.accounts() == {"a": AccountCounts(5, 0), "b": AccountCounts(1, 1)}
    two.clear()
    assert one.stored() == 0 and one.accounts() == {}


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_shared_store_refuses_another_layout_or_key(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    spec = (
        f"sqlite:{tmp_path / 'd.db'}" if kind == "sqlite" else request.getfixturevalue("redis_url")
    )
    DETECTORS[DEFAULT](seed=1, store=spec, shape=(1, 28, 28))
    with pytest.raises(StoreMismatch, match=r"another detector layout.*Use another store"):
        DETECTORS["blacklight"](seed=1, store=spec, shape=(1, 28, 28))
    with pytest.raises(StoreMismatch, match="another detector layout"):
        DETECTORS[DEFAULT](seed=1, store=spec, shape=(3, 32, 32))
    with pytest.raises(StoreMismatch, match="another secret key"):
        DETECTORS[DEFAULT](seed=2, store=spec, shape=(1, 28, 28))
    DETECTORS[DEFAULT](store=spec, shape=(1, 28, 28))  # no seed: adopts the stored key


def test_an_unreachable_redis_fails_at_construction_with_the_fix() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    pytest.importorskip("redis")
    url = f"redis://127.0.0.1:{port}/0"
    with pytest.raises(ConnectionError, match=rf"{url}.*redis-server --port {port}"):
        DETECTORS[DEFAULT](store=url)


def test_a_missing_redis_client_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # importing it now fails
    with pytest.raises(ImportError, match=r"pip install redis"):
        open_store("redis://127.0.0.1:6379/0")


def test_an_sqlite_file_in_a_missing_folder_fails_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"nowhere.*folder exists"):
        DETECTORS[DEFAULT](store=f"sqlite:{tmp_path / 'nowhere' / 'd.db'}")


def test_the_package_imports_neither_redis_nor_the_evaluation(tmp_path: Path) -> None:
    script = (
        "import sys, torch\n"
        "from randfeat.detect import DETECTORS\n"
        "d = DETECTORS['pooled-linf'](store='sqlite:' + sys.argv[1])\n"
        "d.observe(torch.rand(2, 1, 8, 8))\n"
        "bad = [m for m in ('redis', 'randfeat.eval', 'randfeat.serve', 'randfeat.cli') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "x.db")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_memory_store_grows_and_keeps_every_match() -> None:
    # 3,000 queries: the ring and the index double twice (1024 -> 2048 -> 4096 rows)
    det = DETECTORS[DEFAULT](seed=0)
    x = smooth_images(3000, seed=6)
    for i in range(0, 3000, 700):
        det.observe(x[i : i + 700])
    store = det.store
    assert isinstance(store, MemoryStore) and det.stored() == 3000
    v = det.observe(x[::300])
    assert v.flagged.all() and v.match.tolist() == list(range(0, 3000, 300))
    assert store.nbytes() > 0


def test_more_rows_than_capacity_in_one_batch_keeps_the_newest() -> None:
    det = DETECTORS[DEFAULT](seed=0, capacity=4)
    x = smooth_images(10, seed=7)
    v = det.observe(x)
    assert v.ids.tolist() == list(range(10)) and det.stored() == 4  # 6, 7, 8, 9
    assert torch.equal(det.observe(x[6:7]).match, torch.tensor([6]))  # stored as 10: 6 goes
    assert torch.equal(det.observe(x[9:10]).match, torch.tensor([9]))
    assert det.observe(x[0:1]).score.tolist() == [0.0]
