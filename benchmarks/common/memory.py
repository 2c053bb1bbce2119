"""Peak memory of a block of code, and glibc malloc tuning for steady forward timings.

`peak_memory` measures the process's peak resident set (VmHWM, reset before the block through
/proc/self/clear_refs on Linux; psutil sampling every 5 ms, or the lifetime peak, elsewhere, as
`Peak.host_how` says) and, on a GPU, `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import ctypes
import math
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["TUNED_MALLOC", "Peak", "peak_memory", "tune_malloc"]

MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 1 << 30
TUNED_MALLOC = (
    "glibc malloc tuned (mallopt: mmap threshold 32 MiB, trim threshold 1 GiB; the same as "
    f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} MALLOC_TRIM_THRESHOLD_={TRIM_THRESHOLD})"
)


def tune_malloc() -> str:
    """Keep freed blocks in glibc's heap instead of returning them to the OS.

    With glibc's defaults a forward's large intermediates (16 MiB for the digits CNN's second
    convolution at 1,024 rows) are unmapped when freed and page-faulted back, zeroed, at the next
    forward; how much of that happens drifts with the heap's state, so the same forward ran at
    6,600-9,400 rows/s from one half-second to the next here (9,400-12,500 tuned). Tuning
    both sides of a comparison the same way keeps the comparison and removes most of that noise.
    Returns what was done, for the report.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, MMAP_THRESHOLD) == 1 and libc.mallopt(-1, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        ok = False
    return TUNED_MALLOC if ok else "default malloc (not glibc: mallopt unavailable)"


def _vm_hwm_kib() -> int | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) if m else None


@dataclass
class Peak:
    """Peak memory of one phase: host resident set (MiB, and how it was measured), GPU (MiB)."""

    host_mib: float = math.nan
    host_how: str = ""
    gpu_mib: float = math.nan


@contextmanager
def peak_memory(device: torch.device) -> Iterator[Peak]:
    """Measure the peak memory of the block (see the module docstring for the methods)."""
    peak = Peak()
    sampler: threading.Thread | None = None
    stop = threading.Event()
    samples = [0.0]
    reset = False
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
        reset = _vm_hwm_kib() is not None
    except OSError:
        pass
    if not reset:
        try:
            import psutil

            proc = psutil.Process()

            def sample() -> None:
                while not stop.wait(0.005):
                    samples[0] = max(samples[0], proc.memory_info().rss / 2**20)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
        except ImportError:
            pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield peak
    finally:
        if device.type == "cuda":
            peak.gpu_mib = torch.cuda.max_memory_allocated(device) / 2**20
        if reset:
            peak.host_mib, peak.host_how = (_vm_hwm_kib() or 0) / 1024, "VmHWM"
        elif sampler is not None:
            stop.set()
            sampler.join()
            peak.host_mib, peak.host_how = samples[0], "psutil, 5 ms"
        else:
            import resource

            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak.host_mib, peak.host_how = kib / 1024, "process lifetime"
