"""`randfeat demo`: the README's first command, an end-to-end run on the embedded digits.

Runs [run_demo][randfeat.eval.demo.run_demo].
"""

from __future__ import annotations

import argparse

from randfeat.cli.command import Command
from randfeat.eval.demo import run_demo

__all__ = ["COMMAND"]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", metavar="DIR", help="keep results.jsonl, results.md, results.csv and results.png"
    )
    p.add_argument(
        "--n-images",
        type=int,
        default=100,
        metavar="N",
        help="attacked images, a multiple of 10 (default 100)",
    )
    p.add_argument(
        "--budget", type=int, default=1000, metavar="B", help="queries per image (default 1000)"
    )
    p.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seed of the whole run (default 0)"
    )
    p.add_argument(
        "--data",
        default="digits",
        metavar="SPEC",
        help="'digits' (embedded, the default) or 'fashion-mnist[:PATH]' (real 28×28 images)",
    )
    p.add_argument("--quiet", action="store_true", help="print only the table")


def _run(args: argparse.Namespace) -> int:
    return run_demo(
        args.out,
        n_images=args.n_images,
        budget=args.budget,
        seed=args.seed,
        quiet=args.quiet,
        data=args.data,
    )


COMMAND = Command(
    name="demo",
    help="attack the digits CNN under Base, Input (RND) and Feature defenses (about a minute)",
    description=(
        "The README's first command: calibrate RND and the randomized feature defense to the "
        "same 2-point drop in clean accuracy on the embedded digits, run Square, NES, "
        "SignHunter (ℓ∞), RayS and SignFlip against Base, Input and Feature, and print the "
        "table. Real runs, about a minute on 2 CPU cores. --data fashion-mnist runs the same "
        "table on Fashion-MNIST's real 28×28 images with fashion-cnn."
    ),
    add_arguments=_add_arguments,
    run=_run,
)
"""The `randfeat demo` subcommand."""
