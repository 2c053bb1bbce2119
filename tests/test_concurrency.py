"""The defense under concurrency: threads, asyncio tasks, forked workers, DataParallel's threads.

Per-call state lives in context variables (one value per thread and per task) and the noise streams
are per thread and re-seeded in forked children; these tests fail on a wrapper that keeps that
state in shared attributes or shares one generator state across processes.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import threading
import time
from collections.abc import Callable

import pytest
import torch
from torch import nn

from _deploy_models import draw_in_forked_children
from randfeat import wrap

SECONDS = 1.5  # how long the threads hammer the wrapper


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def run_threads(workers: dict[str, Callable[[threading.Barrier], None]]) -> None:
    """Start every worker at once (a barrier), join them, re-raise the first exception."""
    barrier = threading.Barrier(len(workers))
    errors: list[BaseException] = []

    def guard(fn: Callable[[threading.Barrier], None]) -> None:
        try:
            fn(barrier)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=guard, args=(fn,), name=n) for n, fn in workers.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# ---------------------------------------------------------------------------- threads
@pytest.mark.slow
def test_noise_disabled_and_the_bare_model_stay_in_their_own_thread() -> None:
    """Three noisy threads, one inside noise_disabled(), one calling the bare model, all at once.

    Zero clean outputs among the noisy threads, zero noisy outputs from the bare model or from
    inside noise_disabled(), zero exceptions (a missed reached-layer check would raise).
    """
    model = mlp()
    w = wrap(model, ["body.0", "penultimate"], nu=1.0)
    x = torch.rand(4, 6)
    with torch.no_grad():
        clean = model(x)
    counts: dict[str, list[int]] = {}  # name -> [forwards, wrong outputs]
    stop = time.monotonic() + SECONDS

    def noisy(name: str) -> Callable[[threading.Barrier], None]:
        def work(barrier: threading.Barrier) -> None:
            c = counts.setdefault(name, [0, 0])
            barrier.wait()
            with torch.no_grad():
                while time.monotonic() < stop:
                    c[0] += 1
                    c[1] += bool(torch.equal(w(x), clean))

        return work

    def quiet(barrier: threading.Barrier) -> None:
        c = counts.setdefault("quiet", [0, 0])
        barrier.wait()
        with torch.no_grad(), w.noise_disabled():
            while time.monotonic() < stop:
                c[0] += 1
                c[1] += not torch.equal(w(x), clean)

    def bare(barrier: threading.Barrier) -> None:
        c = counts.setdefault("bare", [0, 0])
        barrier.wait()
        with torch.no_grad():
            while time.monotonic() < stop:
                c[0] += 1
                c[1] += not torch.equal(model(x), clean)

    run_threads({"n1": noisy("n1"), "n2": noisy("n2"), "n3": noisy("n3"), "q": quiet, "b": bare})
    assert all(n >= 20 for n, _ in counts.values()), counts  # they really ran side by side
    assert {k: wrong for k, (_, wrong) in counts.items()} == dict.fromkeys(counts, 0), counts


def test_threads_draw_independent_noise() -> None:
    """Two threads drawing at once get uncorrelated noise, and never the same draw.

    The wrapper perturbs the input of an identity, so each output row is a draw δ ~ N(0, I_64).
    For independent streams the sample correlation r of n = 64·rows paired values is ≈ N(0, 1/n):
    we require |r| < 5/sqrt(n) (false alarm < 1e-6).
    """
    w = wrap(nn.Sequential(nn.Identity()), ["input"], nu=1.0)
    zeros = torch.zeros(50, 64)
    draws: dict[str, list[torch.Tensor]] = {"a": [], "b": []}

    def draw(name: str) -> Callable[[threading.Barrier], None]:
        def work(barrier: threading.Barrier) -> None:
            barrier.wait()
            for _ in range(40):
                draws[name].append(w(zeros))

        return work

    run_threads({"a": draw("a"), "b": draw("b")})
    a, b = torch.cat(draws["a"]), torch.cat(draws["b"])
    n = a.numel()
    r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
    assert abs(r) < 5 / math.sqrt(n), r
    rows = {tuple(row.tolist()) for row in a}
    assert not any(tuple(row.tolist()) in rows for row in b)  # no draw is ever shared


def test_seeded_wrapper_gives_its_seeded_stream_in_any_thread() -> None:
    """Seeded: one stream for all threads, so a worker thread replays what the seed promises."""
    model = mlp()
    x = torch.rand(3, 6)
    with torch.no_grad():
        ref = wrap(model, nu=1.0, seed=7)(x)
        w = wrap(model, nu=1.0, seed=7)
        out: list[torch.Tensor] = []
        t = threading.Thread(target=lambda: out.append(w(x)))
        t.start()
        t.join()
    assert torch.equal(out[0], ref)


# ---------------------------------------------------------------------------- asyncio
def test_noise_disabled_is_per_asyncio_task() -> None:
    """A task suspended inside noise_disabled() does not switch the noise off for other tasks."""
    model = mlp()
    w = wrap(model, nu=1.0)
    x = torch.rand(4, 6)
    with torch.no_grad():
        clean = model(x)

    async def main() -> tuple[bool, bool, bool, bool]:
        entered, release = asyncio.Event(), asyncio.Event()

        async def health_check() -> tuple[bool, bool]:
            with w.noise_disabled():
                entered.set()
                await release.wait()  # another task runs while this one is inside
                in_task = torch.equal(w(x), clean)
                in_thread = torch.equal(await asyncio.to_thread(w, x), clean)  # copies context
            return in_task, in_thread

        async def request() -> tuple[bool, bool]:
            await entered.wait()
            in_task = not torch.equal(w(x), clean)
            in_thread = not torch.equal(await asyncio.to_thread(w, x), clean)
            release.set()
            return in_task, in_thread

        with torch.no_grad():
            (a, b), (c, d) = await asyncio.gather(health_check(), request())
        return a, b, c, d

    assert asyncio.run(main()) == (True, True, True, True)


# ---------------------------------------------------------------------------- DataParallel
def test_data_parallel_replicas_in_torch_worker_threads_get_noise() -> None:
    """`wrap(nn.DataParallel(model))` on several devices runs replicas in plain threads.

    No GPU here: the DataParallel below is given two fake devices, and its scatter / replicate /
    parallel_apply / gather stand in for torch's on the CPU, running each replica in a new
    `threading.Thread` exactly as `torch.nn.parallel.parallel_apply` does (no context copied).
    The replicas must still add noise, and the reached-layer check must see them.
    """
    model = mlp()
    dp = nn.DataParallel(model)
    assert dp.device_ids == []  # CPU: DataParallel would just call the module
    dp.device_ids, dp.output_device = [0, 1], 0

    def parallel_apply(replicas: list[nn.Module], inputs: list, kwargs: list) -> list:  # type: ignore[type-arg]
        results: dict[int, object] = {}

        def worker(i: int) -> None:
            results[i] = replicas[i](*inputs[i], **kwargs[i])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(replicas))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [results[i] for i in range(len(replicas))]

    dp.scatter = lambda inputs, kwargs, ids: ([(t,) for t in inputs[0].chunk(2)], [{}, {}])  # type: ignore[method-assign]
    dp.replicate = lambda module, ids: [module for _ in ids]  # type: ignore[method-assign]
    dp.parallel_apply = parallel_apply  # type: ignore[method-assign]
    dp.gather = lambda outputs, device: torch.cat(outputs)  # type: ignore[method-assign]
    w = wrap(dp, nu=1.0)
    assert w.layers == ["module.head.pre"]
    x = torch.rand(6, 6)
    with torch.no_grad():
        clean = model(x)
        out = w(x)
        assert out.shape == clean.shape
        assert not torch.isclose(out, clean).all(dim=1).any()  # every row of both replicas
        with w.noise_disabled():  # the switch reaches the replicas' threads too
            assert torch.allclose(w(x), clean, atol=1e-6)  # chunked matmuls round differently


def test_data_parallel_of_a_wrapper_on_the_cpu() -> None:
    model = mlp()
    dp = nn.DataParallel(wrap(model, nu=1.0))
    x = torch.rand(4, 6)
    with torch.no_grad():
        assert not torch.equal(dp(x), model(x))


# ---------------------------------------------------------------------------- fork
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.slow
def test_forked_children_draw_different_independent_noise() -> None:
    """An unseeded wrapper used in the parent, then forked: the children must not replay each
    other's draws (x and x + μu sent to two workers would cancel the noise otherwise).

    Each child returns 20 draws of δ ~ N(0, I_64) at the input of an identity; for independent
    streams the correlation of the n = 1280 pairs is ≈ N(0, 1/n): |r| < 5/sqrt(n).
    """
    w = wrap(nn.Sequential(nn.Identity()), ["input"], nu=1.0)
    zeros = torch.zeros(20, 64)
    w(zeros)  # the parent has used its stream
    a, b = draw_in_forked_children(lambda: w(zeros))
    assert not torch.equal(a, b)
    r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
    assert abs(r) < 5 / math.sqrt(a.numel()), r
    assert not torch.equal(a, w(zeros)) and not torch.equal(b, w(zeros))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.slow
def test_forked_children_of_a_multithreaded_parent_answer() -> None:
    """GNU OpenMP is not fork-safe: after the parent ran the digits CNN on 2 threads, every
    forked child hung in its first convolution (10 of 10) until randfeat's after-fork hook set the
    child's torch threads to 1. The parent runs right before each fork; each child answers (noisy
    logits) within the timeout and reports 1 thread; the parent keeps its 2."""
    from randfeat.eval.models import DigitsCNN

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        w = wrap(DigitsCNN().eval(), nu=0.1)
        x = torch.rand(256, 1, 8, 8)

        def run() -> torch.Tensor:
            with torch.no_grad():
                out = w(x)
            return torch.cat([out.flatten(), torch.tensor([float(torch.get_num_threads())])])

        outs = draw_in_forked_children(run, 2, before=run, timeout=30.0)
        assert [o[-1].item() for o in outs] == [1.0, 1.0]
        assert not torch.equal(outs[0][:-1], outs[1][:-1])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.slow
def test_seeded_wrapper_keeps_its_seed_in_forked_children() -> None:
    """Documented: a seed is a promise of reproducibility, so forked children replay it."""
    w = wrap(nn.Sequential(nn.Identity()), ["input"], nu=1.0, seed=3)
    zeros = torch.zeros(5, 8)
    w(zeros)
    a, b = draw_in_forked_children(lambda: w(zeros))
    assert torch.equal(a, b)
    assert torch.equal(a, w(zeros))  # and the parent's next draw is the same


def _pool_draw(_: int) -> torch.Tensor:
    time.sleep(0.05)  # let both workers take a task
    return _POOL_WRAPPER(torch.zeros(4, 16))


_POOL_WRAPPER = wrap(nn.Sequential(nn.Identity()), ["input"], nu=1.0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_multiprocessing_fork_pool_workers_differ() -> None:
    _POOL_WRAPPER(torch.zeros(4, 16))
    with multiprocessing.get_context("fork").Pool(2) as pool:
        draws = pool.map(_pool_draw, range(4), chunksize=1)
    firsts = {tuple(d.flatten().tolist()) for d in draws}
    assert len(firsts) == len(draws)  # no two tasks, in any two workers, got the same draw
