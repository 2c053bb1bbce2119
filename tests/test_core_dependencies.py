"""The core (wrap, calibrate_nu, the theory, hooks, outputs) runs with torch alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

SCRIPT = """
import sys
for name in ("numpy", "timm", "onnx", "onnxruntime", "transformers", "sklearn", "tqdm"):
    sys.modules[name] = None  # importing any of them now fails
import torch
from torch import nn
import randfeat, randfeat.hooks, randfeat.outputs, randfeat.theory, randfeat.export

model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)).eval()
x = torch.randn(300, 2)
y = model(x).argmax(1)
randfeat.wrap(model, nu=0.1)(x)
randfeat.calibrate_nu(model, (x, y), target_drop=0.05, seed=0, progress=False)
randfeat.theorem1_fooling_probability(model, x[:3], y[:3], nu=0.1, mu=0.01)
try:
    randfeat.export.OnnxDefended("model.onnx")
except ImportError as e:
    assert "randfeat[onnx]" in str(e), e
else:
    raise AssertionError("OnnxDefended ran without onnxruntime")
print("core ok")
"""


def test_the_core_needs_neither_numpy_nor_timm_nor_any_extra() -> None:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "core ok" in done.stdout
