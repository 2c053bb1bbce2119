"""Evaluation throughput against the pure forward pass ("Evaluation throughput" in docs/benchmarks.md).

For one model, one attack and one defense, at each `--forward-batch`, the script runs what
`randfeat eval` runs for one chunk of images (the grid's [UnitRunner][randfeat.eval.grid.units.UnitRunner]:
the clean unit, then the attack unit, which is the attack through the oracle, the D.4
verification and the fresh judging `rejudge`, with the defended model built as the grid builds
it and run with `--dtype`, `--channels-last`, `--compile`), and counts every image forward it
makes. Against it, the pure forward throughput of the same defended model (the same `Forward`:
dtype, memory format, compilation) at the same `--forward-batch` rows per call. The ratio

    ratio = (forwards of the evaluation / its wall time) / (rows per second of the pure forward)

is how much of the model's throughput the evaluation keeps; the target is >= 0.85. A shared
machine's speed drifts by 10-20% within a minute, so the two are measured in `--rounds` rounds
(pure forward for `--pure-seconds`, evaluation, pure forward again), each round's ratio against
its own pure forward, and the median over rounds is reported with the range. Image-queries
per second (the budget the attacks spend) are given too. Peak memory per phase: the process's
peak resident set (VmHWM, reset before each phase through /proc/self/clear_refs on Linux; psutil
sampling or the lifetime peak elsewhere, as the table says) and, on a GPU,
`torch.cuda.max_memory_allocated`.

From the measured rate the script projects the wall time of the paper's ImageNet grid (Tables 1
and 2 protocol: 1,000 images; Square, NES, SignHunter ℓ∞, RayS, SignFlip; budgets 1,000 and
10,000 as separate runs; Base, Input and Feature at two drops each), for two models of what
the grid spends (the arithmetic is printed): every image spends the whole budget (an upper bound
on queries), and the paper's own robust accuracies (ViT-B/16 and ResNet-50, Tables 1 and 10)
with fooled images free (a lower estimate: an unfooled image spends the whole budget).

Images: `digits-cnn` attacks digits test images (real labels); a timm model (`pretrained=False`,
seeded) attacks uniform random images at `--image-size`, labelled by the model's own float32
predictions (all correctly classified at the start). Run it from the repository root.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/throughput.py                         # digits-cnn, quick
    OMP_NUM_THREADS=2 python benchmarks/throughput.py --model resnet50 --image-size 224 \\
        --n-images 32 --budget 10 --forward-batch 16,32 --fresh-forwards 5 --rounds 1 --write
    python benchmarks/throughput.py --model vit_base_patch16_224 --image-size 224 --device cuda \\
        --n-images 1024 --forward-batch 256,1024 --dtype bfloat16 --write
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import re
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from _machine import describe_machine, replace_section
from torch import Tensor

from randfeat.eval.data import balanced_subset
from randfeat.eval.datasets import DataSpec
from randfeat.eval.grid.config import EvalConfig
from randfeat.eval.grid.units import UnitRunner, build_attacks, build_forwards
from randfeat.eval.models.sources import ModelRequest, model_source
from randfeat.eval.oracle import Model
from randfeat.eval.records import AttackRow, Unit
from randfeat.wrapper import RandomizedFeatureWrapper, wrap

TARGET = 0.85
"""The evaluation should keep at least this fraction of the pure forward throughput."""

# ---------------------------------------------------------------------------- the paper's grid
N_IMAGES, BUDGETS, VOTES, FRESH = 1000, (1000, 10000), 9, 50
ATTACKS = ("square-linf", "nes-linf", "signhunter-linf", "rays", "signflip")
DEFENSES = ("base", "input@0.01", "input@0.02", "feature@0.01", "feature@0.02")
# Robust accuracy (%) at budgets 1,000 / 10,000 (Table 1; RayS and SignFlip: Table 10, one value
# reported, used at both budgets). Input and Feature: one value per model in the tables, used for
# both drops. ResNet-50 has no decision-based row in the paper: those cells are None (counted
# at the full budget, as in the upper bound).
PAPER_RA: dict[str, dict[str, dict[str, tuple[float, float] | None]]] = {
    "vit_base_patch16_224": {
        "base": {
            "square-linf": (5.7, 0.0),
            "nes-linf": (45.7, 7.3),
            "signhunter-linf": (5.1, 0.0),
            "rays": (1.7, 1.7),
            "signflip": (9.7, 9.7),
        },
        "input": {
            "square-linf": (58.8, 58.1),
            "nes-linf": (70.8, 51.4),
            "signhunter-linf": (53.1, 52.2),
            "rays": (41.3, 41.3),
            "signflip": (70.3, 70.3),
        },
        "feature": {
            "square-linf": (60.6, 60.2),
            "nes-linf": (69.1, 47.5),
            "signhunter-linf": (54.0, 52.9),
            "rays": (41.0, 41.0),
            "signflip": (70.1, 70.1),
        },
    },
    "resnet50": {
        "base": {
            "square-linf": (3.5, 0.2),
            "nes-linf": (36.2, 4.3),
            "signhunter-linf": (6.6, 0.4),
            "rays": None,
            "signflip": None,
        },
        "input": {
            "square-linf": (40.3, 39.5),
            "nes-linf": (63.8, 23.9),
            "signhunter-linf": (47.6, 45.4),
            "rays": None,
            "signflip": None,
        },
        "feature": {
            "square-linf": (37.0, 36.0),
            "nes-linf": (56.7, 16.8),
            "signhunter-linf": (46.3, 43.4),
            "rays": None,
            "signflip": None,
        },
    },
}


def grid_queries(model: str | None) -> tuple[int, str]:
    """Image-queries the paper's grid spends: the budget bound, or the paper's robust accuracies.

    Returns the count and the arithmetic as text.
    """
    cells = len(DEFENSES) * len(ATTACKS)
    if model is None:
        q = N_IMAGES * cells * sum(BUDGETS)
        return q, (
            f"{N_IMAGES} images × {len(DEFENSES)} defenses × {len(ATTACKS)} attacks × "
            f"({' + '.join(map(str, BUDGETS))}) queries = {q:,}"
        )
    total = 0.0
    for d in DEFENSES:
        table = PAPER_RA[model][d.partition("@")[0]]
        for a in ATTACKS:
            ra = table[a]
            for i, b in enumerate(BUDGETS):
                total += N_IMAGES * b * (1.0 if ra is None else ra[i] / 100)
    q = round(total)
    return q, (
        f"Σ over defenses, attacks, budgets B of {N_IMAGES} images × RA(B) × B, RA from the "
        f"paper's tables for {model} (a cell without a figure counts the whole budget) = {q:,}"
    )


def other_forwards(verify_per_query: float, queries: int) -> tuple[int, str]:
    """Forwards beyond the queries: verification, fresh judging, clean rows (calibration aside)."""
    randomized = sum(d != "base" for d in DEFENSES)
    fresh = (
        N_IMAGES * len(ATTACKS) * len(BUDGETS) * (FRESH * randomized + (len(DEFENSES) - randomized))
    )
    clean = N_IMAGES * (VOTES * randomized + (len(DEFENSES) - randomized))
    verify = round(verify_per_query * queries)
    text = (
        f"verification {verify_per_query:.3f} per query (measured here) = {verify:,}; fresh "
        f"judging {N_IMAGES} × {len(ATTACKS)} attacks × {len(BUDGETS)} budgets × ({FRESH} × "
        f"{randomized} randomized + 1 × {len(DEFENSES) - randomized} base) = {fresh:,}; clean "
        f"{N_IMAGES} × ({VOTES} × {randomized} + {len(DEFENSES) - randomized}) = {clean:,}"
    )
    return verify + fresh + clean, text


# ---------------------------------------------------------------------------- measuring tools
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
    both sides of the ratio the same way keeps the comparison and removes most of that noise.
    Returns what was done, for the report.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, MMAP_THRESHOLD) == 1 and libc.mallopt(-1, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        ok = False
    return TUNED_MALLOC if ok else "default malloc (not glibc: mallopt unavailable)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Counted:
    """A callable model that counts the rows and calls that go through it, and its time."""

    def __init__(self, model: Model, device: torch.device) -> None:
        self.model, self.device = model, device
        self.rows = self.calls = 0
        self.seconds = 0.0

    def __call__(self, x: Tensor) -> Tensor:
        t0 = time.perf_counter()
        out = self.model(x)
        _sync(self.device)
        self.seconds += time.perf_counter() - t0
        self.rows += int(x.shape[0])
        self.calls += 1
        return out


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


# ---------------------------------------------------------------------------- one setting
@dataclass
class Round:
    """One round: the pure forward, the evaluation, the pure forward again."""

    forwards: int  # every image forward of the evaluation (clean, queries, verification, fresh)
    calls: int
    eval_s: float
    in_model_s: float
    pure_before: float  # rows per second
    pure_after: float

    @property
    def rate(self) -> float:
        return self.forwards / self.eval_s

    @property
    def pure(self) -> float:
        return (self.pure_before + self.pure_after) / 2

    @property
    def ratio(self) -> float:
        return self.rate / self.pure


@dataclass
class Row:
    """The evaluation and the pure forward at one `--forward-batch`, over `--rounds` rounds."""

    forward_batch: int
    queries: int
    verify: int
    success: float
    rounds: list[Round]
    eval_peak: Peak
    pure_peak: Peak

    def _median(self, key: str) -> float:
        return statistics.median(getattr(r, key) for r in self.rounds)

    @property
    def rate(self) -> float:
        """Forwards per second of the evaluation (median over rounds)."""
        return self._median("rate")

    @property
    def pure_rows_per_s(self) -> float:
        return self._median("pure")

    @property
    def ratio(self) -> float:
        """The median over rounds of each round's ratio (its own evaluation and pure forwards)."""
        return self._median("ratio")

    @property
    def ratio_range(self) -> tuple[float, float]:
        ratios = [r.ratio for r in self.rounds]
        return min(ratios), max(ratios)

    @property
    def eval_s(self) -> float:
        return self._median("eval_s")

    @property
    def rows_per_call(self) -> float:
        r = self.rounds[0]
        return r.forwards / max(1, r.calls)

    @property
    def in_model(self) -> float:
        return statistics.median(r.in_model_s / r.eval_s for r in self.rounds)


