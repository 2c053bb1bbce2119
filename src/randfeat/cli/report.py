"""`randfeat report`: the paper-style table and robustness curves of result files.

Prints the table of [write_report][randfeat.eval.report.files.write_report] and writes it as
Markdown and CSV (and, with `--plot`, robust accuracy against queries).
"""

from __future__ import annotations

import argparse
import sys

from randfeat.cli.command import Command
from randfeat.eval.report.files import FORMATS, parse_formats, write_report
from randfeat.eval.report.render import to_markdown

__all__ = ["COMMAND"]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", metavar="RESULTS.jsonl", help="result file(s)")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="directory for the table files and the plot (default: beside the first result file)",
    )
    p.add_argument("--plot", action="store_true", help="also draw <name>.png (needs matplotlib)")
    p.add_argument(
        "--format",
        default=",".join(FORMATS),
        metavar=",".join(FORMATS),
        help="table files to write: a comma list of md, csv (default md,csv; 'none' for none)",
    )


def _run(args: argparse.Namespace) -> int:
    formats = parse_formats(str(args.format))
    table, written = write_report(list(args.results), args.out, formats=formats, plot=args.plot)
    sys.stdout.write(to_markdown(table))
    if written:
        sys.stdout.write("\nWrote " + ", ".join(str(p) for p in written) + "\n")
    return 0


COMMAND = Command(
    name="report",
    help="paper-style table (Markdown, CSV) and robustness curves from result files",
    description=(
        "Print the paper-style table of one or more result files of `randfeat eval` (rows "
        "model × defense with clean accuracy, achieved drop and ν; columns attack × budget and "
        "the worst case over the attacks; robust accuracy in %, verified / re-judged afresh) and "
        "write it as Markdown and CSV. --plot also draws robust accuracy against queries (needs "
        "matplotlib)."
    ),
    add_arguments=_add_arguments,
    run=_run,
)
"""The `randfeat report` subcommand."""
