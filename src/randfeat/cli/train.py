"""`randfeat train`: train a timm model on Fashion-MNIST (no pretrained weights needed).

Runs [train][randfeat.eval.models.training.train] and writes a checkpoint that
`randfeat eval --model NAME --checkpoint FILE` rebuilds exactly (model, stem, preprocessing).
Rerun the same command to resume after an interruption.
"""

from __future__ import annotations

import argparse
import dataclasses

from randfeat.cli.command import Command, logging_to_stderr
from randfeat.eval.data.registry import DATA_SETS
from randfeat.eval.models.timm_models import STEMS
from randfeat.eval.models.training import TrainConfig, train

__all__ = ["COMMAND"]

_D = TrainConfig()


def _add_arguments(p: argparse.ArgumentParser) -> None:
    trainable = ", ".join(repr(d.usage) for d in DATA_SETS.values() if d.split is not None)
    p.add_argument(
        "--model", default=_D.model, metavar="NAME", help=f"a timm model name (default {_D.model})"
    )
    p.add_argument(
        "--data", default=_D.data, metavar="SPEC", help=f"{trainable} (default {_D.data})"
    )
    p.add_argument(
        "--epochs", type=int, default=_D.epochs, metavar="N", help=f"epochs (default {_D.epochs})"
    )
    p.add_argument("--out", required=True, metavar="FILE", help="the checkpoint (rerun to resume)")
    r = p.add_argument_group("recipe")
    r.add_argument(
        "--stem",
        default=_D.stem,
        choices=list(STEMS),
        help=f"first layers for small images (default {_D.stem})",
    )
    for flag, kind, metavar, text in (
        ("--batch-size", int, "N", "images per step"),
        ("--lr", float, "X", "peak learning rate of the one-cycle schedule"),
        ("--weight-decay", float, "X", "weight decay"),
        ("--label-smoothing", float, "X", "label smoothing of the loss"),
        ("--crop-padding", int, "N", "random crops of the image padded by N pixels, 0: none"),
        ("--seed", int, "N", "seed of the weights, the order and the augmentation"),
    ):
        default = getattr(_D, flag[2:].replace("-", "_"))
        r.add_argument(
            flag, type=kind, default=default, metavar=metavar, help=f"{text} (default {default})"
        )
    r.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=_D.flip,
        help="random horizontal flips (default on)",
    )
    r.add_argument(
        "--train-images",
        type=int,
        metavar="N",
        help="train on a random subset of N images (default all)",
    )
    r.add_argument(
        "--test-images",
        type=int,
        metavar="N",
        help="measure on a random subset of N test images (default all)",
    )
    r.add_argument("--threads", type=int, metavar="N", help="torch threads (default torch's)")
    p.add_argument("--quiet", action="store_true", help="warnings only, no progress bar")


def _run(args: argparse.Namespace) -> int:
    given = vars(args)
    cfg = TrainConfig(
        **{f.name: given[f.name] for f in dataclasses.fields(TrainConfig) if f.name in given}
    )
    with logging_to_stderr(args.quiet):
        ckpt = train(cfg)
    last = ckpt.history[-1] if ckpt.history else {}
    print(
        f"{ckpt.model} on {ckpt.data}: test accuracy {100 * last.get('test_accuracy', 0):.2f}% "
        f"after {ckpt.epoch} epoch(s); checkpoint {args.out}.\n"
        f"Evaluate it: randfeat eval --model {ckpt.model} --checkpoint {args.out} "
        f"--data {ckpt.data}"
    )
    return 0


COMMAND = Command(
    name="train",
    help="train a timm model on Fashion-MNIST; resumable; a checkpoint randfeat eval rebuilds",
    description=(
        "Train timm.create_model(NAME, in_chans=1, num_classes=10) with a stem for small images "
        "on Fashion-MNIST's 60,000 training images (SGD, one-cycle schedule, random crops and "
        "flips) and write a checkpoint after every epoch that carries the model name, its stem "
        "and its preprocessing. Rerun the same command to resume from the last epoch done."
    ),
    add_arguments=_add_arguments,
    run=_run,
)
"""The `randfeat train` subcommand."""