def load(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, Tensor, Tensor]:
    """The model (eval mode, on `device`) and the attacked images with their labels."""
    torch.manual_seed(args.seed)  # timm's random initialisation draws from the global generator
    model = model_source(args.model).load(ModelRequest(args.model)).to(device).eval()
    if args.model == "digits-cnn":
        pool = DataSpec.parse("digits").load(None)
        idx = balanced_subset(pool.labels, args.n_images, seed=args.seed)
        x, y = pool.images(idx)
        return model, x, y
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.n_images, 3, args.image_size, args.image_size, generator=g)
    with torch.no_grad():
        y = torch.cat([model(c.to(device)).argmax(1).cpu() for c in x.split(args.chunk)])
    return model, x, y


def measure(
    args: argparse.Namespace,
    fb: int,
    model: torch.nn.Module,
    defended: torch.nn.Module,
    x: Tensor,
    y: Tensor,
    device: torch.device,
) -> Row:
    """The evaluation of one chunk and the pure forward, at `fb` rows per forward."""
    data = "digits" if args.model == "digits-cnn" else "imagenet:synthetic"
    cfg = EvalConfig.from_mapping(
        {
            "model": args.model,
            "data": data,
            "n_images": args.n_images,
            "batch_size": args.n_images,
            "forward_batch": fb,
            "defenses": args.defense,
            "attacks": args.attack,
            "budgets": str(args.budget),
            "votes": args.votes,
            "fresh_forwards": args.fresh_forwards,
            "eps": args.eps,
            "dtype": args.dtype,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "device": str(device),
        }
    )
    name = cfg.defense_names()[0]
    forward = build_forwards(cfg, {name: defended}, device)[name]
    counted = Counted(forward, device)
    runner = UnitRunner(cfg, device, tuple(range(args.n_images)), x, y)
    runner.defended = {name: defended}
    runner.forwards = {name: counted}
    runner.attacks = build_attacks(cfg)
    # the pure forward: fb rows of the attacked images, through the same Forward
    rows = x.repeat((fb + x.shape[0] - 1) // x.shape[0], 1, 1, 1)[:fb].to(device)

    def pure() -> float:
        """Rows per second of back-to-back forwards for at least `--pure-seconds` (3 calls min)."""
        calls = 0
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            while calls < 3 or time.perf_counter() - t0 < args.pure_seconds:
                forward(rows)
                calls += 1
                _sync(device)
        return calls * fb / (time.perf_counter() - t0)

    with torch.no_grad():  # warm-up: compile (every batch size, and 1), allocator, caches
        for n in (fb, max(1, fb // 2 + 1), 1):
            forward(rows[:n])
    rounds = []
    out = []
    eval_peak = pure_peak = Peak()
    for k in range(args.rounds):  # every round repeats the same work: the units reseed
        counted.rows = counted.calls = 0
        counted.seconds = 0.0
        with peak_memory(device) as pure_peak_k:
            before = pure()
        t0 = time.perf_counter()
        with peak_memory(device) as eval_peak_k:
            out = runner.run(Unit("clean", name, None, None, 0))
            out += runner.run(Unit("attack", name, args.attack, args.budget, 0))
        eval_s = time.perf_counter() - t0
        after = pure()
        rounds.append(Round(counted.rows, counted.calls, eval_s, counted.seconds, before, after))
        if k == 0:
            eval_peak, pure_peak = eval_peak_k, pure_peak_k
    attack_rows = [r for r in out if isinstance(r, AttackRow)]
    return Row(
        forward_batch=fb,
        queries=sum(r.queries for r in attack_rows),
        verify=sum(r.verify_forwards for r in attack_rows),
        success=sum(r.success for r in attack_rows) / len(attack_rows),
        rounds=rounds,
        eval_peak=eval_peak,
        pure_peak=pure_peak,
    )


def build_defense(args: argparse.Namespace, model: torch.nn.Module) -> torch.nn.Module:
    if args.defense == "base":
        return model
    layers = ["input"] if args.defense == "input" else ["penultimate"]
    return wrap(model, layers=layers, nu=args.nu, seed=0)


# ---------------------------------------------------------------------------- report
def _mib(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:,.0f}"


def report(args: argparse.Namespace, device: torch.device, rows: list[Row], machine: str) -> str:
    setting = (
        f"`{args.model}`"
        + ("" if args.model == "digits-cnn" else f" at {args.image_size}×{args.image_size}")
        + f", defense `{args.defense}`"
        + ("" if args.defense == "base" else f" (ν = {args.nu:g})")
        + f", attack `{args.attack}` (ε = {args.eps:g}), budget {args.budget}, votes {args.votes}, "
        f"fresh forwards {args.fresh_forwards}, {args.n_images} images in one chunk, dtype "
        f"{args.dtype}, channels-last {args.channels_last}, compile {args.compile}, device "
        f"{device}, {args.malloc_text}"
    )
    lines = [
        f"Machine: {machine}.",
        "",
        f"Setting: {setting}. {args.rounds} rounds per forward batch, each the pure forward for "
        f"{args.pure_seconds:g} s, the evaluation, the pure forward for {args.pure_seconds:g} s "
        "again; a round's ratio is its evaluation's forwards/s over the mean of its two pure "
        "forward rates, and the table gives the median over rounds (range in brackets).",
        "",
        "| forward batch | image-queries/s | forwards/s (evaluation) | rows/s (pure forward) | "
        "ratio [range] | ≥ target | rows per call | in model / wall | success | peak host MiB "
        "(eval / pure) | peak GPU MiB (eval / pure) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r.ratio_range
        lines.append(
            f"| {r.forward_batch} | {r.queries / r.eval_s:,.1f} | {r.rate:,.1f} | "
            f"{r.pure_rows_per_s:,.1f} | **{r.ratio:.2f}** [{lo:.2f}-{hi:.2f}] | "
            f"{'yes' if r.ratio >= TARGET else 'NO'} | {r.rows_per_call:.1f} | {r.in_model:.2f} | "
            f"{r.success:.2f} | {_mib(r.eval_peak.host_mib)} / {_mib(r.pure_peak.host_mib)} | "
            f"{_mib(r.eval_peak.gpu_mib)} / {_mib(r.pure_peak.gpu_mib)} |"
        )
    hows = {r.eval_peak.host_how for r in rows}
    lines += [
        "",
        f"Forwards of the evaluation: clean ({args.votes if args.defense != 'base' else 1} per "
        "image), queries, D.4 verification and fresh judging, all counted at the model. Peak host "
        f"memory: {', '.join(sorted(hows))}.",
    ]
    return "\n".join(lines)


def projection(args: argparse.Namespace, rows: list[Row]) -> str:
    best = max(rows, key=lambda r: r.rate)
    verify = sum(r.verify for r in rows) / max(1, sum(r.queries for r in rows))
    lines = [
        f"Projected wall time of the paper's ImageNet grid for `{args.model}` at the best measured "
        f"rate here ({best.rate:,.1f} forwards/s, `--forward-batch {best.forward_batch}`, "
        f"dtype {args.dtype}), one process, calibration not counted:",
        "",
    ]
    models: list[str | None] = [None]
    if args.model in PAPER_RA:
        models.append(args.model)
    for m in models:
        q, q_text = grid_queries(m)
        other, other_text = other_forwards(verify, q)
        total = q + other
        s = total / best.rate
        kind = "upper bound (every image spends the budget)" if m is None else "paper's RA"
        lines += [
            f"- {kind}: queries {q_text}; {other_text}; total {total:,} forwards / "
            f"{best.rate:,.1f} per s = {s:,.0f} s = **{s / 3600:,.1f} h** ({s / 86400:,.1f} days)",
        ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default="digits-cnn", help="digits-cnn or a timm name")
    p.add_argument("--image-size", type=int, default=224, help="timm models: image side")
    p.add_argument("--attack", default="square-linf", help="a randfeat.eval.ATTACKS name")
    p.add_argument("--defense", default="feature", choices=["base", "input", "feature"])
    p.add_argument("--nu", type=float, default=None, help="ν (default: 0.5 feature, 0.002 input)")
    p.add_argument("--eps", type=float, default=None, help="ℓ∞ radius (default 0.2 digits, 0.05)")
    p.add_argument("--n-images", type=int, default=200)
    p.add_argument("--budget", type=int, default=100)
    p.add_argument("--votes", type=int, default=9)
    p.add_argument("--fresh-forwards", type=int, default=50)
    p.add_argument("--forward-batch", default="64,256,1024", help="comma list")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--malloc",
        default="tuned",
        choices=["tuned", "default"],
        help="glibc malloc: keep freed blocks (tuned, see tune_malloc) or its defaults",
    )
    p.add_argument("--rounds", type=int, default=5, help="rounds per forward batch")
    p.add_argument(
        "--pure-seconds", type=float, default=1.0, help="pure forward time before and after"
    )
    p.add_argument("--chunk", type=int, default=64, help="rows per labelling forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args()
    if args.nu is None:
        args.nu = 0.002 if args.defense == "input" else 0.5
    if args.eps is None:
        args.eps = 0.2 if args.model == "digits-cnn" else 0.05
    args.malloc_text = tune_malloc() if args.malloc == "tuned" else "glibc malloc defaults"
    device = torch.device(args.device)
    batches = [int(b) for b in args.forward_batch.split(",")]
    model, x, y = load(args, device)
    defended = build_defense(args, model)
    rows = []
    for fb in batches:
        rows.append(measure(args, fb, model, defended, x, y, device))
        r = rows[-1]
        print(
            f"[{time.strftime('%H:%M:%S')}] forward batch {fb}: {r.rate:,.1f} forwards/s "
            f"(evaluation) vs {r.pure_rows_per_s:,.1f} rows/s (pure): ratio {r.ratio:.2f}",
            flush=True,
        )
    if isinstance(defended, RandomizedFeatureWrapper):
        defended.unwrap()
    machine = describe_machine(device)
    if os.environ.get("OMP_NUM_THREADS"):
        machine += f" (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"
    body = report(args, device, rows, machine) + "\n\n" + projection(args, rows)
    print(body)
    if args.write:
        size = "" if args.model == "digits-cnn" else f" {args.image_size}×{args.image_size}"
        replace_section(
            f"Evaluation throughput, {args.model}{size}, {args.attack}, {args.dtype}"
            + (", malloc defaults" if args.malloc == "default" else ""),
            body,
            device,
        )


if __name__ == "__main__":
    main()
