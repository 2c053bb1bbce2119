"""The result file of `randfeat eval`: reading, writing, resuming, one writer at a time.

A result file is JSON Lines (UTF-8, one record a line): the
[Header][randfeat.eval.results.records.Header], then [CleanRow][randfeat.eval.results.records.CleanRow] and
[AttackRow][randfeat.eval.results.records.AttackRow] records in the order their units finished. The
schema, field by field, is in `docs/evaluation.md`.

The rules, in one place:

- **Writing**: rows are appended one whole unit at a time, in one `write`, then `fsync`ed;
  a repair replaces the file atomically (a temporary file, `fsync`, `os.replace`), so a crash
  leaves the old or the new file, never a mix. While a run writes, it holds the file's
  [ExclusiveLock][randfeat.eval.lock.ExclusiveLock]: a second run on the same file stops.
- **The damaged last line**: a last line that does not end with a newline is a write cut off by a
  crash (or still under way). It is ignored with a warning when it is not a whole record; every
  other line must be a whole record, or the file is refused with the line number. Resuming
  rewrites the file without it.
- **Resuming**: a unit is complete when its rows are all in the file; rows of incomplete units
  and repeated copies of a unit are dropped (the first copy is kept), and only the missing units
  are computed.
- **Configuration**: a file written with different result-affecting settings is refused, naming
  each setting that differs ([config_differences][randfeat.eval.results.file.config_differences]).
- **Versions**: a file of another format version is refused, naming its version and the fix.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from randfeat.eval.errors import ConfigError, ReportError
from randfeat.eval.lock import ExclusiveLock
from randfeat.eval.results.codec import JSONObject
from randfeat.eval.results.records import AttackRow, CleanRow, Header, Row, Unit, row_from_json

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "NON_RESULT_SETTINGS",
    "TIMING_FIELDS",
    "ResultWriter",
    "Results",
    "complete_units",
    "config_differences",
    "duplicate_rows",
    "read_results",
]

logger = logging.getLogger(__name__)

FORMAT = "randfeat-eval"
"""The `format` of every result file's header."""
FORMAT_VERSION = 3
"""The layout version this randfeat reads and writes. Version 3 adds query detection (`--detect`:
the header's `detection`, the rows' `detection`, an attack's refused queries in `queries`);
version 2 judges clean images by the judging rule (`wrong_votes` of `votes`) and names the
calibration path (`path`); version 1 recorded the plurality vote (`pred`) and `fast_path`."""

_OLD_VERSIONS = {
    1: "version 1 judged clean images by a plurality of votes, not by the judging rule",
    2: "version 2 predates query detection; its figures are valid, its settings incomplete",
}
TIMING_FIELDS = frozenset({"seconds", "wall_time_s"})
"""Fields that vary between identical runs (wall-clock time); leave them out when comparing."""
NON_RESULT_SETTINGS = frozenset({"quiet", "out", "device", "preset", "channels_last", "compile"})
"""Settings that do not change results: not compared when resuming (`channels_last` and `compile`
change the order of floating-point operations, as another device does, not what is computed)."""


@dataclass(frozen=True)
class Results:
    """A result file as read: its header and its rows in file order.

    Attributes:
        header: the header record.
        rows: clean and attack rows, in file order.
    """

    header: Header
    rows: tuple[Row, ...]

    @property
    def clean(self) -> tuple[CleanRow, ...]:
        """The clean rows."""
        return tuple(r for r in self.rows if isinstance(r, CleanRow))

    @property
    def attacks(self) -> tuple[AttackRow, ...]:
        """The attack rows."""
        return tuple(r for r in self.rows if isinstance(r, AttackRow))


# ---------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class _Parsed:
    records: list[tuple[int, JSONObject]]  # (line number, object)
    clean_end: bool  # the file ends with a newline (or is empty)


