"""Cost of `randfeat.calibrate_nu` in clean-pass equivalents, measured in one run.

For one timm model (random weights, `pretrained=False`) and `--n-images` random images, the
labels are the model's own clean predictions, so the base accuracy is 100% by construction and every
target drop is reachable. The script times:

* one plain clean pass (`model(x)` in batches of `--batch-size`, no hooks), median of
  `--rounds`;
* `calibrate_nu` at the classifier input (`fc.pre` / `head.pre`: a linear head, so the
  projected path: the noise drawn and projected to the logits once);
* the same point with the classifier wrapped in `nn.Sequential` (so not an `nn.Linear`: the
  cached-head path, which re-runs the head on noisy features for every candidate), unless
  `--skip-head`;
* `calibrate_nu` at a mid-network layer (`layer3` / `blocks.6`: full noisy forwards) on
  `--fallback-images` images, unless `--skip-fallback`,

all with the targets of `--targets` in one call, and reports wall time / clean-pass wall time and
the forwards counted by the calibration (`model_evals` single-image forwards, `head_evals`
head-only evaluations). Prints Markdown and the machine; `--write` replaces the section
"Calibration cost, <model> <size>×<size>, <N> images" of `docs/benchmarks.md`.

Usage (the figures in docs/benchmarks.md; a short check: `--n-images 64 --rounds 1`):

    python benchmarks/calibration.py --model resnet18 --image-size 32 --n-images 1024 --write
    python benchmarks/calibration.py --model resnet50 --image-size 224 --n-images 2000 --batch-size 64 --fallback-draws 2 --fallback-images 50 --write
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import timm
import torch
from common.machine import describe_machine, replace_section
from common.measure import sync
from torch import nn

import randfeat
from randfeat.layers import find_classifier

HEAD = {"resnet": "fc.pre", "vit": "head.pre", "deit": "head.pre"}
MID = {"resnet": "layer3", "vit": "blocks.6", "deit": "blocks.6"}


def _family(name: str) -> str:
    for k in HEAD:
        if name.startswith(k):
            return k
    raise SystemExit(f"--model {name!r}: pass --fast-layer and --mid-layer for this family.")


def clean_pass(model: torch.nn.Module, x: torch.Tensor, batch: int, device: torch.device) -> float:
    """Wall time of one plain pass over `x` (no hooks, no checks)."""
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for chunk in x.split(batch):
            model(chunk).argmax(1)
    sync(device)
    return time.perf_counter() - t0


def head_in_sequential(model: nn.Module) -> tuple[nn.Module, str]:
    """A copy of `model` whose classifier is wrapped in `nn.Sequential` (same function, but
    not an `nn.Linear`, so calibration takes the cached-head path), and its `.pre` spec."""
    other = copy.deepcopy(model)
    name, clf = find_classifier(other)
    parent, _, attr = name.rpartition(".")
    setattr(other.get_submodule(parent) if parent else other, attr, nn.Sequential(clf))
    return other, f"{name}.pre"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128, help="rows per forward (clean and noisy)")
    p.add_argument(
        "--num-classes", type=int, default=None, help="classes of the head (default: timm's 1000)"
    )
    p.add_argument("--targets", type=float, nargs="+", default=[0.01, 0.02, 0.04])
    p.add_argument("--fast-layer", default=None, help="default: fc.pre (ResNet) / head.pre (ViT)")
    p.add_argument("--mid-layer", default=None, help="default: layer3 (ResNet) / blocks.6 (ViT)")
    p.add_argument("--fallback-draws", type=int, default=None, help="default: calibrate_nu's")
    p.add_argument(
        "--fallback-images",
        type=int,
        default=200,
        help="images for the fallback path (each candidate costs `draws` clean passes, so the "
        "full set would take hours on a CPU); its clean-pass equivalents use its own clean pass",
    )
    p.add_argument("--skip-fallback", action="store_true")
    p.add_argument("--skip-head", action="store_true", help="skip the cached-head comparison")
    p.add_argument("--rounds", type=int, default=3, help="clean passes timed (median)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args()

    device = torch.device(args.device)
    fam = _family(args.model) if args.fast_layer is None or args.mid_layer is None else ""
    fast_layer = args.fast_layer or HEAD[fam]
    mid_layer = args.mid_layer or MID[fam]
    torch.manual_seed(args.seed)
    kw: dict[str, Any] = {"pretrained": False}
    if fam in ("vit", "deit"):
        kw["img_size"] = args.image_size
    if args.num_classes is not None:
        kw["num_classes"] = args.num_classes
    model = timm.create_model(args.model, **kw).eval().to(device)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.n_images, 3, args.image_size, args.image_size, generator=gen).to(device)
    with torch.no_grad():  # labels from a short warm-up-free pass when the full pass is timed below
        model(x[: args.batch_size])  # warm-up
        sync(device)
        t0 = time.perf_counter()
        y = torch.cat([model(c).argmax(1) for c in x.split(args.batch_size)])
        sync(device)
        first = time.perf_counter() - t0
    clean = (
        first
        if args.rounds <= 1
        else statistics.median(
            clean_pass(model, x, args.batch_size, device) for _ in range(args.rounds)
        )
    )

    n_fb = min(args.fallback_images, args.n_images)
    clean_fb = clean
    if not args.skip_fallback and n_fb < args.n_images:
        clean_fb = statistics.median(
            clean_pass(model, x[:n_fb], args.batch_size, device) for _ in range(args.rounds)
        )
    runs = [("projected", model, fast_layer, None, args.n_images, clean)]
    if not args.skip_head:
        sequential, head_layer = head_in_sequential(model)
        runs.append(("cached head", sequential, head_layer, None, args.n_images, clean))
    if not args.skip_fallback:
        runs.append(("fallback", model, mid_layer, args.fallback_draws, n_fb, clean_fb))
    rows = []
    for label, net, layer, draws, n_run, clean_run in runs:
        # each round times a plain clean pass right before the calibration, so the ratio of the
        # two is taken under the same machine load (2-core VMs drift by ±15% within a minute);
        # the full-forward fallback is long and runs once against the clean pass measured above
        rounds = 1 if label == "fallback" else args.rounds
        walls, cleans = [], []
        for _ in range(rounds):
            if label != "fallback":
                cleans.append(clean_pass(net, x[:n_run], args.batch_size, device))
            sync(device)
            t0 = time.perf_counter()
            cs = randfeat.calibrate_nu(
                net,
                (x[:n_run], y[:n_run]),
                layer,
                args.targets,
                seed=args.seed,
                draws=draws,
                batch_size=args.batch_size,
                progress=False,
            )
            sync(device)
            walls.append(time.perf_counter() - t0)
        cleans = cleans or [clean_run]  # the fallback: one round against its own clean pass
        wall, clean_used = statistics.median(walls), statistics.median(cleans)
        ratio = statistics.median(w / c for w, c in zip(walls, cleans, strict=True))
        c = cs[0]
        n = c.n_images
        nus = ", ".join(f"{r.nu:.3g}" for r in cs)
        drops = ", ".join(f"{r.drop:.4f}" for r in cs)
        rows.append(
            f"| {label} | `{layer}` | {n} | {c.path} | {c.draws} | {len(c.history)} | {rounds} | "
            f"{wall:.2f} | {clean_used:.2f} | **{ratio:.2f}** | {c.model_evals / n:.1f} | "
            f"{c.head_evals / n:.0f} | {nus} | {drops} |"
        )

    body = "\n".join(
        [
            f"`python benchmarks/calibration.py --model {args.model} --n-images {args.n_images} "
            f"--image-size {args.image_size} --batch-size {args.batch_size}"
            + (f" --fallback-draws {args.fallback_draws}" if args.fallback_draws else "")
            + f" --fallback-images {args.fallback_images}"
            + (" --skip-head" if args.skip_head else "")
            + (" --skip-fallback" if args.skip_fallback else "")
            + f" --rounds {args.rounds}"
            + "`",
            "",
            f"Machine: {describe_machine(device)}. Random weights, "
            f"{find_classifier(model)[1].out_features} classes; labels = the model's own clean "
            "predictions (base accuracy 100%). Targets "
            f"{', '.join(str(t) for t in args.targets)} in one call. One plain clean pass over the "
            f"same {args.n_images} images: {clean:.2f} s (median of {args.rounds}). The projected "
            "and cached-head paths run `rounds` times, each right after a plain clean pass over "
            "the same images: `wall` and `clean pass` are medians, `clean-pass equiv.` the median "
            "of the per-round ratios; the fallback runs once against a clean pass over its own "
            "images.",
            "",
            "| run | layer | images | path | draws | candidates | rounds | wall (s) | clean pass (s) "
            "| clean-pass equiv. | model evals / N | head evals / N | ν per target | drop per target |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(body)
    if args.write:
        title = (
            f"Calibration cost, {args.model} {args.image_size}×{args.image_size}, "
            f"{args.n_images} images"
            + ("" if args.num_classes is None else f", {args.num_classes} classes")
        )
        replace_section(title, body, device)


if __name__ == "__main__":
    main()
