"""Helpers of the server tests: a store outage without a network (`FlakyStore`), `free_port`."""

from __future__ import annotations

import socket
from typing import Any

from randfeat.detect.stores import MemoryStore


class FlakyStore(MemoryStore):
    """A memory store that raises `ConnectionError` on every use while `down` (a store outage);
    it counts the calls that reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionError("store unreachable")

    def lookup(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return super().lookup(*args, **kwargs)

    def counts(self) -> Any:
        self._check()
        return super().counts()


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
