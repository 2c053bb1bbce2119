"""Evaluation: the oracle, black-box attacks, baseline defenses, data and the protocol.

The names a user needs, in one place:

- [Oracle][randfeat.eval.oracle.Oracle], [AttackResult][randfeat.eval.outcome.AttackResult],
  [rejudge][randfeat.eval.oracle.rejudge]: the attacks' only door to a model, what an attack
  returns, and the judging rule applied afresh.
- [Attack][randfeat.eval.attacks.base.Attack] and
  [ATTACKS][randfeat.eval.attacks.registry.ATTACKS]: the attacks by their command-line names.
- [EvalConfig][randfeat.eval.grid.config.EvalConfig] and
  [run_eval][randfeat.eval.grid.runner.run_eval]: the grid of `randfeat eval`.
- [read_results][randfeat.eval.results.file.read_results] and
  [summarize][randfeat.eval.report.summary.summarize]: a result file and its table.
- [ConfigError][randfeat.eval.errors.ConfigError]: every bad setting, name, path or file.

The names are loaded on first use (PEP 562), so `import randfeat.eval.data` or
`import randfeat.eval.attacks` does not load the grid, the report or the wire protocol. The layout
of the package is described in `docs/architecture.md`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from randfeat.eval.attacks.base import Attack as Attack
    from randfeat.eval.attacks.registry import ATTACKS as ATTACKS
    from randfeat.eval.errors import ConfigError as ConfigError
    from randfeat.eval.grid.config import EvalConfig as EvalConfig
    from randfeat.eval.grid.runner import run_eval as run_eval
    from randfeat.eval.oracle import Oracle as Oracle
    from randfeat.eval.oracle import rejudge as rejudge
    from randfeat.eval.outcome import AttackResult as AttackResult
    from randfeat.eval.report.summary import summarize as summarize
    from randfeat.eval.results.file import read_results as read_results

_HOMES = {
    "ATTACKS": "randfeat.eval.attacks.registry",
    "Attack": "randfeat.eval.attacks.base",
    "AttackResult": "randfeat.eval.outcome",
    "ConfigError": "randfeat.eval.errors",
    "EvalConfig": "randfeat.eval.grid.config",
    "Oracle": "randfeat.eval.oracle",
    "read_results": "randfeat.eval.results.file",
    "rejudge": "randfeat.eval.oracle",
    "run_eval": "randfeat.eval.grid.runner",
    "summarize": "randfeat.eval.report.summary",
}
"""Each public name and the module that defines it, imported on first use."""

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackResult",
    "ConfigError",
    "EvalConfig",
    "Oracle",
    "read_results",
    "rejudge",
    "run_eval",
    "summarize",
]


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'randfeat.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next lookup is a plain attribute read
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
