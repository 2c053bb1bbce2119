"""Wrapper overhead against the bare model, measured in one run.

For each model the bare forward and the wrapped forwards (``penultimate``, a mid-network layer and
``input``) are timed interleaved (round-robin, so drift hits every variant alike); the median of the
per-round ratios wrapped/bare is reported. Results are printed as Markdown and, with ``--write``,
replace the "Wrapper overhead" section of ``docs/benchmarks.md``.

Usage::

    python benchmarks/overhead.py                     # resnet50 + vit_base_patch16_224, 224x224, batch 32
    python benchmarks/overhead.py --device cuda --write
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch
from _machine import describe_machine, replace_section

import randfeat
from randfeat.noise import NoiseRNG, standard_normal

MID = {"resnet50": "layer3", "vit_base_patch16_224": "blocks.6"}


def _timer(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _noise_cost(
    model: torch.nn.Module,
    w: randfeat.RandomizedFeatureWrapper,
    x: torch.Tensor,
    device: torch.device,
) -> float:
    """Median time of the wrapper's own work for one forward, measured in isolation.

    The features at the wrapped point are captured once (`feature_shapes` runs the wrapper's own
    hooks); then the noise step on them (a draw from an unseeded per-thread stream, scaled and
    added) is timed many times, free of the run-to-run jitter of whole forwards.
    """
    shape = next(iter(w.feature_shapes(x).values()))
    feature = torch.rand(shape, device=device)
    rng = NoiseRNG()
    sigma = 0.1
    times = []
    with torch.inference_mode():
        for _ in range(50):
            times.append(_timer(lambda: feature + standard_normal(feature, rng) * sigma, device))
    return statistics.median(times)


def bench_model(
    name: str, args: argparse.Namespace, device: torch.device
) -> list[dict[str, object]]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval().to(device)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    variants = {
        "penultimate": ["penultimate"],
        f"mid ({MID[name]})": [MID[name]],
        "input": ["input"],
    }
    wrapped = {k: randfeat.wrap(model, v, nu=0.01, seed=0) for k, v in variants.items()}
    runs: dict[str, list[float]] = {"bare": [], **{k: [] for k in wrapped}}
    with torch.inference_mode():
        for _ in range(args.warmup):
            model(x)
            for w in wrapped.values():
                w(x)
        for _ in range(args.rounds):
            runs["bare"].append(_timer(lambda: model(x), device))
            for k, w in wrapped.items():
                runs[k].append(_timer(lambda w=w: w(x), device))  # type: ignore[misc]
    rows = []
    bare = runs["bare"]
    for k, w in wrapped.items():
        ratios = [t / b for t, b in zip(runs[k], bare, strict=True)]
        rows.append(
            {
                "model": name,
                "layer": k,
                "bare_ms": 1000 * statistics.median(bare),
                "wrapped_ms": 1000 * statistics.median(runs[k]),
                "ratio": statistics.median(ratios),
                "noise_ms": 1000 * _noise_cost(model, w, x, device),
            }
        )
    for w in wrapped.values():
        w.unwrap()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,vit_base_patch16_224")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args()
    device = torch.device(args.device)
    rows = [r for m in args.models.split(",") for r in bench_model(m, args, device)]
    lines = [
        f"Machine: {describe_machine(device)}. Batch {args.batch}, {args.size}x{args.size}, "
        f"{args.rounds} interleaved rounds after {args.warmup} warm-up rounds, `torch.inference_mode`.",
        "",
        "| model | noise at | bare (ms, median) | wrapped (ms, median) | overhead (median ratio - 1) "
        "| noise step alone (ms) | noise step / bare |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['layer']} | {r['bare_ms']:.1f} | {r['wrapped_ms']:.1f} | "
            f"{100 * (float(r['ratio']) - 1):+.2f}% | {r['noise_ms']:.3f} | "
            f"{100 * float(r['noise_ms']) / float(r['bare_ms']):.3f}% |"
        )
    lines += [
        "",
        "Whole-forward ratios carry the run-to-run jitter of the machine (a few percent on a shared "
        "CPU; negative values are that jitter). The last two columns time the wrapper's own work "
        "(drawing and adding the noise at the point, on the captured features) in isolation, 50 "
        "times: the overhead the wrapper adds to a forward, free of that jitter.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        replace_section("Wrapper overhead", text, device)


if __name__ == "__main__":
    main()
