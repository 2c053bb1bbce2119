"""Stateful query detection (`randfeat.detect`) on Fashion-MNIST: the targets of issue 22.

Measured for our default detector (`pooled-linf`) and the Blacklight port, in one run:

1. **Benign false positives.** Each detector's threshold is calibrated (`calibrate`, target 0.1%)
   on training images 5,000-14,999; then 5,000 other training images (0-4,999) are observed, and
   the 10,000 test images are streamed in order: the share flagged. Blacklight also at its
   paper's threshold, 25.
2. **Detection on attack traces.** Square, NES, SignHunter, RayS and SignFlip (ℓ∞, ε = 0.1,
   1,000 queries, votes = 1: the attacker stops at its first apparent success) on the first 100
   correctly classified test images, against the embedded Fashion CNN undefended and with
   feature noise calibrated to a 2-point drop. Every row the oracle sends to the model is
   recorded (the oracle is the attack's only door to the model); each trace is then replayed,
   in its batches, into a detector that already holds the 5,000 benign images (tagged
   `benign`). Per attack: the images on which the attack sent more than 2 queries, the share of
   them flagged, the median queries to the first flag, and how many flagged queries matched the
   attack's own earlier query or a stored benign image.
3. **Cost.** µs per image (fingerprint + lookup + store, batches of 100, one thread, 5,000
   images already stored) at 28×28, 3×32×32 and 3×224×224 (Fashion images, resized); SHA-256
   per window (the official code's hash, `hashlib`) for comparison; a timm resnet18 forward per
   image at 3×32×32.
4. **Stores.** Observations of one image per call (lookups/s, p99 latency) and of batches of
   100 (images/s) on `memory`, `sqlite:PATH` and `redis://` (a `redis-server` started here),
   each holding 10,000 images.
5. **Memory.** Bytes per stored query with 1,000,000 stored in the memory store (its tensors and
   the process's resident memory), and with 100,000 in SQLite (the file) and Redis
   (`used_memory`).

Usage:

    OMP_NUM_THREADS=1 nice python benchmarks/detect.py            # ~1-2 h; docs/benchmarks.md
    python benchmarks/detect.py --quick --no-write                # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from common.machine import describe_machine, replace_section
from common.measure import log
from torch import Tensor, nn

import randfeat
from randfeat.detect import DEFAULT, DETECTORS, Detector
from randfeat.eval import ATTACKS
from randfeat.eval.data.loaders import fashion_mnist
from randfeat.eval.models.fashion import FashionCNN, fashion_cnn

ATTACK_NAMES = ("square-linf", "nes-linf", "signhunter-linf", "rays", "signflip")
BENIGN = "benign"


@dataclass(frozen=True)
class Scale:
    images: int = 100
    budget: int = 1000
    warm: int = 5000
    calib: int = 10000
    fpr: float = 1e-3
    test: int = 10000
    cost_stored: int = 5000
    cost_images: int = 1000
    store_prefill: int = 10000
    store_calls: int = 1000
    fill: int = 1_000_000
    store_fill: int = 100_000
    calib_nu: int = 1000


FULL = Scale()
QUICK = Scale(images=2, budget=40, warm=100, calib=200, fpr=1e-2, test=200, cost_stored=50, cost_images=50, store_prefill=200, store_calls=30, fill=2000, store_fill=1000, calib_nu=200)  # fmt: skip


# ----------------------------------------------------------------------------- the detectors
@dataclass
class Rule:
    """A detector at a threshold, as reported: Blacklight is reported at two thresholds."""

    label: str
    detector: str  # key of the detectors dict (one replay serves every threshold)
    threshold: float


def detectors(calib: Tensor, fpr: float) -> tuple[dict[str, Detector], list[Rule]]:
    """Ours and Blacklight, each calibrated on `calib` to `fpr`; Blacklight also at 25."""
    dets = {"ours": DETECTORS[DEFAULT](seed=0), "blacklight": DETECTORS["blacklight"](seed=0)}
    rules = []
    for key, det in dets.items():
        t0 = time.perf_counter()
        det.calibrate(calib, fpr)
        log(f"{key}: threshold {det.threshold:g} ({time.perf_counter() - t0:.0f} s)")
        rules.append(Rule(f"{det.name} (calibrated, {det.threshold:g})", key, det.threshold))
    rules.append(Rule("blacklight (paper, 25)", "blacklight", 25.0))
    return dets, rules


def warmed(det: Detector, warm: Tensor) -> Detector:
    """A copy of `det` (same key and threshold) whose memory store holds `warm`, tagged benign."""
    out = copy.deepcopy(det)
    out.clear()
    for i in range(0, warm.shape[0], 500):
        out.observe(warm[i : i + 500], BENIGN, tag=BENIGN)
    return out


# ----------------------------------------------------------------------------- 1. benign
def benign_fpr(bases: dict[str, Detector], rules: list[Rule], test: Tensor) -> dict[str, str]:
    scores = {}
    for key, base in bases.items():
        det = copy.deepcopy(base)
        scores[key] = torch.cat(
            [det.observe(test[i : i + 100], BENIGN).score for i in range(0, test.shape[0], 100)]
        )
    out = {}
    for r in rules:
        flagged = int((scores[r.detector] > r.threshold).sum())
        out[r.label] = f"{100 * flagged / test.shape[0]:.2f}% ({flagged} of {test.shape[0]})"
    return out


# ----------------------------------------------------------------------------- 2. traces
class Recorder:
    """The model as the oracle sees it, keeping every batch of rows the oracle sends."""

    def __init__(self, model: Callable[[Tensor], Tensor]) -> None:
        self.model = model
        self.batches: list[Tensor] = []

    def __call__(self, x: Tensor) -> Tensor:
        self.batches.append(x.detach().clone())
        with torch.no_grad():
            return self.model(x)


@dataclass
class Tally:
    """One detector rule on one attack: images, detections, first-flag queries, flag sources."""

    images: int = 0  # images on which the attack sent more than 2 queries
    detected: int = 0
    first: list[int] = field(default_factory=list)
    own: int = 0  # flagged queries whose closest earlier query was the attack's own
    benign: int = 0  # ... a stored benign image
    queries: int = 0

    def row(self) -> str:
        rate = 100 * self.detected / max(1, self.images)
        med = statistics.median(self.first) if self.first else float("nan")
        return f"{self.detected}/{self.images} ({rate:.0f}%) · {med:g} · {self.own} / {self.benign}"


def replay(base: Detector, trace: list[Tensor]) -> tuple[Tensor, list[bool]]:
    """Scores of every traced query, and whether its match was a stored benign image."""
    det = copy.deepcopy(base)
    scores, benign = [], []
    for batch in trace:
        v = det.observe(batch, "attacker")
        scores.append(v.score)
        benign += [t == BENIGN for t in v.match_tag]
    return torch.cat(scores), benign


def attack_traces(
    scale: Scale,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    bases: dict[str, Detector],
    rules: list[Rule],
) -> dict[str, dict[str, Tally]]:
    tallies: dict[str, dict[str, Tally]] = {}
    for attack in ATTACK_NAMES:
        per = tallies[attack] = {r.label: Tally() for r in rules}
        t0 = time.perf_counter()
        for i in range(x.shape[0]):
            rec = Recorder(model)
            ATTACKS[attack](0.1).run(rec, x[i : i + 1], y[i : i + 1], scale.budget, votes=1, seed=i)
            n = sum(b.shape[0] for b in rec.batches)
            if n <= 2:
                continue
            replays = {key: replay(base, rec.batches) for key, base in bases.items()}
            for r in rules:
                scores, benign = replays[r.detector]
                flagged = (scores > r.threshold).tolist()
                t = per[r.label]
                t.images += 1
                t.queries += n
                if any(flagged):
                    t.detected += 1
                    t.first.append(flagged.index(True) + 1)
                t.own += sum(f and not b for f, b in zip(flagged, benign, strict=True))
                t.benign += sum(f and b for f, b in zip(flagged, benign, strict=True))
        log(f"{attack}: {x.shape[0]} images in {time.perf_counter() - t0:.0f} s")
    return tallies


def defended(model: nn.Module, x: Tensor, y: Tensor) -> tuple[nn.Module, float]:
    cal = randfeat.calibrate_nu(model, (x, y), target_drop=0.02, seed=0, progress=False)
    return randfeat.wrap(model, **cal.wrap_kwargs(), seed=0).eval(), float(cal.nu)


# ----------------------------------------------------------------------------- 3. cost
def images_of(base: Tensor, shape: tuple[int, int, int]) -> Tensor:
    c, h, w = shape
    x = base.repeat(1, c, 1, 1)
    return x if (h, w) == tuple(x.shape[2:]) else F.interpolate(x, size=(h, w), mode="bilinear")


def in_batches(fn: Callable[[Tensor], object], x: Tensor) -> Callable[[], None]:
    """`fn` over `x` in batches of 100."""

    def run() -> None:
        for i in range(0, x.shape[0], 100):
            fn(x[i : i + 100])

    return run


def per_image_us(fn: Callable[[], object], images: int, reps: int = 1) -> float:
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1e6 * best / images


def sha256_windows_us(x: Tensor, window: int = 20) -> float:
    """The official code's hashing: SHA-256 of each window of int16 values (one process)."""
    levels = torch.round(x.flatten(1).double() * 255 / 50).short()
    t0 = time.perf_counter()
    for row in levels:
        raw = row.numpy().tobytes()
        for j in range(row.numel() - window + 1):
            hashlib.sha256(raw[2 * j : 2 * (j + window)]).hexdigest()
    return 1e6 * (time.perf_counter() - t0) / x.shape[0]


