"""`randfeat demo`: the paper's comparison, end to end, on the embedded digits in a few minutes.

`randfeat demo --data fashion-mnist` runs the same table on real 28×28 images: Fashion-MNIST and
`fashion-cnn` ([DEMO_DATA][randfeat.eval.demo.DEMO_DATA] says what the demo runs on each).

A small version of Tables 1, 2 and 5 of Nguyen et al., "Understanding the Robustness of Randomized
Feature Defense Against Query-Based Adversarial Attacks" (ICLR 2024): the digits CNN, undefended
(Base), with RND (Input: Gaussian noise on the pixels) and with the randomized feature defense
(Feature: Gaussian noise on the penultimate features, `head.pre`), both calibrated to the same
≈2-point drop in clean accuracy (§5 protocol), attacked by Square, NES and SignHunter (ℓ∞,
score-based) and RayS and SignFlip (decision-based). Everything is run, nothing is stored: the demo
builds an `EvalConfig`, calls `run_eval`
(the same grid as `randfeat eval`) and prints the table of `randfeat.eval.report`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TextIO

import torch

from randfeat.eval.data.registry import PAPER_EPS, DataSpec
from randfeat.eval.errors import ConfigError
from randfeat.eval.grid.config import EvalConfig
from randfeat.eval.grid.presets import PAPER_ATTACKS
from randfeat.eval.grid.runner import run_eval
from randfeat.eval.report.files import write_report
from randfeat.eval.report.render import to_markdown
from randfeat.eval.report.summary import summarize
from randfeat.eval.results.file import read_results
from randfeat.eval.results.records import CleanRow, Header, Row

__all__ = ["DEMO_ATTACKS", "DEMO_DATA", "DEMO_TARGET_DROP", "DemoData", "demo_config", "run_demo"]

DEMO_ATTACKS = PAPER_ATTACKS
"""The paper's five attacks (§5): three score-based (ℓ∞), two decision-based."""
DEMO_TARGET_DROP = 0.02
"""Both randomized defenses cost ≈2 points of clean accuracy (Table 2's smaller drop)."""
DEMO_LAYER = "head.pre"
"""The digits CNN's penultimate features: the input of its classifier `head` (128 features)."""
CLASSES = 10
DEMO_THREADS = 1
"""torch intra-op threads during the demo unless `OMP_NUM_THREADS` is set. The digits CNN's
forwards are batches of 8×8 images, too small to split across threads: on a busy 2-core machine a
forward of 100 digits took 25–45 ms on 1 thread and 195–290 ms on 2 (measured while writing this)."""


@dataclass(frozen=True)
class DemoData:
    """What the demo runs on one data set, and how it describes it.

    Attributes:
        name: the data set's name.
        model: the `--model` it attacks (its classifier is `head`, so `head.pre` is its
            penultimate layer).
        title: what the first line calls the images.
        noun: what the lines call one of them, in the plural.
        model_text: the "Model" line.
        eps_text: the "ε" line, from the run's ℓ∞ and ℓ2 radii.
        threads: torch threads unless `OMP_NUM_THREADS` is set (None: torch's own).
    """

    name: str
    model: str
    title: str
    noun: str
    model_text: str
    eps_text: Callable[[float, float], str]
    threads: int | None


def _digits_eps(eps: float, eps_l2: float) -> str:
    paper, paper_l2, grey = PAPER_EPS["linf"], PAPER_EPS["l2"], 1 / 16
    return (
        f"ℓ∞ {eps:g} (ℓ2 {eps_l2:g}; only ℓ∞ attacks run here). The paper's {paper:g} / "
        f"{paper_l2:g} are for 224×224 photos. The digits have 17 grey levels {grey:g} apart: "
        f"ℓ∞ {paper:g} is less than one grey level, {eps:g} about {eps / grey:.0f}; an ℓ2 "
        f"distance of {paper_l2:g} over 64 pixels is {paper_l2 / 8:.3g} per pixel (RMS), most "
        "of the pixel range."
    )


def _fashion_eps(eps: float, eps_l2: float) -> str:
    paper, paper_l2 = PAPER_EPS["linf"], PAPER_EPS["l2"]
    return (
        f"ℓ∞ {eps:g} (ℓ2 {eps_l2:g}; only ℓ∞ attacks run here): {eps * 255:.0f} of 255 grey "
        f"levels, the usual radius on 28×28 grey images (docs/evaluation.md). The paper's "
        f"{paper:g} / {paper_l2:g} are for 224×224 photos."
    )


DEMO_DATA: Mapping[str, DemoData] = MappingProxyType(
    {
        "digits": DemoData(
            "digits",
            "digits-cnn",
            "the embedded 8×8 digits",
            "digits",
            "digits-cnn, a small CNN trained on scikit-learn's 1,257 training digits (trained on "
            "first use in a few seconds, then cached).",
            _digits_eps,
            DEMO_THREADS,
        ),
        "fashion-mnist": DemoData(
            "fashion-mnist",
            "fashion-cnn",
            "Fashion-MNIST's 28×28 photos of clothes",
            "images",
            "fashion-cnn, a small CNN trained on Fashion-MNIST's 60,000 training images (trained "
            "on first use in about two minutes, then cached).",
            _fashion_eps,
            None,
        ),
    }
)
"""The data sets `randfeat demo --data` takes: `digits` (the default) and
`fashion-mnist[:PATH]`."""


