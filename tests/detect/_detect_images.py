"""Images for the detection tests: smooth random images that differ from each other a lot."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def smooth_images(n: int, seed: int, shape: tuple[int, int, int] = (1, 28, 28)) -> Tensor:
    """`n` images `[n, *shape]` in [0, 1]: uniform noise at 1/4 resolution, upsampled."""
    c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, c, max(1, h // 4), max(1, w // 4), generator=gen)
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


def probes(x: Tensor, n: int, sigma: float, seed: int) -> Tensor:
    """`n` NES-like probes `x ± σu` of one image `x: [1, C, H, W]`, clipped to [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n, *x.shape[1:], generator=gen)
    return (x + sigma * u).clamp(0, 1)
