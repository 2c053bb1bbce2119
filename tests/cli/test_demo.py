"""The demo end to end with tiny settings: real runs, files written, the table printed."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

from randfeat.cli import main
from randfeat.eval import demo
from randfeat.eval.models import DigitsCNN
from randfeat.eval.report.render import to_markdown
from randfeat.eval.report.summary import summarize
from randfeat.eval.results.file import read_results

ATTACK_COLUMNS = ["Square ℓ∞ 30", "NES ℓ∞ 30", "SignHunter ℓ∞ 30", "RayS 30", "SignFlip 30"]


@pytest.mark.slow
def test_demo_end_to_end(
    tmp_path: Path,
    digits_model: DigitsCNN,
    digits_cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("RANDFEAT_CACHE", str(digits_cache_dir))  # the fixture's trained CNN
    out = tmp_path / "demo"
    handlers = list(logging.getLogger("randfeat").handlers)
    assert main(["demo", "--n-images", "10", "--budget", "30", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert logging.getLogger("randfeat").handlers == handlers  # logging restored

    # the file is a real run of the grid: 10 images × 3 defenses × (clean + 5 attacks)
    res = read_results(out / "results.jsonl")
    header, rows = res.header.to_json(), [r.to_json() for r in res.rows]
    assert header["defenses"] == ["base", "input@0.02", "feature@0.02"]
    assert header["config"]["attacks"] == list(demo.DEMO_ATTACKS)
    assert header["config"]["budgets"] == [30]
    assert header["calibration"]["feature@0.02"]["layers"] == ["head.pre"]
    assert header["calibration"]["input@0.02"]["layers"] == ["input"]
    for cal in header["calibration"].values():
        # ≈2 points: the calibration's tolerance is ~0.1 point plus the data's resolution
        # 1 / (N_cal · draws) ≈ 1 / (530 · 38) ≈ 5e-5; 0.5 point is a loose, safe bound
        assert abs(cal["drop"] - 0.02) < 0.005
    assert len(rows) == 10 * 3 * (1 + 5) == header["rows_expected"]
    assert {r["attack"] for r in rows if r["type"] == "attack"} == set(demo.DEMO_ATTACKS)
    assert all(r["queries"] <= 30 for r in rows if r["type"] == "attack")

    # the printed table is the table of that file, with five attacks and three defenses
    table_md = to_markdown(summarize(res.header, res.rows))
    assert table_md in printed
    head = next(line for line in table_md.splitlines() if line.startswith("| Model"))
    assert [c.strip() for c in head.strip("|").split("|")][6:] == [*ATTACK_COLUMNS, "Worst case 30"]
    labels = [line.split("|")[2].strip() for line in table_md.splitlines() if line.startswith("| ")]
    assert labels == ["Defense", "Base", "Input", "Feature"]
    # it says what it does: model, ε and why, ν per defense, clean accuracy, time
    for text in ("digits-cnn", "ℓ∞ 0.2", "224×224", "ν = ", "Clean accuracy", "Demo finished"):
        assert text in printed, text
    assert "feature@0.02 square-linf budget 30" in printed  # progress from the runner

    assert (out / "results.md").read_text(encoding="utf-8") == table_md
    assert (out / "results.csv").read_text(encoding="utf-8").startswith("model,defense,")
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the JSONL's header records this run's settings, not stored figures
    assert json.loads((out / "results.jsonl").read_text().splitlines()[0])["config"]["seed"] == 0


@pytest.mark.parametrize("n", ["15", "0"])
def test_demo_rejects_unbalanced_image_counts(n: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--n-images", n, "--budget", "30"]) == 2
    assert "multiple of 10" in capsys.readouterr().err


def test_demo_rejects_bad_budget(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--n-images", "10", "--budget", "0"]) == 2
    assert "--budget" in capsys.readouterr().err
