"""`randfeat eval --target URL` against a detecting `randfeat serve` gives the figures of
`randfeat eval --detect` in process, within sampling error (real uvicorn, real HTTP)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from randfeat.cli import main
from randfeat.detect import DETECTORS
from randfeat.eval.data.loaders import digits
from randfeat.eval.results.file import read_results
from randfeat.eval.results.records import AttackRow
from randfeat.serve.config import DetectOptions

COMMON = [
    "--n-images", "20",
    "--attacks", "square-linf",
    "--budgets", "60",
    "--votes", "1",
    "--fresh-forwards", "1",
    "--seed", "0",
    "--quiet",
]  # fmt: skip


def _detected_and_robust(path: Path) -> tuple[float, float, list[AttackRow]]:
    rows = [r for r in read_results(path).rows if isinstance(r, AttackRow)]
    n = len(rows)
    detected = sum(bool(r.detection and r.detection.first_flag > 0) for r in rows) / n
    return detected, 1 - sum(r.success for r in rows) / n, rows


@pytest.mark.slow
def test_a_detecting_server_gives_the_in_process_figures(
    serve_detect: Any, digits_model: nn.Module, tmp_path: Path, capsys: Any
) -> None:
    torch.set_num_threads(1)
    local = tmp_path / "local.jsonl"
    argv = ["eval", *COMMON, "--defenses", "base", "--detect", "--detect-fpr", "0.005"]
    assert main([*argv, "--out", str(local)]) == 0
    info = read_results(local).header.detection
    assert info is not None
    # the server's detector: same rule and threshold, the same benign history stored first
    det = DETECTORS[info.name](seed=1, threshold=info.threshold)
    x = digits().x_test
    det.observe(x[torch.tensor(info.history_indices)], "benign", tag="benign")
    url = serve_detect(digits_model, det, detect=DetectOptions("reject"))
    served = tmp_path / "served.jsonl"
    assert main(["eval", "--target", url, *COMMON, "--out", str(served)]) == 0

    d_local, r_local, _ = _detected_and_robust(local)
    d_served, r_served, rows = _detected_and_robust(served)
    assert all(r.detection is not None and r.detection.seen_by == "client" for r in rows)
    # Measured: 0.95 detected / 0.95 robust, local and served. Two proportions of n = 20
    # images: SE of a difference = sqrt(2 p (1 - p) / n), p pooled, at least 1/n; allow 2 SE.
    n = 20
    for a, b in ((d_local, d_served), (r_local, r_served)):
        p = (a + b) / 2
        se = max(math.sqrt(2 * p * (1 - p) / n), 1 / n)
        assert abs(a - b) <= 2 * se, (a, b, se)
    assert d_served >= 0.5  # the server refused most attacks: the comparison is not vacuous


def test_votes_above_one_against_a_detecting_fresh_noise_server_are_refused(
    serve_detect: Any, digits_model: nn.Module, capsys: Any, tmp_path: Path
) -> None:
    import randfeat

    defended = randfeat.wrap(digits_model, ["head.pre"], nu=5.5)
    try:
        url = serve_detect(defended, DETECTORS["pooled-linf"](seed=0))
        argv = ["eval", "--target", url, "--n-images", "10", "--attacks", "square-linf"]
        assert main([*argv, "--budgets", "10", "--out", str(tmp_path / "x.jsonl")]) == 2
    finally:
        defended.unwrap()
    err = capsys.readouterr().err
    assert "detects repeated queries" in err and "Pass --votes 1" in err
    assert "Traceback" not in err
