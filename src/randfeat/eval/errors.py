"""The errors of `randfeat eval`, `report` and `demo`: each message says what to fix.

The command line prints the message of a [ConfigError][randfeat.eval.errors.ConfigError] (or of
its subclasses) and exits with code 2.
"""

from __future__ import annotations

__all__ = ["ConfigError", "ReportError", "ResultFileBusy"]


class ConfigError(ValueError):
    """A bad setting, name, path or file: the command line prints the message and exits with 2."""


class ReportError(ConfigError):
    """A result file that cannot be read or reported on (missing, corrupt, duplicated rows)."""


class ResultFileBusy(ConfigError):
    """Another run is writing the result file (it holds the file's lock)."""
