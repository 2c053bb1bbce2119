"""The micro-batcher: merging, limits, order, errors and a draining stop (no HTTP here)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import Tensor

from randfeat.serve.batcher import MicroBatcher


class _Recorder:
    """A forward that records its batch sizes, sleeps a little and returns each row's tag."""

    def __init__(self, delay: float = 0.01) -> None:
        self.sizes: list[int] = []
        self.delay = delay
        self.threads: set[str] = set()

    def __call__(self, x: Tensor) -> Tensor:
        self.sizes.append(x.shape[0])
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        return x[:, :1] * 10


def _submit_concurrently(b: MicroBatcher, sizes: list[int]) -> list[Tensor]:
    """Submit one request per size from as many threads at once; their outputs, in order."""
    outs: list[Tensor | None] = [None] * len(sizes)
    start = threading.Barrier(len(sizes))

    def one(i: int) -> None:
        x = torch.full((sizes[i], 2), float(i))
        start.wait()
        with b.expect() as submit:
            fut = submit(x)
        outs[i] = fut.result(timeout=30).output

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(sizes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return [o for o in outs if o is not None]


def test_concurrent_requests_are_merged_within_max_batch_and_each_gets_its_own_rows() -> None:
    rec = _Recorder()
    b = MicroBatcher(rec, max_batch=8, max_wait_ms=50)
    b.start()
    try:
        sizes = [1, 2, 3, 1, 2, 1, 3, 1, 2, 1, 1, 2]
        outs = _submit_concurrently(b, sizes)
    finally:
        b.stop()
    assert len(outs) == len(sizes)
    for i, out in enumerate(outs):  # every request gets its own rows back, in its order
        assert out.shape == (sizes[i], 1) and bool((out == 10 * i).all())
    assert sum(rec.sizes) == sum(sizes)
    assert max(rec.sizes) <= 8
    assert len(rec.sizes) < len(sizes), f"nothing was merged: {rec.sizes}"
    assert rec.threads == {"randfeat-inference"}  # the model runs in the one worker thread


def test_max_batch_1_never_merges_and_a_large_request_runs_alone() -> None:
    rec = _Recorder()
    b = MicroBatcher(rec, max_batch=1, max_wait_ms=50)
    b.start()
    try:
        outs = _submit_concurrently(b, [1, 1, 1, 3, 1])
    finally:
        b.stop()
    assert [o.shape[0] for o in outs] == [1, 1, 1, 3, 1]
    assert sorted(rec.sizes) == [1, 1, 1, 1, 3]


def test_a_model_error_reaches_every_request_of_its_batch_and_the_next_batch_works() -> None:
    calls = 0

    def flaky(x: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return x

    b = MicroBatcher(flaky, max_batch=4, max_wait_ms=0)
    b.start()
    try:
        with pytest.raises(RuntimeError, match="boom"):
            b.submit(torch.ones(2, 1)).result(timeout=10)
        assert b.submit(torch.ones(2, 1)).result(timeout=10).output.shape == (2, 1)
    finally:
        b.stop()


def test_a_wrong_output_shape_is_an_error_not_a_silent_misalignment() -> None:
    b = MicroBatcher(lambda x: x[:1], max_batch=4, max_wait_ms=0)
    b.start()
    try:
        with pytest.raises(RuntimeError, match="returned"):
            b.submit(torch.ones(3, 1)).result(timeout=10)
    finally:
        b.stop()


def test_stop_finishes_queued_requests_then_refuses_new_ones() -> None:
    rec = _Recorder(delay=0.05)
    b = MicroBatcher(rec, max_batch=1, max_wait_ms=0)
    b.start()
    futures = [b.submit(torch.full((1, 2), float(i))) for i in range(5)]
    b.stop()
    assert [int(f.result(timeout=0).output) for f in futures] == [0, 10, 20, 30, 40]
    with pytest.raises(RuntimeError, match="not running"):
        b.submit(torch.ones(1, 2))


def test_a_lone_request_does_not_wait_for_company() -> None:
    b = MicroBatcher(lambda x: x, max_batch=64, max_wait_ms=2000)
    b.start()
    try:
        t0 = time.perf_counter()
        with b.expect() as submit:
            fut = submit(torch.ones(1, 1))
        fut.result(timeout=10)
        waited = time.perf_counter() - t0
    finally:
        b.stop()
    assert waited < 1.0  # nothing else was announced: no 2 s wait


@pytest.mark.parametrize(("max_batch", "max_wait_ms"), [(0, 1.0), (True, 1.0), (4, -1.0)])
def test_bad_settings_are_refused(max_batch: int, max_wait_ms: float) -> None:
    with pytest.raises((TypeError, ValueError), match="max_"):
        MicroBatcher(lambda x: x, max_batch=max_batch, max_wait_ms=max_wait_ms)
