"""What every subcommand of `randfeat` is made of: [Command][randfeat.cli.command.Command].

A subcommand is a module of `randfeat.cli` holding one `Command` (its name, help, arguments and
the function that runs it), listed in `randfeat.cli.COMMANDS`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["Command", "UsageError", "logging_to_stderr"]


class UsageError(Exception):
    """A usage error found by the front end (exit code 2)."""


@dataclass(frozen=True)
class Command:
    """One `randfeat` subcommand.

    Attributes:
        name: the word after `randfeat`.
        help: one line for `randfeat --help`.
        description: the paragraph of `randfeat NAME --help`.
        add_arguments: adds the subcommand's arguments to its parser.
        run: runs it with the parsed arguments; returns the exit code. It raises
            `randfeat.eval.errors.ConfigError` or [UsageError][randfeat.cli.command.UsageError]
            for bad input (exit code 2).
        suppress_defaults: omit flags the user did not give from the parsed arguments (so a
            settings file or preset can fill them in).
    """

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    suppress_defaults: bool = False


@contextlib.contextmanager
def logging_to_stderr(quiet: bool) -> Iterator[None]:
    """Log `randfeat` to stderr (INFO; WARNING with `quiet` or on ranks > 0), restored on exit.

    Restoring matters when `randfeat.cli.main` runs inside another program (tests, notebooks).
    """
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    log = logging.getLogger("randfeat")
    saved = (list(log.handlers), log.level, log.propagate)
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"[rank {rank}] " if world > 1 else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%H:%M:%S"))
    for h in saved[0]:
        log.removeHandler(h)
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet or rank != 0 else logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        for h in saved[0]:
            log.addHandler(h)
        log.setLevel(saved[1])
        log.propagate = saved[2]
