"""Fixtures of the server's detection tests: servers with a query detector, a real Redis server.

- `serve_detect(model, detector, card=None, **options) -> URL`: like the `serve` fixture of
  `tests/conftest.py`, with `detector` passed to `create_app` (options are `ServeOptions` fields).
- `redis_server`: Debian's `redis-server` on a free 127.0.0.1 port, persistence off, stopped at
  teardown; `.stop()` and `.start()` it again on the same port mid-test. Skipped when
  `redis-server` or the `redis` client is missing, unless `$RANDFEAT_REQUIRE_REDIS` is set (then
  the test fails). (`tests/detect/conftest.py` has a session-wide Redis server, which a test
  cannot stop and restart, and which `tests/serve/` does not see.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _serve_helpers import free_port

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"


@pytest.fixture
def serve_detect() -> Iterator[Callable[..., str]]:
    """Start real uvicorn servers with a query detector on free 127.0.0.1 ports."""
    from randfeat import RandomizedFeatureWrapper
    from randfeat.serve.app import create_app
    from randfeat.serve.config import ModelCard, ServeOptions
    from randfeat.serve.run import serve_in_thread

    with contextlib.ExitStack() as stack:

        def start(
            model: Callable[..., Any], detector: Any, card: ModelCard | None = None, **options: Any
        ) -> str:
            if card is None:
                defended = isinstance(model, RandomizedFeatureWrapper)
                card = ModelCard("digits-cnn", (1, 8, 8), 10, defended=defended)
            app = create_app(model, card, ServeOptions(**options), detector=detector)
            return stack.enter_context(serve_in_thread(app))

        yield start


class RedisServer:
    """`redis-server` on one port of 127.0.0.1, in memory only; stop and start it at will."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        cmd = [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(self.workdir)]  # fmt: skip
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.proc = None

    def log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running `redis-server` (see the module docstring)."""
    missing = None
    if not os.path.exists(REDIS):
        missing = "redis-server is not installed (apt-get install redis-server)"
    elif importlib.util.find_spec("redis") is None:
        missing = "the redis client is not installed (pip install redis)"
    if missing is not None:
        if os.environ.get("RANDFEAT_REQUIRE_REDIS"):
            pytest.fail(f"RANDFEAT_REQUIRE_REDIS is set, but {missing}")
        pytest.skip(missing)
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
