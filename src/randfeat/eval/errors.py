"""The errors of `randfeat eval`, `report` and `demo`: each message says what to fix.

The command line prints the message of a [ConfigError][randfeat.eval.errors.ConfigError] (or of
its subclasses) and exits with code 2.
"""

from __future__ import annotations

__all__ = ["ConfigError", "QueryRefused", "ReportError", "ResultFileBusy"]


class ConfigError(ValueError):
    """A bad setting, name, path or file: the command line prints the message and exits with 2."""


class ReportError(ConfigError):
    """A result file that cannot be read or reported on (missing, corrupt, duplicated rows)."""


class ResultFileBusy(ConfigError):
    """Another run is writing the result file (it holds the file's lock)."""


class QueryRefused(RuntimeError):
    """The model's owner refused a query (a stateful detector flagged it, or banned the key).

    The rows were **sent and not answered**: the [Oracle][randfeat.eval.oracle.Oracle] charges
    them to their samples' budgets, then lets the exception end the attack's call, as a refused
    HTTP request ([QueryRejected][randfeat.eval.remote.QueryRejected]) does.
    """
