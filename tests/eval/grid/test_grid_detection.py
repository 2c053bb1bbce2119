"""`randfeat eval --detect`: a stateful detector in front of every defense, in process.

One small run on the digits (10 images, Square ℓ∞ and its adaptive variant, budget 60, votes 3,
threshold calibrated to 0.5%: the digits' 540 test images leave too few for 0.1%) is shared by
the tests that read its file; the config tests spend no model work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from randfeat.cli import main
from randfeat.detect import DETECTORS
from randfeat.eval.errors import ConfigError
from randfeat.eval.grid.config import EvalConfig
from randfeat.eval.grid.runner import run_eval
from randfeat.eval.guarded import Guarded
from randfeat.eval.oracle import Oracle
from randfeat.eval.report.summary import summarize
from randfeat.eval.results.file import read_results
from randfeat.eval.results.records import AttackRow
from randfeat.eval.workloads import WORKLOADS

ARGS = [
    "--n-images", "10",
    "--batch-size", "5",
    "--defenses", "base,keyed",
    "--target-drop", "0.05",
    "--attacks", "square-linf,adaptive-square-linf",
    "--budgets", "60",
    "--votes", "3",
    "--calib-draws", "4",
    "--fresh-forwards", "5",
    "--detect",
    "--detect-fpr", "0.005",
    "--seed", "0",
    "--quiet",
]  # fmt: skip


def _run(tmp: Path, *extra: str) -> Path:
    out = tmp / "det.jsonl"
    torch.set_num_threads(1)
    assert main(["eval", *ARGS, *extra, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def rejected(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory.mktemp("reject"))


def _attack_rows(path: Path) -> list[AttackRow]:
    return [r for r in read_results(path).rows if isinstance(r, AttackRow)]


def test_header_holds_the_calibrated_detector_and_every_workload(rejected: Path) -> None:
    header = read_results(rejected).header
    d = header.detection
    assert d is not None and d.name == "pooled-linf" and d.on_detect == "reject"
    assert d.target_fpr == 0.005 and d.threshold > 0
    history, work, attacked = (
        set(d.history_indices),
        set(d.workload_indices),
        set(header.attacked_indices),
    )
    assert not (history & work) and not (history & attacked) and not (work & attacked)
    assert len(history) >= 200  # 1 / 0.005 images at least
    assert set(d.workloads) == set(WORKLOADS)
    # the retrying client sends exact duplicates: the detector flags most of its queries
    retry = d.workloads["retry"]
    assert retry.flagged >= retry.queries // 2 and retry.first_flag >= 2
    assert "threshold" in json.loads(rejected.read_text().splitlines()[0])["detection"]


def test_plain_square_ends_at_its_first_refusal_and_pays_for_it(rejected: Path) -> None:
    rows = [r for r in _attack_rows(rejected) if r.attack == "square-linf" and r.defense == "base"]
    assert len(rows) == 10 and all(r.detection is not None for r in rows)
    for r in rows:
        d = r.detection
        assert d is not None
        if d.first_flag > 0:
            # the refused query is charged: the attack stopped at it, its queries include it
            assert d.refused and d.rejected >= 1 and r.queries == d.first_flag
            assert not r.success or r.success_query < d.first_flag
        else:  # never flagged: fooled (Square stops at its success) or the budget was spent
            assert r.success or r.queries == 60
    assert sum(r.detection.first_flag > 0 for r in rows if r.detection) >= 8


def test_adaptive_square_adapts_to_the_detector(rejected: Path) -> None:
    """Feng et al.'s adaptation, measured on this seeded run (base model, budget 60): plain
    Square is flagged on 9 of 10 images and fools 1; the adaptive Square, whose searches keep
    its probes apart, is flagged on none and fools 6."""
    rows = [r for r in _attack_rows(rejected) if r.defense == "base"]

    def detected_and_fooled(attack: str) -> tuple[int, int]:
        mine = [r for r in rows if r.attack == attack]
        return sum(bool(r.detection and r.detection.first_flag > 0) for r in mine), sum(
            r.success for r in mine
        )

    plain, adaptive = (
        detected_and_fooled("square-linf"),
        detected_and_fooled("adaptive-square-linf"),
    )
    assert plain[0] >= 8 and adaptive[0] <= 2
    assert adaptive[1] >= plain[1] + 3


def test_report_shows_detection_and_the_workloads(rejected: Path) -> None:
    res = read_results(rejected)
    table = summarize(res.header, res.rows)
    cell = table.rows[0].cells[("square-linf", 60)]
    assert cell.detection is not None and cell.detection.detected >= 0.8
    assert any("Benign false positives per workload" in line for line in table.legend)
    assert main(["report", str(rejected)]) == 0
    text = rejected.with_suffix(".md").read_text()
    assert "Query detection: detected (%)" in text and "re-upload" in text


def test_keyed_defense_takes_the_feature_calibration(rejected: Path) -> None:
    header = read_results(rejected).header
    cal = header.calibration["keyed@0.05"]
    assert cal.kind == "keyed" and cal.layers == ("head.pre",) and cal.nu > 0


def test_log_answers_flagged_queries_and_counts_them(tmp_path: Path) -> None:
    out = _run(tmp_path, "--on-detect", "log", "--attacks", "square-linf", "--defenses", "base")
    rows = _attack_rows(out)
    flagged = [r for r in rows if r.detection and r.detection.flagged]
    assert flagged and all(r.detection and r.detection.rejected == 0 for r in rows)
    # answered: the attack went on past its first flag
    assert any(r.detection and r.queries > r.detection.first_flag for r in flagged)


def test_verification_bypasses_the_detector() -> None:
    """The D.4 votes are the evaluator's forwards: nine repeats of a point must not reach the
    detector (they would be refused as duplicates and end the attack)."""
    torch.manual_seed(0)
    x = torch.rand(1, 1, 8, 8)
    y = torch.tensor([1])
    guard = Guarded(lambda z: torch.zeros(z.shape[0], 2), DETECTORS["pooled-linf"](seed=0))
    oracle = Oracle(guard, x, y, budget=5, eps=0.1, norm="linf", votes=9)
    oracle.scores(x, torch.tensor([0]))  # misclassified (a tie goes to class 0): verified
    assert bool(oracle.success[0]) and int(oracle.verify_forwards[0]) == 9
    assert guard.stats.queries == 1 and guard.stats.flagged == 0


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"detect": "blacklite"}, "Unknown detector 'blacklite'. Did you mean 'blacklight'"),
        ({"detect_fpr": 0.01}, "--detect-fpr sets the query detector: add --detect"),
        ({"detect": "pooled-linf", "detect_fpr": 0.9}, r"detect_fpr. in \(0, 0.5\]"),
        ({"detect": "pooled-linf", "on_detect": "block"}, "Unknown on_detect action 'block'"),
        ({"detect": "pooled-linf", "ban_after": 3}, "--ban-after applies to --on-detect ban"),
        ({"detect": "pooled-linf", "accounts": 0}, "`accounts` to be an int >= 1"),
        (
            {"detect": "pooled-linf", "target": "http://127.0.0.1:9"},
            "with --target the server detects, not the client",
        ),
    ],
)
def test_bad_detection_settings_are_refused_before_any_work(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        EvalConfig.from_mapping(values)


def test_too_few_benign_images_for_the_rate_names_the_fix(tmp_path: Path) -> None:
    cfg = EvalConfig.from_mapping(
        {
            "n_images": 10,
            "defenses": "base",
            "attacks": "square-linf",
            "budgets": "10",
            "detect": "pooled-linf",
            "detect_fpr": 0.001,
            "quiet": True,
            "out": str(tmp_path / "x.jsonl"),
        }
    )
    with pytest.raises(ConfigError, match=r"needs at least 1 / fpr = 1000 benign images.*Raise"):
        run_eval(cfg)
