"""Per-sample losses on logits: the margin loss of Eq. 3 and the log-probability of the true class.

The margin loss is what score-based attacks descend (Square, SignHunter, NES) and what Theorem 1
differentiates; both call this one function.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from randfeat.checks import check_choice

__all__ = ["LOSSES", "Loss", "margin_loss", "sample_loss"]

Loss = Literal["margin", "ce"]
"""`"margin"`: Eq. 3; `"ce"`: the log-probability of the true class (minus the cross-entropy)."""
LOSSES: tuple[Loss, ...] = ("margin", "ce")


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """The margin loss of Eq. 3 per row: $\\mathcal{L}(f(x), y) = f_y(x) - \\max_{i \\neq y} f_i(x)$.

    Positive when the row is classified `y`, `<= 0` when it is not (an attack has fooled the model).
    No checks and no synchronisation: it runs on every query of an attack. With one class the
    maximum over no other class is $-\\infty$, so the margin is $+\\infty$.

    Args:
        logits: `[N, K]` scores, any floating dtype (the result has the same dtype and device).
        y: `[N]` int64 labels in `[0, K)`.

    Returns:
        `[N]` margins.

    Examples:
        >>> import torch
        >>> margin_loss(torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 5.0]]), torch.tensor([0, 1]))
        tensor([1., 0.])
    """
    index = y.view(-1, 1)
    true = logits.gather(1, index).squeeze(1)
    other = logits.scatter(1, index, float("-inf")).amax(dim=1)
    return true - other


def sample_loss(logits: Tensor, y: Tensor, loss: Loss = "margin") -> Tensor:
    """The loss named `loss` per row, larger = safer: the margin (Eq. 3) or $\\log p_y$.

    Args:
        logits: `[N, K]` scores.
        y: `[N]` int64 labels.
        loss: `"margin"` ([margin_loss][randfeat.losses.margin_loss]) or `"ce"` (the
            log-probability of the true class, i.e. minus the cross-entropy).

    Returns:
        `[N]` losses.

    Raises:
        ValueError: an unknown `loss`.
    """
    if check_choice(loss, "loss", LOSSES) == "margin":
        return margin_loss(logits, y)
    return -nn.functional.cross_entropy(logits, y, reduction="none")
