"""What the benchmark scripts measure with: `sync`, a counting model wrapper, timers, a profiler.

[Counting] wraps a model and counts the images that go through real forwards (and the time inside
the model), so that "budget" means the same for every implementation and a script can count
every forward of an evaluation; `profile_outside_model` lists where an attack's time outside the
model goes (cProfile, the model's share removed).
"""

from __future__ import annotations

import contextlib
import cProfile
import pstats
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Counting", "forward_times", "log", "profile_outside_model", "sync", "timed"]


def sync(device: torch.device) -> None:
    """Wait for the work queued on `device` (a CUDA device; nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Counting(nn.Module):
    """Wrap a model; count the images sent through real forwards and the time spent inside it.

    `rows` counts every image of every forward and `calls` the forwards; `seconds` is the time
    inside the model (with `device` given, each forward waits for that device, so that the time
    is the model's on a GPU too). Inputs are cast to float32 (the models here are float32; ART's
    HopSkipJump sends float64). Forwards made while `image()` is open are also charged to that
    image (`per_image`); the others are batch forwards (`shared`). `full_times` holds the time of
    every forward of exactly `full` images (when set), and `strided` counts inputs that were not
    contiguous.

    Args:
        model: the model, an `nn.Module` (registered, so `.eval()` reaches it) or any callable
            from images to scores (e.g. a `randfeat.eval.forward.Forward`).
        device: wait for this device after each forward (`sync`); `None` waits for nothing.
    """

    def __init__(
        self, model: Callable[[Tensor], Tensor], device: torch.device | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.device = device
        self.reset(0)

    def reset(self, n: int) -> None:
        """Zero every count, with `n` images for `per_image`."""
        self.rows = 0
        self.calls = 0
        self.seconds = 0.0
        self.shared = 0
        self.per_image = [0] * n
        self.current: int | None = None
        self._next = 0
        self.full: int | None = None
        self.full_times: list[float] = []
        self.strided = 0

    @contextlib.contextmanager
    def image(self) -> Iterator[None]:
        """Charge the forwards inside the block to the next image (sequential attacks)."""
        self.current = self._next
        self._next += 1
        try:
            yield
        finally:
            self.current = None

    def forward(self, x: Tensor) -> Tensor:
        t0 = time.perf_counter()
        if x.dtype != torch.float32:  # ART's HopSkipJump interpolates in float64
            x = x.float()
        out = self.model(x)
        if self.device is not None:
            sync(self.device)
        dt = time.perf_counter() - t0
        self.seconds += dt
        n = int(x.shape[0])
        if n == self.full:
            self.full_times.append(dt)
        if not x.is_contiguous():
            self.strided += 1
        self.rows += n
        self.calls += 1
        if self.current is None:
            self.shared += n
        else:
            self.per_image[self.current] += n
        return out


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """`fn()` and its wall time in seconds."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def forward_times(model: nn.Module, x: Tensor, reps: int) -> list[float]:
    """Wall times of `reps` forwards of `x` (no grad)."""
    ts = []
    with torch.no_grad():
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x)
            ts.append(time.perf_counter() - t0)
    return ts


_MODEL_FILES = ("/torch/nn/", "/timm/")


def _is_model(func: tuple[str, int, str]) -> bool:
    """Whether a profiled function belongs to the model (torch.nn / timm, or Counting.forward)."""
    fname, _, name = func
    if any(k in fname for k in _MODEL_FILES):
        return True
    return fname == __file__ and name == "forward"  # Counting.forward


def _short(func: tuple[str, int, str]) -> str:
    fname, line, name = func
    if fname == "~":
        return name.strip("<>").replace("built-in method ", "").replace("method ", ".")
    return f"{fname.rsplit('/', 1)[-1]}:{line}({name})"


def profile_outside_model(fn: Callable[[], Any], top: int = 18) -> str:
    """cProfile `fn` and list where the time *outside the model* goes.

    Every function's own time is attributed to its callers (cProfile records that split); time
    of model functions, and of anything a model function calls (e.g. `torch.conv2d` from
    `conv.py`), is dropped. Built-ins are listed with the caller they were called from.
    """
    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    spent: dict[str, list[float]] = {}
    model = 0.0
    for func, (_, _, tt, _, callers) in stats.items():
        if _is_model(func):
            model += tt
            continue
        parts = callers.items() if callers else [(None, (0, 0, tt, 0))]
        for caller, (_, nc, ctt, _) in parts:
            if caller is not None and _is_model(caller):
                model += ctt
                continue
            key = _short(func)
            if func[0] == "~" and caller is not None:
                key += f" ← {_short(caller)}"
            acc = spent.setdefault(key, [0.0, 0.0])
            acc[0] += ctt
            acc[1] += nc
    outside = sum(v[0] for v in spent.values())
    lines = [
        f"profiled run: wall {wall:.2f} s (with profiler overhead); model {model:.2f} s; "
        f"outside the model {outside:.2f} s, of which:",
        f"{'own s':>8} {'calls':>8}  function (← caller for built-ins)",
    ]
    for key, (tt, nc) in sorted(spent.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{tt:8.3f} {int(nc):8d}  {key}")
    return "\n".join(lines)


def log(msg: str) -> None:
    """Print `msg` with the time of day, flushed (progress lines of a long run)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
