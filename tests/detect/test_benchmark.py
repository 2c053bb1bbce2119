"""`benchmarks/detect.py --quick` runs end to end on tiny data (a smoke test of the script)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
QUICK = ("--quick", "--no-write", "--untrained")

FILES = {
    "train-images-idx3-ubyte": (400, 28, 28),
    "train-labels-idx1-ubyte": (400,),
    "t10k-images-idx3-ubyte": (300, 28, 28),
    "t10k-labels-idx1-ubyte": (300,),
}


def write_tiny_fashion(folder: Path) -> None:
    """Four IDX files of random images and labels (the format: magic, sizes, bytes)."""
    gen = torch.Generator().manual_seed(0)
    for name, shape in FILES.items():
        high = 10 if len(shape) == 1 else 256
        data = torch.randint(0, high, shape, generator=gen, dtype=torch.uint8)
        head = bytes([0, 0, 8, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)
        (folder / name).write_bytes(head + bytes(data.flatten().tolist()))


@pytest.mark.slow
def test_the_quick_benchmark_prints_every_table(tmp_path: Path) -> None:
    write_tiny_fashion(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "detect.py"), *QUICK, "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for heading in ("Benign false positives", "Detection", "Cost", "Stores", "Memory"):
        assert f"**{heading}**" in out
    for row in ("| square-linf |", "| nes-linf |", "| signflip |", "| 3×224×224 |", "| sqlite |"):
        assert row in out
