"""The scripts in examples/ run (with small settings), so they never rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_serve_and_attack_prints_the_demo_table_over_http(
    digits_model: Any, digits_cache_dir: Path
) -> None:
    env = {**os.environ, "RANDFEAT_CACHE": str(digits_cache_dir), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(sys.path)}  # fmt: skip
    cmd = [sys.executable, str(ROOT / "examples" / "serve_and_attack.py"), "--n-images", "10",
           "--budget", "20", "--attacks", "square-linf,rays"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout
    rows = [line for line in table.splitlines() if line.startswith("| digits-cnn") or "| Base" in line
            or "| Input" in line or "| Feature" in line]  # fmt: skip
    for label in ("Base", "Input", "Feature"):
        assert any(f"| {label}" in r for r in rows), table
    assert "Square" in table and "RayS" in table, table
