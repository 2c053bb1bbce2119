"""The result file of ``randfeat eval``: its records and fields, writing, reading and resuming.

Written by :func:`randfeat.eval.runner.run_eval` for the protocol of Nguyen et al., "Understanding
the Robustness of Randomized Feature Defense Against Query-Based Adversarial Attacks", ICLR 2024
(§5, appendix D); read back by :func:`load_results` and :mod:`randfeat.eval.report`.

Result file (JSON Lines, UTF-8, one object per line, ``FORMAT_VERSION`` 1)
-------------------------------------------------------------------------
* Line 1: the **header** (``"type": "header"``): the fully resolved configuration (``config``:
  every setting of :class:`~randfeat.eval.config.EvalConfig`, defaults filled in), package
  versions, device, world size, the ε actually used and where it came from, the data pool, the
  attacked and calibration image indices (dataset indices, disjoint), and for every calibrated
  defense its ν with the base and defended accuracy and the achieved drop on the calibration
  images. See ``RESULT_SCHEMA["header"]``.
* Then **clean** rows (``"type": "clean"``), one per (attacked image, defense): the defense's
  prediction on the clean image (for a randomized defense, the majority of ``votes`` noisy forwards,
  :meth:`~randfeat.wrapper.RandomizedFeatureWrapper.predict`) and whether it is correct.
* And **attack** rows (``"type": "attack"``), one per (attacked image, defense, attack, budget):
  verified success, queries, the query of the first success, the uncharged verification forwards,
  the distance of the returned point and ``fresh``, the probability that a fresh majority of
  ``votes`` forwards is fooled at the returned point (exactly 0 or 1 for ``base`` and ``aaa``).

Every field is listed with its meaning in :data:`RESULT_SCHEMA`. Rows are written one *unit* at a
time: a unit is one chunk of ``batch_size`` attacked images (chunk ``c`` holds
``attacked_indices[c * batch_size:(c + 1) * batch_size]``) under one (defense, attack, budget), or
under one defense for clean rows. Only the fields in :data:`TIMING_FIELDS` vary between two runs of
the same configuration on the same device; the order of rows may differ after a resume (compare
rows as sets). Every attacked image is attacked, also one the defense misclassifies when clean
(the oracle then usually succeeds at the first query), so robust accuracy at budget ``B`` is
``1 - mean(success)`` over the rows of (defense, attack, ``B``).

Resuming: rerunning the same command on an existing file keeps every complete unit, drops rows of
incomplete units and a line cut off by a crash (rewriting the file atomically), and computes only
the missing units, so nothing is duplicated or lost. A file written with a different configuration
is refused, naming the settings that differ (:data:`NON_RESULT_SETTINGS` are not compared).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from randfeat.eval.config import ConfigError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "NON_RESULT_SETTINGS",
    "RESULT_SCHEMA",
    "TIMING_FIELDS",
    "ReportError",
    "config_differences",
    "load_results",
]

logger = logging.getLogger(__name__)

FORMAT = "randfeat-eval"
FORMAT_VERSION = 1

TIMING_FIELDS = frozenset({"seconds"})
"""Row fields that vary between identical runs (wall-clock time); exclude them when comparing."""
NON_RESULT_SETTINGS = frozenset({"quiet", "out", "device", "preset"})
"""Config settings that do not change results; not compared when resuming."""

RESULT_SCHEMA: dict[str, dict[str, str]] = {
    "header": {
        "type": '"header"',
        "format": f'"{FORMAT}"',
        "format_version": f"int, {FORMAT_VERSION}",
        "config": "object: every EvalConfig setting, resolved (lists for tuples)",
        "settings_not_compared": "list of config keys ignored when resuming",
        "versions": "object: randfeat, torch, timm, python versions",
        "device": "str: the device of rank 0 (e.g. 'cpu', 'cuda:0 (NVIDIA H100)')",
        "world_size": "int: ranks that wrote the file first",
        "created": "str: UTC time the header was written, ISO 8601",
        "eps": "object: linf, l2 (floats used) and source ('user', 'paper default', 'digits default')",
        "data": "object: name, path, pool_size, classes, image_shape [C, H, W]",
        "model": "object: name, parameters (count), image_size",
        "defenses": "list of defense names: base, aaa, input@<drop>, feature@<drop>",
        "attacks": "object: attack name -> {norm, eps, repr}",
        "calibration": (
            "object: defense name -> {kind, layers, target_drop, nu (variance), base_accuracy, "
            "accuracy, drop, n_images, draws, stopped, fast_path, seed, wall_time_s}"
        ),
        "attacked_indices": "list of int: dataset indices attacked, in chunk order",
        "calibration_indices": "list of int: dataset indices used for calibration (disjoint)",
        "n_attacked": "int",
        "n_calibration": "int",
        "n_chunks": "int: chunks of batch_size attacked images",
        "rows_expected": "int: clean + attack rows in a complete file",
    },
    "clean": {
        "type": '"clean"',
        "image": "int: dataset index",
        "label": "int: true label",
        "defense": "str",
        "pred": "int: predicted label (majority of `votes` forwards for randomized defenses)",
        "correct": "bool: pred == label",
        "chunk": "int",
        "seconds": "float: wall time of the whole unit (timing field)",
    },
    "attack": {
        "type": '"attack"',
        "image": "int: dataset index",
        "label": "int: true label",
        "defense": "str",
        "attack": "str: attack name",
        "budget": "int: queries allowed",
        "eps": "float: radius",
        "norm": '"linf" or "l2"',
        "success": "bool: verified by a majority of `votes` forwards (D.4)",
        "queries": "int: queries spent (until success, or all)",
        "success_query": "int: query count at the first verified success, -1 if none",
        "verify_forwards": "int: uncharged verification forwards",
        "fresh": "float: P(fresh majority of `votes` forwards fooled at the returned point)",
        "dist": "float: distance of the returned point from the clean image in `norm`",
        "chunk": "int",
        "seconds": "float: wall time of the whole unit (timing field)",
    },
}
"""Every record type of the result file and what each field means."""


# ---------------------------------------------------------------------------- result file
def _read_records(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """Parse the JSONL file; a cut-off or corrupt *last* line is dropped (second value True)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"Cannot read --out {str(path)!r}: {err}") from err
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    dirty = bool(tail.strip())
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            dirty = True
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError as err:
            if i == len(lines) - 1 and not tail.strip():
                dirty = True  # the last line is garbage: a crash mid-write
                break
            raise ConfigError(
                f"{str(path)!r} line {i + 1} is not valid JSON ({err}); only a damaged last line "
                "can be repaired. Move the file away or fix that line."
            ) from None
        records.append(rec)
    return records, dirty


