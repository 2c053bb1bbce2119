"""One writer at a time: an exclusive lock beside a file, holding the writer's pid.

`randfeat eval` writes its result file under [ExclusiveLock][randfeat.eval.lock.ExclusiveLock]
(`fcntl.flock` on `<file>.lock`). A second run on the same `--out` finds the lock held, reads
the holder's pid from the lock file, and stops before any work. The kernel releases a `flock`
when its process dies, so a run killed with SIGKILL leaves a stale lock file that the next run
takes over. The lock lives on its own file because the result file is replaced atomically
(`os.replace`) when a resumed run repairs it, which would drop a lock held on the file itself.

The cached models of `randfeat.eval.models` use the same lock, waiting for it (`wait=True`):
the process that trains a model holds it, and the others read its cache file once it is written.

On systems without `fcntl` (Windows) no lock is taken.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from randfeat.eval.errors import ResultFileBusy

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["ExclusiveLock", "lock_path"]


def lock_path(path: Path) -> Path:
    """The lock file of the result file `path`: `<path>.lock`."""
    return path.with_name(path.name + ".lock")


class ExclusiveLock:
    """An exclusive lock on `<path>.lock` for the file `path` (a result file, a cached model).

    Use as a context manager; the lock file is removed when the lock is released.

    Args:
        path: the file the lock guards.
        wait: wait until the holder releases the lock instead of raising.

    Raises:
        ResultFileBusy: on entering, when another process holds the lock and `wait` is False
            (the message names the file and the holder's pid).
    """

    def __init__(self, path: Path, *, wait: bool = False) -> None:
        self.path = path
        self.lock_file = lock_path(path)
        self.wait = wait
        self._fd: int | None = None

    def __enter__(self) -> ExclusiveLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock and write this process's pid into the lock file."""
        if fcntl is None or self._fd is not None:  # pragma: no cover - Windows
            return
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise ResultFileBusy(
                    f"{str(self.path)!r} is being written by another run (pid {holder}, which "
                    f"holds {str(self.lock_file)!r}). Wait for it to finish or stop it, then "
                    "rerun this command to resume; or choose another --out."
                ) from None
            # The holder before us may have removed the file after we opened it: lock the file
            # that is at the path now, or try again.
            try:
                same = os.stat(self.lock_file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.lock_file.unlink(missing_ok=True)  # while still holding it: see `acquire`
        finally:
            os.close(fd)
