"""Models trained on first use and cached: [TrainedModel][randfeat.eval.models.cache.TrainedModel].

The embedded models (`digits-cnn`, `fashion-cnn`) are trained here, on the CPU, the first time
they are asked for, and their weights are cached in the user's cache directory.
[load_or_train][randfeat.eval.models.cache.load_or_train] is the one mechanism behind them:

- the cache file holds the weights and the metadata they were made from: the cache format
  version, a hash of the training recipe and a checksum of the training and test data;
- a file that cannot be read (read with `torch.load(weights_only=True)`), whose metadata differ
  (stale: the recipe or the data changed), or whose tensors do not fit the model is logged as a
  warning and replaced by a freshly trained model;
- files are written atomically (a temporary file, then `os.replace`), and a cache that cannot be
  written does not stop anything;
- one process trains at a time: training holds an exclusive lock on `<file>.lock`
  ([ExclusiveLock][randfeat.eval.lock.ExclusiveLock], waiting), so parallel processes (pytest
  workers, ranks, two shells) train once and the others load the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

from randfeat.eval.data.loaders import Split
from randfeat.eval.lock import ExclusiveLock

__all__ = [
    "CACHE_ENV",
    "CACHE_FORMAT_VERSION",
    "TrainedModel",
    "config_hash",
    "data_checksum",
    "default_cache_dir",
    "load_or_train",
    "save_atomic",
    "top1_accuracy",
]

logger = logging.getLogger("randfeat.eval.models")

M = TypeVar("M", bound=nn.Module)

CACHE_ENV = "RANDFEAT_CACHE"
"""Environment variable that overrides the cache directory."""
CACHE_FORMAT_VERSION = 1
"""Version of the cache file layout; bump it when the layout changes."""


def default_cache_dir() -> Path:
    """The randfeat cache directory.

    `$RANDFEAT_CACHE` if set, else `$XDG_CACHE_HOME/randfeat`, else `~/.cache/randfeat`.
    """
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "randfeat"


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 of a training recipe (a JSON-able mapping), independent of key order."""
    return hashlib.sha256(json.dumps(dict(config), sort_keys=True).encode()).hexdigest()


def data_checksum(data: Split) -> str:
    """SHA-256 of a split's tensors (shapes, dtypes and values)."""
    h = hashlib.sha256()
    for t in (data.x_train, data.y_train, data.x_test, data.y_test):
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def top1_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of `model` on `(x, y)`, in batches, without gradients."""
    correct = 0
    with torch.no_grad():
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
            correct += int((model(xb).argmax(dim=1) == yb).sum())
    return correct / max(1, y.numel())


@dataclass(frozen=True)
class TrainedModel(Generic[M]):
    """A model that is trained on first use and cached.

    Attributes:
        name: what log messages call it (`"digits CNN"`).
        file: the cache file's name in the cache directory (`"digits_cnn.pt"`).
        meta: what the cache must match: `format_version`, `config_hash`, `data_checksum`.
        build: a model of the right architecture (its weights are overwritten on a cache hit);
            it must not touch the global RNG.
        train: trains a model; returns it in eval mode.
        accuracy: the trained model's test accuracy (logged and stored in the cache).
    """

    name: str
    file: str
    meta: Mapping[str, Any]
    build: Callable[[], M]
    train: Callable[[], M]
    accuracy: Callable[[M], float]


def save_atomic(path: Path, blob: Mapping[str, Any]) -> None:
    """`torch.save(blob)` to `path` through a temporary file and `os.replace` (never half-written).

    Raises:
        OSError: the file cannot be written (the temporary file is removed, `path` is untouched).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(blob), f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(path: Path, spec: TrainedModel[M]) -> M | None:
    """The cached model if `path` is readable, current and well-formed; else `None` (logged)."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is a cache miss, never a crash
        logger.warning("Ignoring corrupt %s cache %s (%s); retraining.", spec.name, path, err)
        return None
    if not isinstance(blob, dict):
        logger.warning("Ignoring malformed %s cache %s; retraining.", spec.name, path)
        return None
    stale = {k: (blob.get(k), v) for k, v in spec.meta.items() if blob.get(k) != v}
    if stale:
        logger.warning(
            "Ignoring stale %s cache %s (metadata differs, cached vs expected: %s); retraining.",
            spec.name,
            path,
            stale,
        )
        return None
    model = spec.build()
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    state = blob.get("state_dict")
    if not (
        isinstance(state, dict)
        and all(isinstance(v, Tensor) for v in state.values())
        and {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == expected
    ):
        logger.warning(
            "Ignoring %s cache %s: its state_dict keys/shapes/dtypes do not match the model; "
            "retraining.",
            spec.name,
            path,
        )
        return None
    model.load_state_dict(state)
    return model.eval()


def _train_and_save(path: Path, spec: TrainedModel[M]) -> M:
    start = time.perf_counter()
    model = spec.train()
    seconds = time.perf_counter() - start
    acc = spec.accuracy(model)
    logger.info("Trained %s in %.1f s: test accuracy %.4f.", spec.name, seconds, acc)
    blob = {**spec.meta, "test_accuracy": acc, "train_seconds": seconds}
    try:
        save_atomic(path, {**blob, "state_dict": model.state_dict()})
    except OSError as err:  # a read-only cache must not stop evaluation
        logger.warning("Could not write %s cache %s (%s); not cached.", spec.name, path, err)
    return model


def load_or_train(
    spec: TrainedModel[M], cache_dir: str | os.PathLike[str] | None = None, *, retrain: bool = False
) -> M:
    """The cached model of `spec`, or a freshly trained one (then cached).

    Args:
        spec: the model, its recipe and its cache file.
        cache_dir: cache directory; default `default_cache_dir()`.
        retrain: ignore any cached file, train and overwrite it.

    Returns:
        The model in eval mode on the CPU.
    """
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = base / spec.file
    seen = _stat(path)
    if not retrain:  # the common case: a cache hit needs no lock (files are replaced atomically)
        cached = _load_cached(path, spec)
        if cached is not None:
            logger.debug("Loaded %s from cache %s.", spec.name, path)
            return cached
    lock = ExclusiveLock(path, wait=True)
    try:
        base.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as err:  # a read-only cache directory: train without the lock
        logger.debug("No lock for %s (%s).", path, err)
    try:
        # Another process may have trained and written it while this one waited for the lock.
        if not retrain and _stat(path) not in (seen, None):
            cached = _load_cached(path, spec)
            if cached is not None:
                return cached
        return _train_and_save(path, spec)
    finally:
        lock.release()


def _stat(path: Path) -> tuple[int, int, int] | None:
    """What identifies a version of the file: inode, size and modification time; None if absent."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
