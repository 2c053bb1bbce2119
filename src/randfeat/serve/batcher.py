"""Micro-batching: concurrent requests merged into one forward by a single inference thread.

Many small requests (an attack's queries, one image each) would each pay a whole forward. The
[MicroBatcher][randfeat.serve.batcher.MicroBatcher] queues them; its one worker thread takes the
first waiting request, then keeps taking requests for up to `max_wait_ms` while the batch holds
at most `max_batch` images, runs **one** forward of the concatenation and hands every request its
own rows back. It waits only while more requests are on their way (announced with
[expect][randfeat.serve.batcher.MicroBatcher.expect] when they arrive, before their body is read):
a lone client pays no waiting time. A request is never split, so one larger than `max_batch` runs alone;
`max_batch=1` turns merging off (one forward per request).

The model only ever runs in the worker thread: it needs no thread-safety of its own, and each row
of a forward gets its own noise draw from the defended model (the noise is per sample), so merging
never makes two requests share noise.

An optional `screen` (the server's query detector, [Guard.screen][randfeat.serve.guard.Guard.screen])
runs in the same thread before the forward, on the batch's requests and their accounts; it admits
or refuses each request, and only the admitted ones reach the model.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol, cast

import torch
from torch import Tensor

from randfeat.checks import check_nonnegative_float, check_positive_int

__all__ = ["Admission", "BatchResult", "MicroBatcher", "Screen"]

logger = logging.getLogger("randfeat.serve")


class Admission(Protocol):
    """What a screen says about one request: at least whether the model answers it."""

    @property
    def answer(self) -> bool: ...


Screen = Callable[[Sequence[Tensor], Sequence[str]], Sequence[Admission]]
"""`screen(xs, accounts)`: one admission per request of a batch, in order."""


@dataclass(frozen=True)
class BatchResult:
    """The rows of one request and how they were computed.

    Attributes:
        output: the request's rows of the model's output; `None` when the screen refused it.
        batch_images: images in the forward that computed them (this request and others).
        batch_requests: requests merged into that forward.
        admission: what the screen said about the request (`None` without a screen).
    """

    output: Tensor | None
    batch_images: int
    batch_requests: int
    admission: Admission | None = None


@dataclass
class _Job:
    x: Tensor
    future: Future[BatchResult]
    account: str = ""


_STOP = object()


class MicroBatcher:
    """One inference thread that merges queued requests into batched forwards.

    Args:
        forward: runs the model on `[n, C, H, W]` and returns `[n, ...]` (called in the worker
            thread only, under `torch.inference_mode`).
        max_batch: the most images merged into one forward (`>= 1`; 1 = no merging).
        max_wait_ms: how long the first request of a batch waits for others (`>= 0`).
        screen: called in the worker thread with each batch's requests and accounts before the
            forward; only the requests it admits are computed. An exception it raises fails
            every request of the batch.

    Examples:
        >>> import torch
        >>> b = MicroBatcher(lambda x: x * 2, max_batch=8, max_wait_ms=1.0)
        >>> b.start()
        >>> b.submit(torch.ones(2, 1)).result().output.tolist()
        [[2.0], [2.0]]
        >>> b.stop()
    """

    def __init__(
        self,
        forward: Callable[[Tensor], Tensor],
        *,
        max_batch: int = 64,
        max_wait_ms: float = 5.0,
        screen: Screen | None = None,
    ) -> None:
        self._forward = forward
        self._screen = screen
        self.max_batch = check_positive_int(max_batch, "max_batch")
        self.max_wait = check_nonnegative_float(max_wait_ms, "max_wait_ms") / 1000.0
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._carry: _Job | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._expected = 0  # requests announced but not yet submitted

    @contextlib.contextmanager
    def expect(self) -> Iterator[Callable[[Tensor, str], Future[BatchResult]]]:
        """Announce a request that will be submitted soon; yields its `submit(x, account)`.

        Enter it when a request arrives, before its body is read and decoded: the worker waits
        up to `max_wait_ms` for announced requests to join a batch. Submitting through the
        yielded function ends the announcement as the job is queued; a request that is never
        submitted (a bad request) ends it on exit.
        """
        done = False

        def submit(x: Tensor, account: str = "") -> Future[BatchResult]:
            nonlocal done
            if done:
                raise RuntimeError("This announced request was already submitted.")
            done = True
            return self._submit(x, account, announced=True)

        with self._lock:
            self._expected += 1
        try:
            yield submit
        finally:
            if not done:
                with self._lock:
                    self._expected -= 1

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._lock:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(
                    target=self._run, name="randfeat-inference", daemon=True
                )
                self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued request, then end the worker thread."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stopping = True
            if thread is not None:
                self._queue.put(_STOP)
        if thread is not None:
            thread.join(timeout)

    def submit(self, x: Tensor, account: str = "") -> Future[BatchResult]:
        """Queue `x: [n, ...]` of `account` (for the screen); the future gives its rows.

        Raises:
            RuntimeError: the batcher is not running.
        """
        return self._submit(x, account, announced=False)

    def _submit(self, x: Tensor, account: str, *, announced: bool) -> Future[BatchResult]:
        job = _Job(x, Future(), account)
        with self._lock:  # atomic with stop(): every job is queued before the sentinel or refused
            if announced:
                self._expected -= 1
            if self._thread is None or self._stopping:
                raise RuntimeError("The inference worker is not running (start() it first).")
            self._queue.put(job)
        return job.future

    # ------------------------------------------------------------------ the worker thread
    def _next(self, timeout: float | None) -> _Job | object | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        try:
            return self._queue.get(timeout=timeout) if timeout != 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        """`first` and the jobs that join it; whether the stop sentinel was seen."""
        jobs, n = [first], first.x.shape[0]
        deadline = time.monotonic() + self.max_wait
        while n < self.max_batch:
            # wait for more only while requests are on their way; else take what is queued
            wait = deadline - time.monotonic() if self._expected > 0 else 0.0
            item = self._next(max(0.0, wait))
            if item is None:
                break
            if item is _STOP:
                return jobs, True
            job = cast(_Job, item)  # the queue holds jobs and the sentinel only
            if n + job.x.shape[0] > self.max_batch:
                self._carry = job  # it starts the next batch
                break
            jobs.append(job)
            n += job.x.shape[0]
        return jobs, False

    def _run(self) -> None:
        stop = False  # after the sentinel: drain what is queued without waiting, then end
        while True:
            item = self._next(0 if stop else None)
            if item is None:
                return
            if item is _STOP:
                stop = True
                continue
            jobs, saw_stop = self._gather(cast(_Job, item))
            stop = stop or saw_stop
            self._compute(jobs)

    def _admit(self, jobs: list[_Job]) -> list[Admission | None] | None:
        """The screen's admissions (`None` without a screen); `None` after failing the jobs."""
        if self._screen is None:
            return [None] * len(jobs)
        try:
            # no_grad, not inference_mode: a screen's stored state (the detector's tensors) must
            # stay usable outside the batcher, e.g. by the detector's own calibrate or tests
            with torch.no_grad():
                said = list(self._screen([j.x for j in jobs], [j.account for j in jobs]))
            if len(said) != len(jobs):
                raise RuntimeError(f"the screen answered {len(said)} of {len(jobs)} requests")
        except Exception as err:  # every request of the batch gets the error
            for j in jobs:
                j.future.set_exception(err)
            return None
        return list(said)

    def _compute(self, jobs: list[_Job]) -> None:
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        said = self._admit(jobs)
        if said is None:
            return
        for j, a in zip(jobs, said, strict=True):
            if a is not None and not a.answer:
                j.future.set_result(BatchResult(None, 0, 0, a))
        pairs = [(j, a) for j, a in zip(jobs, said, strict=True) if a is None or a.answer]
        if not pairs:
            return
        sizes = [j.x.shape[0] for j, _ in pairs]
        x = pairs[0][0].x if len(pairs) == 1 else torch.cat([j.x for j, _ in pairs])
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                out = self._forward(x)
            if not isinstance(out, Tensor) or out.ndim < 1 or out.shape[0] != x.shape[0]:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise RuntimeError(f"the model returned {got} for a batch of {x.shape[0]} images")
        except Exception as err:  # every request of the batch gets the error
            for j, _ in pairs:
                j.future.set_exception(err)
            return
        logger.debug(
            "forward of %d images from %d requests in %.1f ms",
            x.shape[0],
            len(pairs),
            1000 * (time.perf_counter() - t0),
        )
        for (j, a), rows in zip(pairs, out.split(sizes), strict=True):
            j.future.set_result(BatchResult(rows, x.shape[0], len(pairs), a))
