"""Describe the machine a benchmark ran on; replace a section of `docs/benchmarks.md`."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

__all__ = ["DOC", "ROOT", "describe_machine", "replace_section"]

ROOT = Path(__file__).resolve().parents[2]
"""The repository root (the scripts are run from there)."""
DOC = ROOT / "docs" / "benchmarks.md"


def describe_machine(device: torch.device | None = None) -> str:
    """CPU model, core count, torch version and threads, plus the GPU name when on CUDA."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [
        f"{cpu}, {os.cpu_count()} cores",
        f"torch {torch.__version__}",
        f"{torch.get_num_threads()} threads",
    ]
    if device is not None and device.type == "cuda":
        parts.insert(0, torch.cuda.get_device_name(device))
    return "; ".join(parts)


def replace_section(title: str, body: str, device: torch.device | None = None) -> None:
    """Replace (or append) the `## <title>` section of docs/benchmarks.md.

    CPU and GPU results live in separate sections (`<title> (CPU)` / `<title> (GPU)`).
    """
    kind = "GPU" if device is not None and device.type == "cuda" else "CPU"
    head = f"## {title} ({kind})"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(head)}\n.*?(?=^## |\Z)", re.S | re.M)
    block = f"{head}\n\n{body.strip()}\n\n"
    text = pattern.sub(block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    DOC.write_text(text)
