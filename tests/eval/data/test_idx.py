"""Tests for randfeat.eval.data.idx: IDX files, plain and gzipped, and every way they can be damaged."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from _fashion_files import idx_bytes, write_idx
from hypothesis import given, settings
from hypothesis import strategies as st

from randfeat.eval.data.idx import IdxError, find_idx, read_idx


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    gz=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_round_trip(
    tmp_path_factory: pytest.TempPathFactory, shape: list[int], gz: bool, seed: int
) -> None:
    array = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path_factory.mktemp("idx") / ("a.idx.gz" if gz else "a.idx")
    out = read_idx(write_idx(path, array), len(shape))
    assert out.dtype == np.uint8 and out.shape == tuple(shape)
    assert np.array_equal(out, array)


def test_gzip_is_recognised_by_content(tmp_path: Path) -> None:
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    path = tmp_path / "no-suffix"
    path.write_bytes(gzip.compress(idx_bytes(array)))
    assert np.array_equal(read_idx(path, 2), array)


def test_wrong_magic_number(tmp_path: Path) -> None:
    raw = bytearray(idx_bytes(np.zeros((2, 3), dtype=np.uint8)))
    raw[2] = 0x0D  # float32 instead of unsigned bytes
    (tmp_path / "f").write_bytes(bytes(raw))
    with pytest.raises(
        IdxError, match=r"'.*f' has the magic number 0x00000d02, expected 0x00000802"
    ):
        read_idx(tmp_path / "f", 2)
    # the right type, the wrong number of dimensions (a label file read as images)
    write_idx(tmp_path / "labels", np.zeros(4, dtype=np.uint8))
    with pytest.raises(IdxError, match=r"0x00000801, expected 0x00000803"):
        read_idx(tmp_path / "labels", 3)


def test_truncated_data(tmp_path: Path) -> None:
    raw = idx_bytes(np.ones((3, 4, 4), dtype=np.uint8))
    (tmp_path / "cut").write_bytes(raw[:-5])
    with pytest.raises(
        IdxError, match=r"'.*cut' is truncated: .*shape \(3, 4, 4\) \(48 bytes.*holds 43"
    ):
        read_idx(tmp_path / "cut", 3)
    (tmp_path / "long").write_bytes(raw + b"\0")
    with pytest.raises(IdxError, match="longer than its header says"):
        read_idx(tmp_path / "long", 3)


def test_truncated_header(tmp_path: Path) -> None:
    (tmp_path / "h").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(IdxError, match=r"truncated: 6 bytes, shorter than an IDX header"):
        read_idx(tmp_path / "h", 3)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(IdxError, match="truncated: 0 bytes"):
        read_idx(tmp_path / "empty", 1)


def test_truncated_or_bad_gzip(tmp_path: Path) -> None:
    blob = gzip.compress(idx_bytes(np.ones((50, 28, 28), dtype=np.uint8)))
    (tmp_path / "cut.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(IdxError, match=r"'.*cut.gz' is not a complete gzip file"):
        read_idx(tmp_path / "cut.gz", 3)
    (tmp_path / "plain.gz").write_bytes(idx_bytes(np.ones(3, dtype=np.uint8)))
    with pytest.raises(IdxError, match="not a complete gzip file"):
        read_idx(tmp_path / "plain.gz", 1)


def test_find_idx_prefers_plain(tmp_path: Path) -> None:
    assert find_idx(tmp_path, "x") is None
    write_idx(tmp_path / "x.gz", np.zeros(1, dtype=np.uint8))
    assert find_idx(tmp_path, "x") == tmp_path / "x.gz"
    write_idx(tmp_path / "x", np.zeros(1, dtype=np.uint8))
    assert find_idx(tmp_path, "x") == tmp_path / "x"