def _demo_data(data: str) -> DemoData:
    entry = DEMO_DATA.get(DataSpec.parse(data).dataset.name)
    if entry is None:
        raise ConfigError(
            f"randfeat demo runs on --data {' or '.join(DEMO_DATA)}, not {data!r}; "
            "use randfeat eval for other data sets."
        )
    return entry


def demo_config(
    out: str | Path,
    *,
    n_images: int = 100,
    budget: int = 1000,
    seed: int = 0,
    quiet: bool = False,
    data: str = "digits",
) -> EvalConfig:
    """The demo's evaluation: its CNN; Base, Input, Feature at a 2-point drop; five attacks.

    Raises:
        ConfigError: `n_images` is not a positive multiple of 10 (a class-balanced subset), a
            data set the demo does not run on, or another bad value.
    """
    entry = _demo_data(data)
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < CLASSES:
        raise ConfigError(
            f"Expected --n-images to be a positive multiple of {CLASSES} (the same number of "
            f"images of each digit), but got {n_images!r}."
        )
    if n_images % CLASSES:
        raise ConfigError(
            f"Expected --n-images to be a multiple of {CLASSES} (the same number of images of "
            f"each digit), but got {n_images}; try {CLASSES * math.ceil(n_images / CLASSES)}."
        )
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"Expected --budget to be an int >= 1, but got {budget!r}.")
    return EvalConfig.from_mapping(
        {
            "model": entry.model,
            "data": data,
            "n_images": n_images,
            "defenses": ["base", "input", "feature"],
            "layers": [DEMO_LAYER],
            "target_drop": [DEMO_TARGET_DROP],
            "attacks": list(DEMO_ATTACKS),
            "budgets": [budget],
            "seed": seed,
            "quiet": quiet,
            "out": str(out),
        }
    )


class _Elapsed(logging.Formatter):
    """`[  12s] message`: seconds since the demo started."""

    def __init__(self, t0: float) -> None:
        super().__init__()
        self.t0 = t0

    def format(self, record: logging.LogRecord) -> str:
        return f"[{time.perf_counter() - self.t0:5.0f}s] {record.getMessage()}"


