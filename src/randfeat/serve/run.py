"""Running the server: in the foreground with N worker processes, or in a background thread.

* [run_server][randfeat.serve.run.run_server] is what `randfeat serve` calls: uvicorn in the
  foreground, with `workers` processes. uvicorn **spawns** its workers (a fresh interpreter each,
  not a fork), so the model travels to them pickled in a private temporary directory; a
  [RandomizedFeatureWrapper][randfeat.RandomizedFeatureWrapper] seeded from OS entropy draws a new
  seed when it is unpickled, so every worker draws its own, independent noise. A seeded wrapper
  would replay one stream in every worker and is refused; a keyed wrapper (`noise="keyed"`)
  travels with its key, so every worker gives an image the same answer. The per-key counts live
  in one SQLite file that every worker charges. A query detector travels as a
  [DetectorSpec][randfeat.serve.guard.DetectorSpec] on a shared store: each worker builds its own,
  adopts the secret key the store holds and uses the calibrated threshold, so a query seen by
  one worker is matched by every other. SIGTERM (or Ctrl-C) stops accepting connections, finishes the
  requests in flight (for up to `graceful_timeout` seconds) and exits.
* [serve_in_thread][randfeat.serve.run.serve_in_thread] runs an application on a free port of
  127.0.0.1 in a background thread, for tests, notebooks, benchmarks and `randfeat demo --serve`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from torch import Tensor

from randfeat.checks import check_positive_int, expected
from randfeat.detect import Detector
from randfeat.serve.app import create_app
from randfeat.serve.config import ModelCard, ServeOptions
from randfeat.serve.guard import DetectorSpec
from randfeat.wrapper import RandomizedFeatureWrapper

__all__ = ["BUNDLE_ENV", "run_server", "serve_in_thread", "worker_app"]

logger = logging.getLogger("randfeat.serve")

BUNDLE_ENV = "RANDFEAT_SERVE_BUNDLE"
"""Environment variable naming the pickled model that spawned workers load."""
WORKER_STARTUP_S = 120
"""Seconds a worker process may take to answer the supervisor (start-up included)."""


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging configuration, plus the `randfeat` loggers on its default handler."""
    cfg = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    cfg["loggers"]["randfeat"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    return cfg


def _check_seeds(model: object, workers: int) -> None:
    if workers > 1 and isinstance(model, torch.nn.Module):
        for m in model.modules():
            if isinstance(m, RandomizedFeatureWrapper) and m.seeded:
                raise ValueError(
                    f"Expected an unseeded defense for --workers {workers}: this wrapper is "
                    "seeded, so every worker would draw the same noise stream and an attacker "
                    "could cancel it. Wrap without `seed` (OS entropy) to serve several workers."
                )


@contextlib.contextmanager
def _exit_quietly_on_sigterm() -> Iterator[None]:
    """After a graceful shutdown uvicorn re-raises SIGTERM to the handler it found: make that
    handler a no-op, so that the process returns normally (exit code 0) instead of dying by it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def worker_app() -> FastAPI:
    """The application of one spawned worker: the pickled bundle named by `$RANDFEAT_SERVE_BUNDLE`.

    Raises:
        RuntimeError: the variable is not set (this factory is only for `run_server`'s workers).
    """
    path = os.environ.get(BUNDLE_ENV)
    if not path:
        raise RuntimeError(f"{BUNDLE_ENV} is not set: worker_app is started by run_server only.")
    # our own file, written by run_server into a directory only this user can read
    bundle = torch.load(path, map_location="cpu", weights_only=False)
    model = bundle["model"]
    if isinstance(model, torch.nn.Module):
        model = model.to(bundle["options"].device)
    spec: DetectorSpec | None = bundle.get("detector")
    card: ModelCard = bundle["card"]
    detector = spec.build(card.input_shape) if spec is not None else None
    return create_app(model, card, bundle["options"], detector=detector)


def _check_detector(detector: object, workers: int) -> None:
    if detector is None or isinstance(detector, (Detector, DetectorSpec)):
        if workers > 1 and isinstance(detector, Detector):
            raise TypeError(
                f"Expected a DetectorSpec for --workers {workers}, but got a built detector: "
                "each worker builds its own from the spec, on a shared store. Pass "
                "DetectorSpec(name, store='sqlite:PATH', threshold=det.threshold)."
            )
        if workers > 1 and isinstance(detector, DetectorSpec) and detector.store == "memory":
            raise ValueError(
                f"Expected a shared detector store for --workers {workers}, but got 'memory': "
                "each worker would keep its own queries and miss those sent to another. Use "
                "store='sqlite:PATH' (one machine) or 'redis://HOST:PORT/DB'."
            )
        return
    raise TypeError(expected("detector", "a Detector, a DetectorSpec or None", detector))


def run_server(
    model: Callable[[Tensor], Any],
    card: ModelCard,
    options: ServeOptions | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    log_level: str = "info",
    graceful_timeout: int = 30,
    detector: Detector | DetectorSpec | None = None,
) -> None:
    """Serve `model` with uvicorn until SIGTERM or Ctrl-C.

    Args:
        model: the (defended) model, as for [create_app][randfeat.serve.app.create_app]; with
            `workers > 1` it must pickle (every `nn.Module` of torch, timm and randfeat does).
        card: what the model is.
        options: how to answer.
        host: the interface to listen on (`0.0.0.0` for every interface).
        port: the TCP port.
        workers: server processes; each draws its own noise.
        log_level: `"debug"`, `"info"`, `"warning"` or `"error"`.
        graceful_timeout: seconds to finish in-flight requests after SIGTERM.
        detector: query detection (see [create_app][randfeat.serve.app.create_app]): a built
            detector for one worker, or a [DetectorSpec][randfeat.serve.guard.DetectorSpec] on
            a shared store (`sqlite:`, `redis://`) that every worker builds alike.

    Raises:
        ValueError: `workers < 1`, a seeded wrapper with `workers > 1`, or a detector on a
            `memory` store with `workers > 1`.
        TypeError: a built detector with `workers > 1`.
    """
    check_positive_int(workers, "workers")
    opts = options or ServeOptions()
    _check_seeds(model, workers)
    _check_detector(detector, workers)
    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_config": _log_config(log_level),
        "log_level": log_level,
        "access_log": False,  # randfeat.serve logs every request with its id, key and batch
        "timeout_graceful_shutdown": math.ceil(graceful_timeout),
    }
    if workers == 1:
        det = detector.build(card.input_shape) if isinstance(detector, DetectorSpec) else detector
        with _exit_quietly_on_sigterm():
            uvicorn.run(create_app(model, card, opts, detector=det), **common)
        return
    tmp = tempfile.mkdtemp(prefix="randfeat-serve-")  # mode 0700: only this user reads it
    try:
        if opts.usage_db is None:  # the workers must share one ledger
            opts = replace(opts, usage_db=str(Path(tmp) / "usage.sqlite"))
        bundle = Path(tmp) / "bundle.pt"
        # the bundle holds the model (a keyed wrapper's key with it): a secret, in a 0700 dir
        torch.save({"model": model, "card": card, "options": opts, "detector": detector}, bundle)
        os.environ[BUNDLE_ENV] = str(bundle)
        uvicorn.run(
            "randfeat.serve.run:worker_app",
            factory=True,
            workers=workers,
            # a spawned worker imports torch and unpickles the model before it answers the
            # supervisor's first ping; uvicorn's 5 s default kills slow starters in a loop
            timeout_worker_healthcheck=WORKER_STARTUP_S,
            **common,
        )
    finally:
        os.environ.pop(BUNDLE_ENV, None)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def serve_in_thread(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0
) -> Iterator[str]:
    """Run `app` in a background thread; yield its base URL; stop it (gracefully) on exit.

    Args:
        app: e.g. from [create_app][randfeat.serve.app.create_app].
        host: the interface (127.0.0.1: this machine only).
        port: the TCP port; 0 picks a free one.
        timeout: seconds to wait for startup and for shutdown.

    Raises:
        RuntimeError: the server did not start within `timeout`.

    Examples:
        >>> import httpx, torch
        >>> from randfeat.serve.app import create_app
        >>> from randfeat.serve.config import ModelCard
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
        >>> with serve_in_thread(create_app(net, ModelCard("toy", (1, 8, 8), 10, False))) as url:
        ...     httpx.get(url + "/healthz").json()["status"]
        'ok'
    """
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it Nagle's algorithm and delayed ACKs add ~40 ms to every request
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app, log_level="warning", access_log=False, timeout_graceful_shutdown=math.ceil(timeout)
        )
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="randfeat-serve", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"The server on {host}:{bound_port} did not start.")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
