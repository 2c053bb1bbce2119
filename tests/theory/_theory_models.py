"""A toy model for the theory tests: exactly linear, so Eq. 26 holds exactly."""

from __future__ import annotations

import torch
from torch import nn


class TwoLinear(nn.Module):
    """f = g ∘ h with h(x) = A x and g(z) = B z + c, two classes: the margin is exactly linear."""

    def __init__(self, d: int, m: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.h = nn.Linear(d, m, bias=False)
        self.head = nn.Linear(m, 2)
        with torch.no_grad():
            self.h.weight.copy_(torch.randn(m, d, generator=gen))
            self.head.weight.copy_(torch.randn(2, m, generator=gen))
            self.head.bias.copy_(torch.randn(2, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.h(x.flatten(1)))
