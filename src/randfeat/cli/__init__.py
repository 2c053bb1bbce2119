"""The `randfeat` command line (`randfeat ...` or `python -m randfeat ...`).

Subcommands, one module each, listed in [COMMANDS][randfeat.cli.COMMANDS]:

- `randfeat eval` ([randfeat.cli.eval][]): the evaluation grid of the paper (Nguyen et al., ICLR
  2024, §5) on a model and a data set, written to a resumable JSON Lines file. Runs alone or under
  `torchrun --nproc-per-node N -m randfeat eval ...`.
- `randfeat report` ([randfeat.cli.report][]): the paper-style table (Markdown, CSV) and
  robustness curves of result files.
- `randfeat serve` ([randfeat.cli.serve][]): a (defended) model behind an HTTP API, for
  `randfeat eval --target URL` (or any client) to attack.
- `randfeat demo` ([randfeat.cli.demo][]): the README's first command, an end-to-end run on the
  digits.
- `randfeat train` ([randfeat.cli.train][]): train a timm model on Fashion-MNIST, resumable, into a
  checkpoint that `randfeat eval --checkpoint` rebuilds.

Exit codes: 0 done, 2 bad usage (unknown names, bad values, missing data, unwritable output, a
result file of another configuration or being written by another run), 130 interrupted (rerun
the same command to resume).

To add a subcommand, write `randfeat/cli/<name>.py` holding a
[Command][randfeat.cli.command.Command] named `COMMAND`, and add it to `COMMANDS` below.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from randfeat.cli import demo, eval, report, serve, train
from randfeat.cli.command import Command, UsageError
from randfeat.eval.errors import ConfigError

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: tuple[Command, ...] = (
    eval.COMMAND,
    report.COMMAND,
    serve.COMMAND,
    demo.COMMAND,
    train.COMMAND,
)
"""The subcommands of `randfeat`, in the order `randfeat --help` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The `randfeat` parser with a subparser for every command of `COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="randfeat",
        description="Randomized feature defense: evaluation against query-based attacks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.description,
            argument_default=argparse.SUPPRESS if command.suppress_defaults else None,
        )
        command.add_arguments(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `randfeat` command line; returns the exit code.

    Args:
        argv: the arguments without the program name (default `sys.argv[1:]`).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code) if isinstance(exc.code, int) else 2
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        code: int = args.func(args)
    except (ConfigError, UsageError) as err:
        print(f"randfeat {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"randfeat {args.command}: interrupted; rerun the same command to resume.",
            file=sys.stderr,
        )
        return 130
    return code
