"""The logits in a model's output: a tensor, or the `.logits` of an output object.

timm and `torchvision` models return the logits tensor; Hugging Face `transformers` classifiers
return an output object (`ImageClassifierOutput`, `ImageClassifierOutputWithNoAttention`) whose
`.logits` holds them. Everything in randfeat that reads scores (calibration, the theory helpers, the
attacks' oracle, `predict`) reads them through [logits_of][randfeat.outputs.logits_of], so every such
model is accepted as it is.

Tuples are refused on purpose: `transformers` models called with `return_dict=False` return
`(logits, ...)` or `(loss, logits, ...)` depending on their arguments, so "the first item" is not a
rule one can trust.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["logits_of"]


def logits_of(output: object) -> Tensor:
    """The logits in `output`: `output` itself if it is a tensor, else its `.logits` tensor.

    Args:
        output: what the model returned.

    Returns:
        The logits tensor, not copied (`[N, K]` for a classifier).

    Raises:
        TypeError: `output` is neither a tensor nor an object with a `.logits` tensor.

    Examples:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> logits_of(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
        >>> logits_of(SimpleNamespace(logits=torch.ones(2, 3))).sum().item()
        6.0
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    has = f" whose `.logits` is {type(logits).__name__}" if hasattr(output, "logits") else ""
    raise TypeError(
        "Expected the model to return logits: a tensor [N, K] or an object with a `.logits` tensor "
        f"(such as transformers' ImageClassifierOutput), but got {type(output).__name__}{has}. "
        "Return the logits tensor from forward (for transformers, keep return_dict=True)."
    )