class ReportError(ConfigError):
    """A result file that cannot be reported on (missing, empty, no header, corrupt line)."""


def load_results(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a result file written by ``randfeat eval``: ``(header, rows)``.

    A cut-off *last* line (a run that crashed or is still writing) is skipped with a warning; any
    other line that is not a JSON object is an error.

    Raises:
        ReportError: the file is missing or unreadable, empty, has no header line, a corrupt line,
            or another format version.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(
            f"Result file {str(p)!r} does not exist. Write one with `randfeat eval --out {p}`."
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"Cannot read result file {str(p)!r}: {err}") from None
    lines = text.split("\n")
    if not any(line.strip() for line in lines):
        raise ReportError(
            f"Result file {str(p)!r} is empty: its run wrote nothing yet (or failed before "
            "calibration ended). Rerun `randfeat eval` with the same settings."
        )
    last = max(i for i, line in enumerate(lines) if line.strip())
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as err:
            if i == last and not text.endswith("\n") and i > 0:
                logger.warning("%s: skipping the cut-off last line %d (%s).", p, i + 1, err)
                continue
            raise ReportError(
                f"Result file {str(p)!r}, line {i + 1}: not valid JSON ({err}). Remove or fix that "
                "line (rerunning `randfeat eval` with the same settings repairs a cut-off end)."
            ) from None
        if not isinstance(rec, dict):
            raise ReportError(
                f"Result file {str(p)!r}, line {i + 1}: expected a JSON object, but got "
                f"{type(rec).__name__}."
            )
        records.append(rec)
    header = records[0] if records else {}
    if header.get("type") != "header":
        raise ReportError(
            f"Result file {str(p)!r} has no header: its first line should be the "
            '{"type": "header", ...} record that `randfeat eval` writes, but it is '
            f"{_brief(header)}. Is this a randfeat result file?"
        )
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise ReportError(
            f"Result file {str(p)!r} has format {header.get('format')!r} version "
            f"{header.get('format_version')!r}; this randfeat reads {FORMAT!r} version "
            f"{FORMAT_VERSION}."
        )
    return header, records[1:]


def _brief(rec: Mapping[str, Any]) -> str:
    text = json.dumps(rec, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------- the table
def _unit_key(row: Mapping[str, Any]) -> tuple[Any, ...]:
    if row.get("type") == "clean":
        return ("clean", row["defense"], None, None, row["chunk"])
    return ("attack", row["defense"], row["attack"], row["budget"], row["chunk"])


def _fsync_write(f: Any, text: str) -> None:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def _dumps(records: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in records)


def _rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace ``path`` atomically by ``records`` (a crash leaves the old or the new file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # open(): the umask's permissions
    try:
        with tmp.open("w", encoding="utf-8") as f:
            _fsync_write(f, _dumps(records))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_out(path: Path) -> None:
    """Create the output directory and make sure the file can be written (a new file is removed
    again: it is created atomically with its header once the run is ready)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"Cannot create the output directory {str(path.parent)!r} for --out: {err}."
        ) from err
    existed = path.exists()
    try:
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as err:
        raise ConfigError(f"Cannot write --out {str(path)!r}: {err}.") from err
    if not existed:
        path.unlink()


# ---------------------------------------------------------------------------- resuming
def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"key: file has A, this run has B"`` for every result-affecting setting that differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        if k in NON_RESULT_SETTINGS:
            continue
        a, b = old.get(k, "<missing>"), new.get(k, "<missing>")
        if a != b:
            out.append(f"{k}: file has {json.dumps(a)}, this run has {json.dumps(b)}")
    return out


def _check_existing(path: Path, new_cfg: Mapping[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """Records of an existing result file (``[]`` if new/empty), refusing a foreign or mismatched one."""
    if not path.exists():
        return [], False
    records, damaged = _read_records(path)
    if not records:
        return [], damaged
    old = records[0]
    if old.get("type") != "header":
        raise ConfigError(
            f"{str(path)!r} exists and is not a randfeat result file (its first line is no "
            "header). Choose another --out."
        )
    if old.get("format") != FORMAT or old.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{str(path)!r} has format {old.get('format')!r} v{old.get('format_version')}; "
            f"this randfeat writes {FORMAT!r} v{FORMAT_VERSION}. Choose another --out."
        )
    diff = config_differences(old.get("config", {}), new_cfg)
    if diff:
        raise ConfigError(
            f"{str(path)!r} holds results of a different configuration; refusing to mix them. "
            "Settings that differ:\n  "
            + "\n  ".join(diff)
            + "\nRerun with the file's settings to resume, or choose another --out."
        )
    return records, damaged


def _complete_units(
    header: Mapping[str, Any], batch_size: int, rows: list[dict[str, Any]]
) -> tuple[set[tuple[Any, ...]], list[dict[str, Any]]]:
    """The units whose rows are all in the file, and the rows to keep (first copy, file order).

    A unit is complete when its rows, in file order, start with the chunk's images in chunk order
    (units are written with one ``write``; a crash can leave a prefix of one).
    """
    attacked = header["attacked_indices"]
    by_unit: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        key = _safe_key(r)
        if key is not None:
            by_unit.setdefault(key, []).append(r)
    keep: dict[tuple[Any, ...], int] = {}
    for key, rs in by_unit.items():
        c = key[4]
        want = attacked[c * batch_size : (c + 1) * batch_size] if isinstance(c, int) else []
        if want and [r.get("image") for r in rs[: len(want)]] == want:
            keep[key] = len(want)
    out = []
    for r in rows:
        key = _safe_key(r)
        if key is not None and keep.get(key, 0) > 0:
            out.append(r)
            keep[key] -= 1
    done = {k for k in by_unit if k in keep}
    return done, out


def _safe_key(row: Mapping[str, Any]) -> tuple[Any, ...] | None:
    try:
        return _unit_key(row)
    except (KeyError, TypeError):
        return None
