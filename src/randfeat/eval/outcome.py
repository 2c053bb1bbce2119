"""What an attack returns: [AttackResult][randfeat.eval.outcome.AttackResult], and the robust
accuracy it implies at every query count ([robust_accuracy_curve][randfeat.eval.outcome.robust_accuracy_curve]).

The [Oracle][randfeat.eval.oracle.Oracle] builds the result (`Oracle.result`); the grid, the
report and the benchmarks read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AttackResult", "robust_accuracy_curve"]


@dataclass(frozen=True)
class AttackResult:
    """What an attack returns, per sample of the attacked batch of `N` images.

    Attributes:
        x_adv: `[N, C, H, W]`, inside the ε-ball and `[0, 1]`, in the input dtype: the verified
            adversarial point where `success`, else the attack's last iterate.
        success: `[N]` bool, verified success by the majority of `votes` forwards.
        queries: `[N]` int64, queries spent until verified success, or all that were spent.
        success_query: `[N]` int64, the query count at the first verified success, `-1` if none.
        verify_forwards: `[N]` int64, the uncharged verification forwards (D.4) spent.
        budget: the query budget per sample.
        votes: the number of verification votes.
        refused: the model's owner refused a query
            ([QueryRefused][randfeat.eval.errors.QueryRefused]: a stateful detector flagged it,
            or banned the key) and the attack's search ended there, as an attacker meeting an
            HTTP 403 does; queries up to and including the refused ones are in `queries`.
            An attack that reacts to refusals (`adaptive-*`) ends only when it gives up.
    """

    x_adv: Tensor
    success: Tensor
    queries: Tensor
    success_query: Tensor
    verify_forwards: Tensor
    budget: int
    votes: int
    refused: bool = False

    def robust_accuracy(self, queries: int | None = None) -> float:
        """Fraction of samples not fooled within `queries` (default: the budget)."""
        q = torch.tensor([self.budget if queries is None else queries])
        return float(robust_accuracy_curve(self.success, self.success_query, q)[0])

    def robust_curve(self, queries: Tensor) -> Tensor:
        """Robust accuracy at each query count in `queries` (`[Q]`), from this single run."""
        return robust_accuracy_curve(self.success, self.success_query, queries)


def robust_accuracy_curve(success: Tensor, success_query: Tensor, queries: Tensor) -> Tensor:
    r"""Robust accuracy at each query count: $RA(q) = 1 - P[\text{success} \wedge
    \text{success\_query} \le q]$, float64 `[Q]`.

    One run gives the whole curve: a sample fooled at query $s$ is fooled for every budget
    $q \ge s$ (the attacks do not depend on the budget beyond stopping at it).

    Args:
        success: `[N]` bool, verified success per sample.
        success_query: `[N]` int64, the query count at the first verified success.
        queries: `[Q]` query counts.
    """
    q = queries.to(success_query.device).reshape(-1, 1)
    fooled = success.unsqueeze(0) & (success_query.unsqueeze(0) <= q)
    return 1.0 - fooled.double().mean(dim=1)
