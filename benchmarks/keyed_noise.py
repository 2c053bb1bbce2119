"""Keyed noise against fresh noise at resnet50's penultimate layer, as a share of the forward.

For each batch size, in interleaved rounds (drift hits every variant alike):

- the bare forward of timm resnet50 (random weights, 224x224);
- the two noise steps alone, as `benchmarks/overhead.py` times them (whole-forward differences of
  a fraction of a percent drown in the jitter of a shared machine): *fresh*, a draw from an
  unseeded stream shaped like the penultimate feature `[N, 2048]`, scaled and added; *keyed*, the
  hash of the input batch (`KeyedNoise.row_seeds`, the cost that fresh noise does not have) plus
  the keyed draw at `[N, 2048]`, scaled and added;
- the whole forward through a fresh and through a keyed wrapper, for the record.

Then the hash alone, in microseconds per row, at 1x28x28, 3x32x32 and 3x224x224 (batch 32), and
the one-off cost of the first hash at a row length (the key-derived coefficients are built and
cached then). The issue's target: keyed noise <= 1% of the forward.

Usage:

    python benchmarks/keyed_noise.py                    # batch 8 and 32, 15 rounds
    python benchmarks/keyed_noise.py --threads 1        # one thread (a shared machine)
    python benchmarks/keyed_noise.py --write            # also the "Keyed noise" section of docs/benchmarks.md
    python benchmarks/keyed_noise.py --batches 2 --size 64 --rounds 2   # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import timm
import torch
from common.machine import describe_machine, replace_section
from common.measure import sync

import randfeat
from randfeat.keyed import KeyedNoise
from randfeat.noise import NoiseRNG, standard_normal

NU = 0.01
STEP_REPEATS = 9  # the noise steps are timed this many times per round (median)
HASH_SHAPES = ((1, 28, 28), (3, 32, 32), (3, 224, 224))


def _timer(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _median_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    return statistics.median(_timer(fn, device) for _ in range(repeats))


def bench_batch(batch: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Median times (s) of the bare forward, the two noise steps and the two wrapped forwards."""
    torch.manual_seed(0)
    model = timm.create_model("resnet50", pretrained=False).eval().to(device)
    x = torch.rand(batch, 3, args.size, args.size, device=device)
    fresh = randfeat.wrap(model, nu=NU)
    keyed = randfeat.wrap(model, nu=NU, noise="keyed")
    feature = torch.rand(fresh.feature_shapes(x)[fresh.layers[0]], device=device)
    rng, noise = NoiseRNG(), KeyedNoise()
    sigma = NU**0.5

    def fresh_step() -> torch.Tensor:
        return feature + standard_normal(feature, rng) * sigma

    def keyed_step() -> torch.Tensor:
        return feature + noise.standard_normal(feature, noise.row_seeds(x), 0) * sigma

    variants: dict[str, Callable[[], object]] = {
        "bare": lambda: model(x),
        "fresh_forward": lambda: fresh(x),
        "keyed_forward": lambda: keyed(x),
    }
    runs: dict[str, list[float]] = {k: [] for k in (*variants, "fresh_step", "keyed_step")}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for fn in variants.values():
                fn()
            fresh_step()
            keyed_step()
        for _ in range(args.rounds):
            for k, fn in variants.items():
                runs[k].append(_timer(fn, device))
            runs["fresh_step"].append(_median_time(fresh_step, device, STEP_REPEATS))
            runs["keyed_step"].append(_median_time(keyed_step, device, STEP_REPEATS))
    fresh.unwrap()
    keyed.unwrap()
    bare = runs["bare"]
    out: dict[str, Any] = {"batch": batch, **{k: statistics.median(v) for k, v in runs.items()}}
    for k in ("fresh_forward", "keyed_forward"):
        out[k + "_ratio"] = statistics.median(t / b for t, b in zip(runs[k], bare, strict=True))
    return out


def bench_hash(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Microseconds per row of `row_seeds` at each shape (batch `args.hash_batch`), and the first
    call at each row length (which builds the cached coefficients)."""
    rows = []
    with torch.inference_mode():
        for shape in HASH_SHAPES:
            x = torch.rand(args.hash_batch, *shape, device=device)
            noise = KeyedNoise()
            first = _timer(lambda noise=noise, x=x: noise.row_seeds(x), device)  # type: ignore[misc]
            t = _median_time(lambda noise=noise, x=x: noise.row_seeds(x), device, 21)  # type: ignore[misc]
            rows.append(
                {
                    "shape": "x".join(map(str, shape)),
                    "bytes": 4 * x[0].numel(),
                    "us_per_row": 1e6 * t / args.hash_batch,
                    "first_ms": 1e3 * first,
                }
            )
    return rows


def report(
    results: list[dict[str, Any]],
    hashes: list[dict[str, Any]],
    args: argparse.Namespace,
    device: torch.device,
) -> str:
    lines = [
        f"Machine: {describe_machine(device)}. timm resnet50 (random weights), "
        f"{args.size}x{args.size}, noise at `penultimate` (`fc.pre`, 2048 features), ν = {NU}; "
        f"{args.rounds} interleaved rounds after {args.warmup} warm-up rounds, "
        f"`torch.inference_mode`; noise steps timed alone ({STEP_REPEATS} repeats per round).",
        "",
        "| batch | forward (ms) | fresh step (ms) | fresh / forward | keyed step (ms) | "
        "keyed / forward | keyed / fresh step | fresh wrapper / bare | keyed wrapper / bare |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['batch']} | {1e3 * r['bare']:.1f} | {1e3 * r['fresh_step']:.3f} | "
            f"{100 * r['fresh_step'] / r['bare']:.3f}% | {1e3 * r['keyed_step']:.3f} | "
            f"{100 * r['keyed_step'] / r['bare']:.3f}% | {r['keyed_step'] / r['fresh_step']:.1f}x | "
            f"{r['fresh_forward_ratio']:.3f} | {r['keyed_forward_ratio']:.3f} |"
        )
    lines += [
        "",
        f"The hash alone (`KeyedNoise.row_seeds`, batch {args.hash_batch}, float32 rows):",
        "",
        "| row | bytes | µs per row | first call (ms, builds the coefficients) |",
        "|---|---|---|---|",
    ]
    for h in hashes:
        lines.append(
            f"| {h['shape']} | {h['bytes']:,} | {h['us_per_row']:.1f} | {h['first_ms']:.1f} |"
        )
    lines += [
        "",
        "The keyed step is the hash of the input (read once: 602 KB a row at 3x224x224) plus a "
        "counter-based draw at the feature; the wrapper ratios carry the machine's run-to-run "
        "jitter and are given for the record, the step ratios are the measurement.",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="8,32")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--hash-batch", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:  # on a shared machine, more threads than free cores time the contention
        torch.set_num_threads(args.threads)
    results = [bench_batch(int(b), args, device) for b in args.batches.split(",")]
    text = report(results, bench_hash(args, device), args, device)
    print(text)
    if args.write:
        replace_section("Keyed noise", text, device)


if __name__ == "__main__":
    main()
