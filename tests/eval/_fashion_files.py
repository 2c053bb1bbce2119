"""Test helpers for Fashion-MNIST: tiny IDX files and the marker for tests on the real files."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from randfeat.eval.data import loaders as rf_data
from randfeat.eval.data.idx import find_idx
from randfeat.eval.data.loaders import FASHION_MNIST_FILES


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic 0x0000 08 <ndim>, big-endian sizes, the bytes."""
    head = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return head + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write `array` as an IDX file at `path`, gzipped when the name ends in `.gz`."""
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


REAL = rf_data.FASHION_MNIST_DEBIAN_DIR
REQUIRE_ENV = "RANDFEAT_REQUIRE_FASHION_MNIST"
"""Set (by .ci/run, where the Debian package is installed): the real-data tests never skip."""
needs_real_files = pytest.mark.skipif(
    not os.environ.get(REQUIRE_ENV)
    and not all(find_idx(REAL, stem) for stem in FASHION_MNIST_FILES.values()),
    reason=f"Fashion-MNIST is not installed in {REAL} (apt-get install dataset-fashion-mnist)",
)


def write_fashion(
    root: Path, *, gz: bool = False, n_train: int = 20, n_test: int = 10
) -> dict[str, np.ndarray]:
    """Four tiny Fashion-MNIST files in `root`: labels cycle 0..9, pixels from a seeded draw."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    for field, stem in FASHION_MNIST_FILES.items():
        write_idx(root / (stem + (".gz" if gz else "")), arrays[field])
    return arrays