def cost(scale: Scale, fashion: Tensor) -> tuple[list[str], float]:
    lines = []
    for shape in ((1, 28, 28), (3, 32, 32), (3, 224, 224)):
        big = shape[1] > 100
        stored = images_of(fashion[: min(scale.cost_stored, 1000 if big else 10**9)], shape)
        timed = images_of(fashion[-min(scale.cost_images, 200 if big else 10**9) :], shape)
        cells = []
        for name in (DEFAULT, "blacklight"):
            det = DETECTORS[name](seed=0)
            for i in range(0, stored.shape[0], 100):
                det.observe(stored[i : i + 100])

            n = timed.shape[0]
            run, fp = in_batches(det.observe, timed), in_batches(det.fingerprint, timed)
            cells += [f"{per_image_us(run, n):,.0f}", f"{per_image_us(fp, n, 2):,.0f}"]
        sha = sha256_windows_us(timed[: 2 if big else 20])
        lines.append(f"| {'×'.join(map(str, shape))} | " + " | ".join(cells) + f" | {sha:,.0f} |")
    import timm

    net = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = images_of(fashion[:100], (3, 32, 32))
    with torch.no_grad():
        net(x)
        resnet = per_image_us(lambda: net(x), 100, 3)
    return lines, resnet


# ----------------------------------------------------------------------------- 4. stores
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_url(folder: str) -> Iterator[str | None]:
    """A `redis-server` on a free 127.0.0.1 port, persistence off; `None` if not installed."""
    exe = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        exe = None
    if exe is None:
        yield None
        return
    port = _free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([exe, *args, "--dir", folder], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def store_rows(scale: Scale, fashion: Tensor, specs: dict[str, str | None]) -> list[str]:
    lines = []
    for label, spec in specs.items():
        if spec is None:
            lines.append(f"| {label} | not measured (no redis-server) | | |")
            continue
        det = DETECTORS[DEFAULT](seed=0, store=spec)
        det.clear()
        prefill = fashion[: scale.store_prefill]
        for i in range(0, prefill.shape[0], 100):
            det.observe(prefill[i : i + 100], BENIGN, tag=BENIGN)
        probe = fashion[-scale.store_calls :]
        lat = []
        for i in range(probe.shape[0]):
            t0 = time.perf_counter()
            det.observe(probe[i : i + 1], "client")
            lat.append(time.perf_counter() - t0)
        lat.sort()
        p99 = lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)]
        batch = fashion[-2 * scale.store_calls : -scale.store_calls]
        us = per_image_us(in_batches(det.observe, batch), batch.shape[0])
        lines.append(
            f"| {label} | {1 / statistics.fmean(lat):,.0f} | {1e3 * p99:.2f} ms | {1e6 / us:,.0f} |"
        )
        det.close()
    return lines