class _Logging:
    """Route the runner's progress to `stream` for the demo, then restore logging as it was."""

    def __init__(self, stream: TextIO, t0: float, quiet: bool) -> None:
        self.handler = logging.StreamHandler(stream)
        self.handler.setFormatter(_Elapsed(t0))
        self.quiet = quiet
        self.saved: list[tuple[logging.Logger, int, bool, list[logging.Handler]]] = []

    def __enter__(self) -> None:
        root = logging.getLogger("randfeat")
        # the bisection steps of the ν search are too fine for a demo; the runner reports each ν
        quiet_calibration = logging.getLogger("randfeat.calibration")
        for log in (root, quiet_calibration):
            self.saved.append((log, log.level, log.propagate, list(log.handlers)))
        for h in list(root.handlers):
            root.removeHandler(h)
        root.addHandler(self.handler)
        root.setLevel(logging.WARNING if self.quiet else logging.INFO)
        root.propagate = False
        quiet_calibration.setLevel(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        for log, level, propagate, handlers in self.saved:
            log.setLevel(level)
            log.propagate = propagate
            for h in list(log.handlers):
                log.removeHandler(h)
            for h in handlers:
                log.addHandler(h)


def _intro(cfg: EvalConfig, entry: DemoData) -> str:
    eps, eps_l2 = float(cfg.eps or 0), float(cfg.eps_l2 or 0)
    items = [
        ("Model", entry.model_text),
        (
            "Images",
            f"{cfg.n_images} class-balanced test {entry.noun} are attacked; ν is calibrated on "
            f"other test {entry.noun} (disjoint from the attacked ones).",
        ),
        ("Base", "no defense."),
        ("Input", "RND: Gaussian noise N(0, ν·I) on the input pixels."),
        (
            "Feature",
            f"Gaussian noise N(0, ν·I) on the penultimate features ({DEMO_LAYER}, the input of "
            "the classifier): the paper's defense.",
        ),
        (
            "ν",
            f"set for each defense so that clean accuracy drops by ≈{100 * DEMO_TARGET_DROP:g} "
            "points: the paper compares defenses at equal cost in clean accuracy.",
        ),
        (
            "Attacks",
            "Square, NES, SignHunter (score-based, ℓ∞); RayS, SignFlip (decision-based: labels "
            f"only); {cfg.budgets[0]} queries per image.",
        ),
        ("ε", entry.eps_text(eps, eps_l2)),
        (
            "Success",
            f"an attack wins only when a majority of {cfg.votes} noisy forwards misclassify a "
            "queried point inside the ε-ball (paper, appendix D.4).",
        ),
    ]
    lines = [
        "randfeat demo: the randomized feature defense (Nguyen et al., ICLR 2024) against",
        f"query-based black-box attacks, end to end on {entry.title}.",
        "Every number below is computed now.",
        "",
    ]
    for label, text in items:
        lines.append(
            textwrap.fill(
                text, width=96, initial_indent=f"  {label:<9}", subsequent_indent=" " * 11
            )
        )
    return "\n".join(lines) + "\n"


def _summary(header: Header, rows: Sequence[Row], noun: str) -> str:
    lines = ["", f"Calibrated defenses (clean accuracy on the held-out calibration {noun}):"]
    cal = header.calibration
    first = next(iter(cal.values()), None)
    if first is not None:
        lines.append(
            f"  Base      accuracy {100 * first.base_accuracy:.2f}% on {first.n_images} {noun}"
        )
    for c in cal.values():
        label = "Input" if c.kind == "input" else "Feature"
        where = "pixels" if c.kind == "input" else ",".join(c.layers)
        lines.append(
            f"  {label:<9} ν = {c.nu:.4g} on {where}: accuracy {100 * c.accuracy:.2f}% "
            f"(drop {100 * c.drop:.2f} points, target {100 * c.target_drop:g})"
        )
    clean: dict[str, list[bool]] = {}
    for r in rows:
        if isinstance(r, CleanRow):
            clean.setdefault(r.defense, []).append(r.correct)
    if clean:
        parts = [
            f"{name.partition('@')[0].capitalize()} {100 * sum(v) / len(v):.0f}%"
            for name, v in clean.items()
        ]
        n = len(next(iter(clean.values())))
        lines.append(
            f"Clean accuracy on the {n} attacked {noun} (correct unless a strict majority of "
            f"{header.setting('votes')} votes is wrong): {', '.join(parts)}."
        )
    return "\n".join(lines) + "\n\n"


def run_demo(
    out: str | os.PathLike[str] | None = None,
    *,
    n_images: int = 100,
    budget: int = 1000,
    seed: int = 0,
    quiet: bool = False,
    stream: TextIO | None = None,
    data: str = "digits",
) -> int:
    """`randfeat demo`: run the demo grid, print what happens and the table.

    Args:
        out: a directory to keep `results.jsonl`, `results.md`, `results.csv` and (with
            matplotlib) `results.png` in; an earlier demo's `results.jsonl` there is replaced.
            None: a temporary directory, removed afterwards.
        n_images: attacked images, a multiple of 10.
        budget: queries per image.
        seed: seed of the whole run.
        quiet: print only the table.
        stream: where to print (default: standard output).
        data: `digits` or `fashion-mnist[:PATH]` (see `DEMO_DATA`).

    Returns:
        The exit code (0).

    Raises:
        ConfigError: a bad `n_images`, `budget`, `data` or `out`.
    """
    t0 = time.perf_counter()
    stream = sys.stdout if stream is None else stream
    threads = None if os.environ.get("OMP_NUM_THREADS") else torch.get_num_threads()
    tmp = tempfile.TemporaryDirectory(prefix="randfeat-demo-") if out is None else None
    directory = Path(tmp.name if tmp is not None else str(out)).expanduser()
    try:
        results = directory / "results.jsonl"
        cfg = demo_config(
            results, n_images=n_images, budget=budget, seed=seed, quiet=quiet, data=data
        )
        entry = _demo_data(data)
        if threads is not None and entry.threads is not None:
            torch.set_num_threads(entry.threads)
        if not quiet:
            stream.write(_intro(cfg, entry))
            stream.write(
                f"\nRunning with {torch.get_num_threads()} torch thread(s) "
                f"({'from OMP_NUM_THREADS' if threads is None else 'set OMP_NUM_THREADS to change'}); "
                "progress in seconds since start:\n"
            )
            stream.flush()
        if results.exists():
            if not quiet:
                stream.write(f"Replacing the earlier demo results in {results}.\n")
            results.unlink()
        with _Logging(stream, t0, quiet):
            run_eval(cfg)
        res = read_results(results)
        if not quiet:
            stream.write(_summary(res.header, res.rows, entry.noun))
        if tmp is None:
            plot = importlib.util.find_spec("matplotlib") is not None
            table, written = write_report([results], directory, plot=plot)
            stream.write(to_markdown(table))
            if not plot:
                stream.write('\nNo plot: matplotlib is missing (pip install "randfeat[plot]").\n')
            if not quiet:
                stream.write(f"\nKept {results}, " + ", ".join(str(p) for p in written) + ".\n")
        else:
            stream.write(to_markdown(summarize(res.header, res.rows)))
            if not quiet:
                stream.write("\nPass --out DIR to keep the results, the table and the plot.\n")
        elapsed = time.perf_counter() - t0
        if not quiet:
            stream.write(f"Demo finished in {elapsed:.0f} s ({elapsed / 60:.1f} min).\n")
        stream.flush()
    finally:
        if threads is not None:
            torch.set_num_threads(threads)
        if tmp is not None:
            tmp.cleanup()
    return 0
