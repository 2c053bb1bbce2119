"""Benign query streams, by name: what a stateful detector must not flag (its false-positive side).

A detector of attack query streams ([randfeat.detect][]) flags a query that is a near-duplicate of
an earlier one. Benign clients send near-duplicates too, and each stream here is one such client,
seeded and reproducible, built from the images it is given ($x \\in [0, 1]^{C \\times H \\times W}$):

| name | the client | queries |
|---|---|---|
| `in-order` | a test set streamed once, in order | $N$ |
| `re-upload` | each image, later re-uploaded with natural changes (crop, flip, brightness, JPEG) | $N (1 + c)$ |
| `occlusion` | occlusion-sensitivity sessions (Zeiler and Fergus, 2014) on a few images | $s (1 + P)$ |
| `lime` | LIME sessions (Ribeiro et al., 2016): random masks over superpixels | $s \\cdot m$ |
| `retry` | a client that retries every request (exact duplicates) | $N r$ |

An explanation session queries one image many times with parts of it hidden: a stateful defense
that flags it stops the service's own users from explaining its answers. The streams are returned
as one tensor in the order the client sends them: feed it to a detector in that order.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor

from randfeat.checks import check_batch, check_choice, check_seed

__all__ = ["WORKLOADS", "Workload", "benign_stream"]


@dataclass(frozen=True)
class Workload:
    """One benign client, by name.

    Attributes:
        name: the name `benign_stream` and `--workloads` take.
        description: one line for tables.
        make: `(images [N, C, H, W] in [0, 1], generator) -> queries [Q, C, H, W] in [0, 1]`, in
            the order the client sends them.
    """

    name: str
    description: str
    make: Callable[[Tensor, torch.Generator], Tensor]


def _in_order(x: Tensor, g: torch.Generator) -> Tensor:
    return x.clone()


def _jpeg(x: Tensor, quality: int) -> Tensor:
    """`x [C, H, W]` in [0, 1] (C = 1 or 3) through a JPEG encode and decode at `quality` (Pillow,
    which torchvision installs)."""
    import io

    import numpy as np
    from PIL import Image

    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8).cpu().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(u8[..., 0] if u8.shape[-1] == 1 else u8).save(buf, "JPEG", quality=quality)
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.uint8).reshape(u8.shape)
    return torch.from_numpy(back.copy()).permute(2, 0, 1).to(x.device, x.dtype) / 255


def _natural_change(x: Tensor, g: torch.Generator) -> Tensor:
    """A re-upload of `x [C, H, W]`: a crop of 85-100% of each side resized back, a horizontal
    flip with probability 1/2, brightness × U(0.8, 1.2), JPEG re-encoding at quality 70-95."""
    _, h, w = x.shape
    u = torch.rand(6, generator=g).tolist()
    ch, cw = max(1, round(h * (0.85 + 0.15 * u[0]))), max(1, round(w * (0.85 + 0.15 * u[1])))
    top, left = int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1))
    crop = x[:, top : top + ch, left : left + cw]
    out = F.interpolate(crop[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    if u[4] < 0.5:
        out = out.flip(-1)
    out = (out * (0.8 + 0.4 * u[5])).clamp(0, 1)
    quality = int(torch.randint(70, 96, (1,), generator=g))
    return _jpeg(out, quality) if out.shape[0] in (1, 3) else out


def _re_upload(x: Tensor, g: torch.Generator, copies: int = 2) -> Tensor:
    """Every image once, then `copies` changed re-uploads of each, in a random order."""
    again = torch.stack([_natural_change(x[i], g) for i in range(len(x)) for _ in range(copies)])
    return torch.cat([x, again[torch.randperm(len(again), generator=g)]])


def _sessions(x: Tensor, sessions: int) -> Tensor:
    return x[: min(sessions, len(x))]


def _occlusion(x: Tensor, g: torch.Generator, sessions: int = 4) -> Tensor:
    """Occlusion sensitivity as captum's `Occlusion` runs it: the image, then the image with a
    square window set to 0 at every position (window a quarter of the side, stride an eighth)."""
    out = []
    for img in _sessions(x, sessions):
        _, h, w = img.shape
        k, s = max(1, h // 4), max(1, h // 8)
        out.append(img[None])
        for top in range(0, h - k + 1, s):
            for left in range(0, w - k + 1, s):
                hidden = img.clone()
                hidden[:, top : top + k, left : left + k] = 0
                out.append(hidden[None])
    return torch.cat(out)


def _lime(x: Tensor, g: torch.Generator, sessions: int = 4, samples: int = 1000) -> Tensor:
    """LIME's image sampling (`lime_image.LimeImageExplainer.data_labels`): superpixels (here square
    cells of about 1/7 of the side), each kept with probability 1/2 in each sample, the hidden ones
    filled with their own mean colour (LIME's default `hide_color=None`); the first sample is the
    image itself."""
    out = []
    for img in _sessions(x, sessions):
        _, h, w = img.shape
        cell = max(1, math.ceil(h / 7))
        rows, cols = math.ceil(h / cell), math.ceil(w / cell)
        pooled = F.avg_pool2d(img[None], cell, ceil_mode=True)  # each cell's mean colour
        fudged = pooled.repeat_interleave(cell, -2).repeat_interleave(cell, -1)[..., :h, :w]
        keep = torch.randint(0, 2, (samples, 1, rows, cols), generator=g).to(img.device, img.dtype)
        keep[0] = 1
        mask = keep.repeat_interleave(cell, -2).repeat_interleave(cell, -1)[..., :h, :w]
        out.append(mask * img[None] + (1 - mask) * fudged)
    return torch.cat(out)


def _retry(x: Tensor, g: torch.Generator, retries: int = 3) -> Tensor:
    """Every request sent `retries` times in a row (a client that retries on a timeout)."""
    return x.repeat_interleave(retries, dim=0)


WORKLOADS: Mapping[str, Workload] = MappingProxyType(
    {
        w.name: w
        for w in (
            Workload("in-order", "the images streamed once, in order", _in_order),
            Workload(
                "re-upload", "each image, then 2 re-uploads: crop, flip, light, JPEG", _re_upload
            ),
            Workload("occlusion", "occlusion sessions on 4 images (window side/4)", _occlusion),
            Workload("lime", "LIME sessions on 4 images (1,000 masks each)", _lime),
            Workload("retry", "every request sent 3 times (exact duplicates)", _retry),
        )
    }
)
"""The benign clients by name (see the module's table)."""


def benign_stream(name: str, images: Tensor, seed: int | None = 0) -> Tensor:
    """The queries of the benign client `name` built from `images`, in the order it sends them.

    Args:
        name: a key of [WORKLOADS][randfeat.eval.workloads.WORKLOADS].
        images: `[N, C, H, W]` in $[0, 1]$.
        seed: the stream's seed (`None`: OS entropy).

    Returns:
        `[Q, C, H, W]` in $[0, 1]$, on the images' device and dtype.

    Raises:
        ValueError: an unknown name (the closest names are given), images that are not a batch of
            images in [0, 1].
    """
    workload = WORKLOADS[check_choice(name, "name", list(WORKLOADS))]
    x = check_batch(images, "images")
    if x.ndim != 4:
        raise ValueError(
            f"Expected argument `images` to be a batch of images [N, C, H, W], but got shape "
            f"{list(x.shape)}; add the channel dimension (x.unsqueeze(1) for grey images)."
        )
    if bool(torch.isnan(x).any()) or float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError("Expected argument `images` to hold values in [0, 1] (no NaN).")
    s = check_seed(seed)
    g = torch.Generator()
    g.manual_seed(s if s is not None else secrets.randbits(63))
    return workload.make(x, g)
