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
import os
import time

import torch
from common.machine import describe_machine, replace_section
from common.measure import Counting, log, sync
from common.memory import Peak, peak_memory, tune_malloc
from common.throughput_report import Round, Row, projection, report
from torch import Tensor

from randfeat.eval.data.loaders import balanced_subset
from randfeat.eval.data.registry import DataSpec
from randfeat.eval.grid.config import EvalConfig
from randfeat.eval.grid.units import UnitRunner, build_attacks, build_forwards
from randfeat.eval.models.sources import ModelRequest, model_source
from randfeat.eval.results.records import AttackRow, Unit
from randfeat.wrapper import RandomizedFeatureWrapper, wrap


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
    counted = Counting(forward, device)  # every image forward of the evaluation
    runner = UnitRunner(cfg, device, tuple(range(args.n_images)), x, y)
    runner.defended = {name: defended}
    runner.forwards = {name: counted}
    runner.attacks = build_attacks(cfg)
    # the pure forward: fb rows of the attacked images, through the same Forward
    rows = x.repeat((fb + x.shape[0] - 1) // x.shape[0], 1, 1, 1)[:fb].to(device)

    def pure() -> float:
        """Rows per second of back-to-back forwards for at least `--pure-seconds` (3 calls min)."""
        calls = 0
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            while calls < 3 or time.perf_counter() - t0 < args.pure_seconds:
                forward(rows)
                calls += 1
                sync(device)
        return calls * fb / (time.perf_counter() - t0)

    with torch.no_grad():  # warm-up: compile (every batch size, and 1), allocator, caches
        for n in (fb, max(1, fb // 2 + 1), 1):
            forward(rows[:n])
    rounds = []
    out = []
    eval_peak = pure_peak = Peak()
    for k in range(args.rounds):  # every round repeats the same work: the units reseed
        counted.reset(0)
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
        log(
            f"forward batch {fb}: {r.rate:,.1f} forwards/s (evaluation) vs "
            f"{r.pure_rows_per_s:,.1f} rows/s (pure): ratio {r.ratio:.2f}"
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