# ----------------------------------------------------------------------------- 5. memory
def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fill(det: Detector, fashion: Tensor, n: int) -> float:
    """Store `n` distinct queries (Fashion images with a little noise); seconds spent."""
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for i in range(0, n, 1000):
        base = fashion[torch.randint(0, fashion.shape[0], (min(1000, n - i),), generator=gen)]
        det.observe((base + 0.05 * torch.rand(base.shape, generator=gen)).clamp(0, 1))
    return time.perf_counter() - t0


def memory_rows(scale: Scale, fashion: Tensor, folder: str, redis: str | None) -> list[str]:
    lines, n = [], scale.fill
    for name in (DEFAULT, "blacklight"):
        before = rss()
        det = DETECTORS[name](seed=0, capacity=n)
        s = fill(det, fashion, n)
        held = det.store.nbytes()  # type: ignore[attr-defined]
        lines.append(f"| {name} | memory | {n:,} | {held / n:,.0f} (tensors), {(rss() - before) / n:,.0f} (resident) | {s:.0f} s |")  # fmt: skip
        del det
    n = scale.store_fill  # SQLite and Redis take minutes per 100,000: their bytes grow linearly
    path = Path(folder) / "fill.db"
    det = DETECTORS[DEFAULT](seed=0, capacity=n, store=f"sqlite:{path}")
    s = fill(det, fashion, n)
    det.close()
    lines.append(f"| {DEFAULT} | sqlite | {n:,} | {path.stat().st_size / n:,.0f} (file) | {s:.0f} s |")  # fmt: skip
    if redis is not None:
        import redis as client

        r = client.Redis.from_url(redis)
        r.flushdb()
        before = int(r.info("memory")["used_memory"])
        det = DETECTORS[DEFAULT](seed=0, capacity=n, store=redis)
        s = fill(det, fashion, n)
        used = int(r.info("memory")["used_memory"]) - before
        lines.append(f"| {DEFAULT} | redis | {n:,} | {used / n:,.0f} (used_memory) | {s:.0f} s |")  # fmt: skip
    return lines


