"""End to end on the real Fashion-MNIST files: `randfeat eval` on 20 images, and the demo.

Skipped, with the reason shown, only where Debian's `dataset-fashion-mnist` is not installed
(CI installs it). `fashion_model` trains the real CNN once per test run for all workers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _fashion_files import needs_real_files
from torch import nn

from randfeat.cli import main
from randfeat.eval.results.file import read_results
from randfeat.eval.results.records import AttackRow, CleanRow

pytestmark = needs_real_files


def test_eval_on_20_real_images(
    fashion_model: nn.Module,
    fashion_cache_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("RANDFEAT_CACHE", str(fashion_cache_dir))  # the trained CNN
    out = tmp_path / "r.jsonl"
    argv = [
        "eval", "--model", "fashion-cnn", "--data", "fashion-mnist", "--n-images", "20",
        "--defenses", "base,feature", "--target-drop", "0.02", "--attacks", "square-linf,rays",
        "--budgets", "200", "--calib-images", "200", "--calib-draws", "8", "--fresh-forwards", "10",
        "--quiet", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    res = read_results(out)
    h = res.header
    assert (h.data.name, h.data.pool_size, h.data.image_shape) == (
        "fashion-mnist",
        10000,
        (1, 28, 28),
    )
    assert (h.eps.linf, h.eps.l2, h.eps.source) == (0.1, 1.5, "fashion-mnist default")
    assert h.model.name == "fashion-cnn" and h.model.outputs == 10
    assert h.calibration["feature@0.02"].layers == ("head.pre",)
    assert h.calibration["feature@0.02"].base_accuracy >= 0.85  # 200 images of a ≥ 90% model
    clean = [r for r in res.rows if isinstance(r, CleanRow)]
    attacks = [r for r in res.rows if isinstance(r, AttackRow)]
    assert len(clean) == 20 * 2 and len(attacks) == 20 * 2 * 2
    # The undefended CNN at ℓ∞ 0.1: in 200 queries Square fools at least half of the images it
    # classifies correctly (seeded: 10 of 17; at 50 queries only 8 of 17, not a majority).
    base_square = [r for r in attacks if r.defense == "base" and r.attack == "square-linf"]
    base_correct = sum(r.correct for r in clean if r.defense == "base")
    assert base_correct >= 15  # a ≥ 90% model on 20 images
    assert 2 * sum(r.success for r in base_square) >= base_correct


def test_demo_on_fashion_mnist(
    fashion_model: nn.Module,
    fashion_cache_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("RANDFEAT_CACHE", str(fashion_cache_dir))
    argv = ["demo", "--data", "fashion-mnist", "--n-images", "10", "--budget", "20"]
    assert main([*argv, "--out", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    assert "Fashion-MNIST's 28×28 photos of clothes" in printed
    assert "fashion-cnn, a small CNN trained on Fashion-MNIST" in printed
    assert "ℓ∞ 0.1 (ℓ2 1.5; only ℓ∞ attacks run here): 26 of 255 grey levels" in printed
    assert "Clean accuracy on the 10 attacked images" in printed
    header = read_results(tmp_path / "demo" / "results.jsonl").header
    assert header.model.name == "fashion-cnn" and header.data.name == "fashion-mnist"
    assert header.defenses == ("base", "input@0.02", "feature@0.02")