def _parse(path: Path) -> _Parsed:
    """The JSON objects of `path` with their line numbers, by the damaged-last-line rule."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(
            f"Result file {str(path)!r} does not exist. Write one with "
            f"`randfeat eval --out {path}`."
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"Cannot read result file {str(path)!r}: {err}") from None
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    out: list[tuple[int, JSONObject]] = []
    for i, line in enumerate([*lines, tail]):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            if i == len(lines):  # the unfinished last line
                logger.warning("%s: ignoring the cut-off last line %d (%s).", path, i + 1, err)
                continue
            raise ReportError(
                f"Result file {str(path)!r}, line {i + 1}: not valid JSON ({err}). Only a cut-off "
                "last line can be repaired; remove or fix that line."
            ) from None
        if not isinstance(obj, dict):
            raise ReportError(
                f"Result file {str(path)!r}, line {i + 1}: expected a JSON object, but got "
                f"{type(obj).__name__}."
            )
        out.append((i + 1, obj))
    return _Parsed(out, clean_end=not tail)


def _check_format(header: Mapping[str, object], path: Path) -> None:
    if header.get("type") != "header":
        raise ReportError(
            f"Result file {str(path)!r} has no header: its first line should be the "
            '{"type": "header", ...} record that `randfeat eval` writes. Is this a randfeat '
            "result file?"
        )
    fmt, version = header.get("format"), header.get("format_version")
    if fmt != FORMAT or version != FORMAT_VERSION:
        old = fmt == FORMAT and isinstance(version, int) and version in _OLD_VERSIONS
        why = f" ({_OLD_VERSIONS[version]})" if old else ""  # type: ignore[index]
        raise ReportError(
            f"Result file {str(path)!r} has format {fmt!r} version {version!r}{why}; this "
            f"randfeat reads {FORMAT!r} version {FORMAT_VERSION}. Rerun `randfeat eval` with the "
            "file's settings into a new --out (or read it with the randfeat that wrote it)."
        )


def _records(parsed: _Parsed, path: Path) -> Results:
    if not parsed.records:
        raise ReportError(
            f"Result file {str(path)!r} is empty: its run wrote nothing yet (or failed before "
            "calibration ended). Rerun `randfeat eval` with the same settings."
        )
    line, first = parsed.records[0]
    _check_format(first, path)
    try:
        header = Header.from_json(first)
    except ReportError as err:
        raise ReportError(f"Result file {str(path)!r}, line {line}: {err}") from None
    rows = []
    for line, obj in parsed.records[1:]:
        try:
            rows.append(row_from_json(obj))
        except ReportError as err:
            raise ReportError(f"Result file {str(path)!r}, line {line}: {err}") from None
    return Results(header, tuple(rows))


def read_results(path: str | os.PathLike[str]) -> Results:
    """Read a result file written by `randfeat eval` (also one still being written).

    Raises:
        ReportError: the file is missing, unreadable or empty, has no header, another format
            version, a corrupt line other than a cut-off last one, or a record of the wrong shape.
    """
    p = Path(path)
    return _records(_parse(p), p)


def duplicate_rows(rows: Iterable[Row]) -> list[str]:
    """`"(image 3, defense base, attack rays, budget 20): 2 rows"` for every repeated row."""
    counts: dict[tuple[object, ...], int] = {}
    for r in rows:
        u = r.unit
        key = (r.image, u.defense, u.attack, u.budget)
        counts[key] = counts.get(key, 0) + 1
    out = []
    for (image, defense, attack, budget), n in counts.items():
        if n > 1:
            what = f"image {image}, defense {defense}"
            if attack is not None:
                what += f", attack {attack}, budget {budget}"
            out.append(f"({what}): {n} rows")
    return out


# ---------------------------------------------------------------------------- resuming
def config_differences(old: Mapping[str, object], new: Mapping[str, object]) -> list[str]:
    """`"key: file has A, this run has B"` for every result-affecting setting that differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        if k in NON_RESULT_SETTINGS:
            continue
        a, b = old.get(k, "<missing>"), new.get(k, "<missing>")
        if a != b:
            out.append(f"{k}: file has {json.dumps(a)}, this run has {json.dumps(b)}")
    return out


