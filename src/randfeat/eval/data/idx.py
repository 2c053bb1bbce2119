"""IDX files, the format of MNIST and Fashion-MNIST: reading them, checked, gzipped or not.

An IDX file (LeCun et al., <http://yann.lecun.com/exdb/mnist/>) is a big-endian header — a magic
number `0x00 0x00 <type> <ndim>`, then `ndim` 32-bit sizes — followed by the values.
[read_idx][randfeat.eval.data.idx.read_idx] reads unsigned-byte files (type `0x08`, the only type the
MNIST family uses), plain or gzipped, and checks everything a damaged download can get wrong
before returning: the magic number, the number of dimensions, the length of the data. Each failure
is an [IdxError][randfeat.eval.data.idx.IdxError] that names the file.

torchvision has a reader (`torchvision.datasets.mnist.read_sn3_pascalvincent_tensor`), but it
does not fit here: it reads plain files only, checks the header with `assert` (gone under
`python -O`), and its image and label readers skip the length check (`strict=False`), so a
truncated file fails later with an unrelated shape error.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDX_UBYTE", "IdxError", "find_idx", "read_idx"]

IDX_UBYTE = 0x08
"""The IDX type code of unsigned bytes, the type of every MNIST-family file."""

_HEADER = 4  # bytes of the magic number, then 4 bytes per dimension


class IdxError(ValueError):
    """An IDX file that cannot be read: wrong magic number, truncated, not gzip, wrong shape."""


def find_idx(root: Path, stem: str) -> Path | None:
    """The file `root/stem` or `root/stem.gz` (plain first), or None when neither exists."""
    for name in (stem, stem + ".gz"):
        path = root / name
        if path.is_file():
            return path
    return None


def _read_bytes(path: Path) -> bytes:
    with path.open("rb") as f:
        head = f.read(2)
        f.seek(0)
        if path.suffix == ".gz" or head == b"\x1f\x8b":  # gzip's own magic number
            try:
                return gzip.decompress(f.read())
            except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
                raise IdxError(
                    f"{str(path)!r} is not a complete gzip file ({type(err).__name__}: {err})"
                ) from err
        return f.read()


def read_idx(path: str | os.PathLike[str], ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file with `ndim` dimensions, gzipped or not.

    The header is checked before the data is used: the magic number must be
    `0x00 0x00 0x08 <ndim>` and the file must hold exactly the product of its sizes in bytes
    after the header (a shorter file is truncated, a longer one is not an IDX file of that shape).

    Args:
        path: the file; gzip is recognised by its content (and a `.gz` name).
        ndim: the expected number of dimensions (3 for images `[N, H, W]`, 1 for labels).

    Returns:
        A read-only `uint8` array of the file's shape.

    Raises:
        IdxError: a wrong magic number, a truncated or overlong file, or a damaged gzip stream;
            the message names the file.
        OSError: the file cannot be opened.

    Examples:
        >>> import gzip, pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "labels.gz"
        >>> _ = p.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 3])))
        >>> read_idx(p, 1).tolist()
        [7, 3]
    """
    p = Path(path)
    raw = _read_bytes(p)
    magic = bytes(raw[:_HEADER])
    expected = bytes([0, 0, IDX_UBYTE, ndim])
    if len(raw) >= _HEADER and magic != expected:
        raise IdxError(
            f"{str(p)!r} has the magic number 0x{magic.hex()}, expected 0x{expected.hex()} "
            f"(an IDX file of unsigned bytes with {ndim} dimension(s)); it is not the file its "
            "name says, or it is damaged"
        )
    if len(raw) < _HEADER + 4 * ndim:
        raise IdxError(
            f"{str(p)!r} is truncated: {len(raw)} bytes, shorter than an IDX header with "
            f"{ndim} dimension(s) ({_HEADER + 4 * ndim} bytes)"
        )
    shape = tuple(
        int.from_bytes(raw[_HEADER + 4 * i : _HEADER + 4 * (i + 1)], "big") for i in range(ndim)
    )
    offset = _HEADER + 4 * ndim
    size = int(np.prod(shape, dtype=np.int64))
    have = len(raw) - offset
    if have != size:
        what = "truncated" if have < size else "longer than its header says"
        raise IdxError(
            f"{str(p)!r} is {what}: its header declares shape {shape} ({size} bytes of data), "
            f"but it holds {have}"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=size, offset=offset).reshape(shape)