# ----------------------------------------------------------------------------- the report
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--no-write", action="store_true", help="print, do not edit docs/benchmarks.md")
    p.add_argument("--data", help="the Fashion-MNIST folder (default: as randfeat finds it)")
    p.add_argument(
        "--untrained",
        action="store_true",
        help="an untrained CNN, the data relabelled with its predictions (a smoke run)",
    )
    p.add_argument("--images", type=int, help="attacked images (default 100)")
    p.add_argument("--fill", type=int, help="stored queries for the memory figures")
    args = p.parse_args(argv)
    scale = QUICK if args.quick else FULL
    if args.images:
        scale = dataclasses.replace(scale, images=args.images)
    if args.fill:
        scale = dataclasses.replace(scale, fill=args.fill)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    data = fashion_mnist(args.data)
    model: nn.Module = FashionCNN().eval() if args.untrained else fashion_cnn(root=args.data)
    if args.untrained:  # every image "correct": the attacks and the ν calibration have work
        with torch.no_grad():
            relabel = {"y_test": model(data.x_test).argmax(1), "y_train": model(data.x_train).argmax(1)}  # fmt: skip
        data = dataclasses.replace(data, **relabel)
    with torch.no_grad():
        right = model(data.x_test).argmax(1) == data.y_test
    pick = right.nonzero().squeeze(1)[: scale.images]
    x, y = data.x_test[pick], data.y_test[pick]
    warm = data.x_train[: scale.warm]
    calib = data.x_train[scale.warm : scale.warm + scale.calib]
    dets, rules = detectors(calib, scale.fpr)
    bases = {k: warmed(d, warm) for k, d in dets.items()}
    fpr = benign_fpr(bases, rules, data.x_test[: scale.test])
    log(f"benign: {fpr}")
    nu_x = data.x_train[-scale.calib_nu :]
    shield, nu = defended(model, nu_x, data.y_train[-scale.calib_nu :])
    tables = {
        "undefended": attack_traces(scale, model, x, y, bases, rules),
        f"feature noise, 2-point drop (ν = {nu:.3g})": attack_traces(scale, shield, x, y, bases, rules),
    }  # fmt: skip
    cost_lines, resnet = cost(scale, data.x_test)
    with tempfile.TemporaryDirectory() as folder, redis_url(folder) as redis:
        specs = {"memory": "memory", "sqlite": f"sqlite:{Path(folder) / 's.db'}", "redis": redis}
        stores = store_rows(scale, data.x_train, specs)
        memory = memory_rows(scale, data.x_train, folder, redis)

    out = [
        f"Machine: {describe_machine()}. `python benchmarks/detect.py` "
        f"({'--quick, ' if args.quick else ''}{time.perf_counter() - t_start:.0f} s). Detectors: "
        f"`{DEFAULT}` (ours, {dets['ours']!r}) and the Blacklight port "
        f"({dets['blacklight']!r}), thresholds calibrated to {100 * scale.fpr:g}% on "
        f"{scale.calib:,} training images (`calibrate`).",
        "",
        f"**Benign false positives**: the {scale.test:,} test images streamed in order after "
        f"{scale.warm:,} training images.",
        "",
        "| detector (threshold) | flagged |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in fpr.items()],
        "",
        f"**Detection** on the traces of {scale.images} correctly classified test images, "
        f"ε = 0.1, {scale.budget:,} queries, votes = 1; detected: images flagged among those on "
        "which the attack sent more than 2 queries; median queries to the first flag; flagged "
        "queries whose closest earlier query was the attack's own / a stored benign image.",
    ]
    for title, per_attack in tables.items():
        out += ["", f"*{title}*", "", "| attack | " + " | ".join(r.label for r in rules) + " |"]
        out.append("| --- " * (len(rules) + 1) + "|")
        for attack, tally in per_attack.items():
            out.append(f"| {attack} | " + " | ".join(tally[r.label].row() for r in rules) + " |")
    out += [
        "",
        "Cells: detected (rate) · median queries to the first flag · flags own / benign.",
        "",
        f"**Cost** in µs per image, one thread, {scale.cost_stored:,} images stored (224×224: "
        "1,000), batches of 100; SHA-256: the official code's hash of every window alone; timm "
        f"resnet18 forward at 3×32×32: **{resnet:,.0f} µs** per image.",
        "",
        f"| image | {DEFAULT}: observe | fingerprint | blacklight: observe | fingerprint | "
        "SHA-256 windows |",
        "| --- | --- | --- | --- | --- | --- |",
        *cost_lines,
        "",
        f"**Stores** (`{DEFAULT}`, {scale.store_prefill:,} images stored): one image per "
        "`observe` (lookups/s, p99 latency), and batches of 100 (images/s).",
        "",
        "| store | lookups/s | p99 | images/s in batches |",
        "| --- | --- | --- | --- |",
        *stores,
        "",
        "**Memory** per stored query.",
        "",
        "| detector | store | stored | bytes per query | time to fill |",
        "| --- | --- | --- | --- | --- |",
        *memory,
    ]
    body = "\n".join(out)
    print(body)
    if not args.no_write:
        replace_section("Stateful detection (`benchmarks/detect.py`)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
