"""Evaluation: the oracle, black-box attacks, baseline defenses, data and the protocol.

The names a user needs, in one place:

- [Oracle][randfeat.eval.oracle.Oracle], [AttackResult][randfeat.eval.oracle.AttackResult],
  [rejudge][randfeat.eval.oracle.rejudge]: the attacks' only door to a model, what an attack
  returns, and the judging rule applied afresh.
- [Attack][randfeat.eval.attacks.base.Attack] and
  [ATTACKS][randfeat.eval.attacks.registry.ATTACKS]: the attacks by their command-line names.
- [EvalConfig][randfeat.eval.grid.config.EvalConfig] and
  [run_eval][randfeat.eval.grid.runner.run_eval]: the grid of `randfeat eval`.
- [read_results][randfeat.eval.resultfile.read_results] and
  [summarize][randfeat.eval.report.summary.summarize]: a result file and its table.
- [ConfigError][randfeat.eval.errors.ConfigError]: every bad setting, name, path or file.

The layout of the package is described in `docs/architecture.md`.
"""

from __future__ import annotations

from randfeat.eval.attacks.base import Attack as Attack
from randfeat.eval.attacks.registry import ATTACKS as ATTACKS
from randfeat.eval.errors import ConfigError as ConfigError
from randfeat.eval.grid.config import EvalConfig as EvalConfig
from randfeat.eval.grid.runner import run_eval as run_eval
from randfeat.eval.oracle import AttackResult as AttackResult
from randfeat.eval.oracle import Oracle as Oracle
from randfeat.eval.oracle import rejudge as rejudge
from randfeat.eval.report.summary import summarize as summarize
from randfeat.eval.resultfile import read_results as read_results

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
