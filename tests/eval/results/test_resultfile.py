"""Tests for the result file: one writer at a time, repeated rows, the damaged-last-line rule.

Resuming after SIGKILL, torchrun and the configuration diff run through `randfeat eval` in
`tests/eval/grid/test_runner.py`; here are the rules of `randfeat.eval.results.file` on their own, and
the lock tried as a user would: the same command started twice on the same file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from torch import nn

from randfeat.cli import main
from randfeat.eval.errors import ReportError, ResultFileBusy
from randfeat.eval.lock import ExclusiveLock, lock_path
from randfeat.eval.results.file import FORMAT_VERSION, ResultWriter, duplicate_rows, read_results
from randfeat.eval.results.records import AttackRow, CleanRow, Header

HOLD = """
import sys, time
from pathlib import Path
from randfeat.eval.lock import ExclusiveLock
lock = ExclusiveLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process that holds the lock of `tmp_path / "r.jsonl"`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "r.jsonl")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_a_held_lock_stops_a_second_writer(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    path = tmp_path / "r.jsonl"
    with pytest.raises(ResultFileBusy) as err:
        ResultWriter(path).open()
    msg = str(err.value)
    assert str(path) in msg and f"pid {holder.pid}" in msg and "r.jsonl.lock" in msg
    assert not path.exists()  # refused before touching the result file
    # the holder dies without cleaning up: its lock goes with it, the stale file does not matter
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock_path(path).exists()
    with ResultWriter(path):
        assert lock_path(path).read_text().strip() == str(os.getpid())
    assert not lock_path(path).exists()  # removed on release


def test_the_lock_is_released_on_an_error(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with pytest.raises(RuntimeError), ExclusiveLock(path):
        raise RuntimeError("a crash inside the run")
    with ExclusiveLock(path):  # free again
        pass


@pytest.fixture
def cache_env(digits_model: nn.Module, digits_cache_dir: Path) -> dict[str, str]:
    del digits_model  # trained into digits_cache_dir by the fixture
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "RANDFEAT_CACHE": str(digits_cache_dir),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }


def test_the_same_command_twice_on_one_file(
    tmp_path: Path,
    cache_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A user relaunches a run that is still going: the second one stops, the file stays whole."""
    out = tmp_path / "r.jsonl"
    args = [
        "eval", "--n-images", "10", "--batch-size", "5", "--defenses", "base,feature",
        "--target-drop", "0.05", "--calib-images", "50", "--calib-draws", "4",
        "--attacks", "square-linf,rays", "--budgets", "20", "--votes", "3", "--quiet",
        "--out", str(out),
    ]  # fmt: skip
    first = subprocess.Popen(
        [sys.executable, "-m", "randfeat", *args], env=cache_env, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not lock_path(out).exists() or not lock_path(out).read_text().strip():
            assert first.poll() is None, first.communicate()[1].decode()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        monkeypatch.setenv("RANDFEAT_CACHE", cache_env["RANDFEAT_CACHE"])
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{str(out)!r} is being written by another run (pid {first.pid}" in err
        assert "Traceback" not in err
        _, first_err = first.communicate(timeout=600)
        assert first.returncode == 0, first_err.decode()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    res = read_results(out)
    assert duplicate_rows(res.rows) == []
    assert len(res.rows) == res.header.rows_expected == 10 * 2 * (1 + 2)
    assert not lock_path(out).exists()


def test_duplicate_rows_are_named() -> None:
    clean = CleanRow(7, 1, "base", 1, 0, 0, 0.1)
    attack = AttackRow(7, 1, "base", "rays", 20, 0.2, "linf", False, 20, -1, 0, 0.0, 0.2, 0, 1.0)
    other = AttackRow(7, 1, "base", "rays", 50, 0.2, "linf", False, 50, -1, 0, 0.0, 0.2, 0, 1.0)
    assert duplicate_rows([clean, attack, other]) == []
    assert duplicate_rows([clean, attack, attack, other, clean, attack]) == [
        "(image 7, defense base): 2 rows",
        "(image 7, defense base, attack rays, budget 20): 3 rows",
    ]


def test_the_damaged_last_line_rule(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, sample_header: Header
) -> None:
    """Only a last line without its newline is an unfinished write; the reader and the writer
    apply the same rule."""
    row = CleanRow(7, 1, "base", 1, 0, 0, 0.1)
    header_line = json.dumps(sample_header.to_json())
    path = tmp_path / "r.jsonl"
    whole = header_line + "\n" + json.dumps(row.to_json()) + "\n"
    path.write_text(whole + json.dumps(row.to_json())[:20])
    assert read_results(path).rows == (row,)
    assert "cut-off last line 3" in caplog.text
    existing, needs_repair = ResultWriter(path).existing(json.loads(header_line)["config"])
    assert existing is not None and existing.rows == (row,) and needs_repair
    # a whole last line that is not a record is corruption, not a crash: refused by both
    path.write_text(whole + "{oops\n")
    with pytest.raises(ReportError, match="line 3: not valid JSON"):
        read_results(path)
    with pytest.raises(ReportError, match="line 3: not valid JSON"):
        ResultWriter(path).existing(json.loads(header_line)["config"])


def test_format_version_1_is_refused_with_the_fix(tmp_path: Path, sample_header: Header) -> None:
    """Version 1 recorded the plurality vote of the clean images; its rows cannot be re-judged."""
    old = {**sample_header.to_json(), "format_version": 1}
    clean_v1 = {"type": "clean", "image": 3, "label": 1, "defense": "base", "pred": 1}
    path = tmp_path / "v1.jsonl"
    path.write_text(json.dumps(old) + "\n" + json.dumps({**clean_v1, "correct": True}) + "\n")
    for read in (read_results, lambda p: ResultWriter(p).existing(old["config"])):
        with pytest.raises(ReportError) as err:
            read(path)
        msg = str(err.value)
        assert "version 1 (version 1 judged clean images by a plurality of votes" in msg
        assert f"reads 'randfeat-eval' version {FORMAT_VERSION}" in msg
        assert "Rerun `randfeat eval`" in msg


def test_format_version_2_is_refused_with_the_fix(tmp_path: Path, sample_header: Header) -> None:
    """Version 2 predates query detection: refused with the fix, as every older layout is."""
    old = {**sample_header.to_json(), "format_version": 2}
    path = tmp_path / "v2.jsonl"
    path.write_text(json.dumps(old) + "\n")
    with pytest.raises(ReportError, match=r"version 2 predates query detection.*Rerun"):
        read_results(path)