def complete_units(
    header: Header, batch_size: int, rows: Sequence[Row]
) -> tuple[set[Unit], list[Row]]:
    """The units whose rows are all in the file, and the rows to keep (first copy, file order).

    A unit is complete when its rows, in file order, start with the chunk's images in chunk order
    (a unit is written in one `write`; a crash can leave a prefix of one).
    """
    attacked = header.attacked_indices
    by_unit: dict[Unit, list[Row]] = {}
    for r in rows:
        by_unit.setdefault(r.unit, []).append(r)
    keep: dict[Unit, int] = {}
    for unit, rs in by_unit.items():
        c = unit.chunk
        want = list(attacked[c * batch_size : (c + 1) * batch_size]) if c >= 0 else []
        if want and [r.image for r in rs[: len(want)]] == want:
            keep[unit] = len(want)
    out = []
    for r in rows:
        if keep.get(r.unit, 0) > 0:
            out.append(r)
            keep[r.unit] -= 1
    done = {u for u in by_unit if u in keep}
    return done, out


# ---------------------------------------------------------------------------- writing
def _dumps(records: Iterable[Header | Row]) -> str:
    return "".join(
        json.dumps(r.to_json(), separators=(",", ":"), allow_nan=False) + "\n" for r in records
    )


def _fsync_write(f: IO[str], text: str) -> None:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


class ResultWriter:
    """The one writer of a result file: its lock, what is already in it, repairs and appends.

    Use as a context manager (or call `open` and `close`): entering creates the output directory,
    takes the lock and checks that the file can be written; leaving closes the file and releases
    the lock.

    Args:
        path: the result file (`--out`).

    Raises:
        ConfigError: on entering, the directory or file cannot be written.
        ResultFileBusy: on entering, another run holds the lock.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self._lock = ExclusiveLock(self.path)
        self._file: IO[str] | None = None

    def __enter__(self) -> ResultWriter:
        self.open()
        return self

    def open(self) -> None:
        """Create the output directory, take the lock, and check that the file can be written.

        Raises:
            ConfigError: the directory or file cannot be written.
            ResultFileBusy: another run holds the lock.
        """
        self._make_directory()
        try:
            self._lock.acquire()
        except OSError as err:
            raise ConfigError(f"Cannot write beside --out {str(self.path)!r}: {err}.") from err
        try:
            self._check_writable()
        except BaseException:
            self._lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file and release the lock (idempotent)."""
        try:
            if self._file is not None:
                self._file.close()
                self._file = None
        finally:
            self._lock.release()

    def _make_directory(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(
                f"Cannot create the output directory {str(self.path.parent)!r} for --out: {err}."
            ) from err

    def _check_writable(self) -> None:
        existed = self.path.exists()
        try:
            with self.path.open("a", encoding="utf-8"):
                pass
        except OSError as err:
            raise ConfigError(f"Cannot write --out {str(self.path)!r}: {err}.") from err
        if not existed:  # created with its header once the run is ready
            self.path.unlink()

    def existing(self, config: Mapping[str, object]) -> tuple[Results | None, bool]:
        """What the file holds, if it was written with `config`: `(results, needs_repair)`.

        `results` is None for a missing or empty file; `needs_repair` is True when the file does
        not end with a whole line (see the damaged-last-line rule).

        Raises:
            ConfigError: the file is not a result file, has another format version, or holds
                results of a different configuration (the message names the settings).
        """
        if not self.path.exists():
            return None, False
        parsed = _parse(self.path)
        if not parsed.records:
            return None, not parsed.clean_end
        first = parsed.records[0][1]
        if first.get("type") != "header":
            raise ConfigError(
                f"{str(self.path)!r} exists and is not a randfeat result file (its first line is "
                "no header). Choose another --out."
            )
        _check_format(first, self.path)
        old = first.get("config")
        diff = config_differences(old if isinstance(old, Mapping) else {}, config)
        if diff:
            raise ConfigError(
                f"{str(self.path)!r} holds results of a different configuration; refusing to mix "
                "them. Settings that differ:\n  "
                + "\n  ".join(diff)
                + "\nRerun with the file's settings to resume, or choose another --out."
            )
        return _records(parsed, self.path), not parsed.clean_end

    def rewrite(self, header: Header, rows: Sequence[Row]) -> None:
        """Replace the file atomically by `header` and `rows` (a crash leaves old or new)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("w", encoding="utf-8") as f:
                _fsync_write(f, _dumps([header, *rows]))
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def append(self, rows: Sequence[Row]) -> None:
        """Append the rows of one unit in one write, then `fsync`."""
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        _fsync_write(self._file, _dumps(rows))
