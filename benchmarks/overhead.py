"""Wrapper overhead against the bare model, and OnnxDefended against plain onnxruntime, in one run.

For each model the bare forward and the wrapped forwards (`penultimate`, a mid-network layer and
`input`) are timed interleaved (round-robin, so drift hits every variant alike); the median of the
per-round ratios wrapped/bare is reported, with the noise step and the wrapper's fixed cost per
forward (hooks and per-context state, measured on a tiny model where nothing else hides them) timed
alone. With `--onnx`, each model is also exported twice, bare (`torch.onnx.export`) and defended at
`penultimate` (`randfeat.export.to_onnx`), and `OnnxDefended` is timed against a plain onnxruntime
session of the bare graph, interleaved. Results are printed as Markdown and, with `--write`, replace
the "Wrapper overhead" (and "ONNX runtime overhead") sections of `docs/benchmarks.md`.

Usage:

    python benchmarks/overhead.py                    # resnet50 + vit_base_patch16_224, 224x224, batch 32
    python benchmarks/overhead.py --onnx --write     # the figures in docs/benchmarks.md
    python benchmarks/overhead.py --models resnet18 --size 64 --batch 4 --rounds 3 --onnx  # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from common.machine import describe_machine, replace_section
from common.measure import sync

import randfeat
from randfeat.noise import NoiseRNG, standard_normal

MID = {"resnet": "layer3", "vit": "blocks.6"}  # by name prefix; other models skip the mid layer


def _timer(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
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


def _mid_layer(name: str) -> str | None:
    return next((layer for prefix, layer in MID.items() if name.startswith(prefix)), None)


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval().to(device)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    variants = {"penultimate": ["penultimate"]}
    mid = _mid_layer(name)
    if mid is not None:
        variants[f"mid ({mid})"] = [mid]
    variants["input"] = ["input"]
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


def fixed_cost_us(device: torch.device, calls: int = 2000) -> tuple[float, float, float]:
    """Median µs per forward of a tiny model: bare, wrapped with ν = 0 (hooks and per-context
    state, no draw) and wrapped with ν > 0, interleaved in rounds of `calls` forwards."""
    tiny = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)).eval().to(device)
    x = torch.rand(1, 8, device=device)
    quiet = randfeat.wrap(tiny, nu=0.0)
    noisy = randfeat.wrap(tiny, nu=0.01)
    fns = {"bare": lambda: tiny(x), "nu0": lambda: quiet(x), "noisy": lambda: noisy(x)}
    per: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(7):
            for k, fn in fns.items():
                t = _timer(lambda fn=fn: [fn() for _ in range(calls)], device)  # type: ignore[misc]
                per[k].append(1e6 * t / calls)
    return tuple(statistics.median(per[k]) for k in fns)  # type: ignore[return-value]


def bench_onnx(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """OnnxDefended (noise as inputs, drawn per call) against a plain session of the bare graph."""
    import onnxruntime as ort

    from randfeat.export import OnnxDefended, to_onnx

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.rand(args.batch, 3, args.size, args.size)
    bare_path, defended_path = workdir / f"{name}.onnx", workdir / f"{name}-defended.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(bare_path), dynamo=True, verbose=False)
        to_onnx(randfeat.wrap(model, nu=0.01), x, defended_path)
    providers = ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(bare_path), providers=providers)
    feed = {session.get_inputs()[0].name: x.numpy()}
    defended = OnnxDefended(defended_path, providers=providers)
    xn = x.numpy()
    runs: dict[str, list[float]] = {"bare": [], "defended": []}
    cpu = torch.device("cpu")
    for _ in range(args.warmup):
        session.run(None, feed)
        defended(xn)
    for _ in range(args.rounds):
        runs["bare"].append(_timer(lambda: session.run(None, feed), cpu))
        runs["defended"].append(_timer(lambda: defended(xn), cpu))
    ratios = [d / b for d, b in zip(runs["defended"], runs["bare"], strict=True)]
    return {
        "model": name,
        "bare_ms": 1000 * statistics.median(runs["bare"]),
        "defended_ms": 1000 * statistics.median(runs["defended"]),
        "ratio": statistics.median(ratios),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,vit_base_patch16_224")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--onnx", action="store_true", help="also time OnnxDefended (CPU)")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args()
    device = torch.device(args.device)
    models = args.models.split(",")
    rows = [r for m in models for r in bench_model(m, args, device)]
    bare_us, nu0_us, noisy_us = fixed_cost_us(device)
    machine = describe_machine(device)
    lines = [
        f"Machine: {machine}. Batch {args.batch}, {args.size}x{args.size}, "
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
        "",
        f"The wrapper's fixed cost per forward (its hooks and per-thread state), on a two-layer model "
        f"of 8 features at batch 1, median of 7 rounds of 2000 calls: bare {bare_us:.1f} µs, wrapped "
        f"with ν = 0 {nu0_us:.1f} µs (+{nu0_us - bare_us:.1f} µs: hooks and per-context state), "
        f"wrapped with ν > 0 {noisy_us:.1f} µs (+{noisy_us - bare_us:.1f} µs with the draw), "
        f"that is {100 * (nu0_us - bare_us) / (1000 * float(rows[0]['bare_ms'])):.4f}% of a "
        f"{rows[0]['model']} forward above.",
    ]
    text = "\n".join(lines)
    print(text)
    onnx_text = ""
    if args.onnx:
        with tempfile.TemporaryDirectory() as tmp:
            onnx_rows = [bench_onnx(m, args, Path(tmp)) for m in models]
        onnx_lines = [
            f"Machine: {describe_machine(torch.device('cpu'))}; onnxruntime CPUExecutionProvider. "
            f"Batch {args.batch}, {args.size}x{args.size}, {args.rounds} interleaved rounds after "
            f"{args.warmup} warm-up rounds. Defended: noise at `penultimate`, exported by "
            "`randfeat.export.to_onnx` and run by `OnnxDefended` (which draws the noise inputs from "
            "OS entropy at every call); bare: `torch.onnx.export` of the undefended model in a plain "
            "`onnxruntime.InferenceSession`.",
            "",
            "| model | plain session (ms, median) | OnnxDefended (ms, median) | overhead (median ratio - 1) |",
            "|---|---|---|---|",
        ]
        for r in onnx_rows:
            onnx_lines.append(
                f"| {r['model']} | {r['bare_ms']:.1f} | {r['defended_ms']:.1f} | "
                f"{100 * (float(r['ratio']) - 1):+.2f}% |"
            )
        onnx_text = "\n".join(onnx_lines)
        print()
        print(onnx_text)
    if args.write:
        replace_section("Wrapper overhead", text, device)
        if onnx_text:
            replace_section("ONNX runtime overhead", onnx_text, torch.device("cpu"))


if __name__ == "__main__":
    main()
