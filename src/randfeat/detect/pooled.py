"""`pooled-linf`: the default detector: the ℓ∞ distance between area-pooled images, found by LSH.

A query-based attack on an image $x_0$ sends queries that all lie in a small ball around $x_0$:
an ℓ∞ attack at radius ε never sends two queries more than $2\\varepsilon$ apart in any pixel.
Two different benign images differ a lot *somewhere*. The score compares exactly that:

$$ \\operatorname{score}(q, c) = 1 - \\max_j \\big| \\bar q_j - \\bar c_j \\big|, \\qquad
   \\bar x = \\operatorname{pool}_{s \\times s}(x), $$

the largest difference between the area-pooled images (`size` $s = 14$: each value is the mean
of a $2 \\times 2$ block at 28×28, of a $16 \\times 16$ block at 224×224), over the closest
earlier query $c$. Pooling averages away what attacks add pixel by pixel (NES's Gaussian probes
$x \\pm \\sigma u$, sign patterns) while keeping what tells images apart; the maximum ignores how
*many* values moved (sign attacks move all of them a little, benign neighbours few of them a
lot). The payload stored per query is $\\bar x$ in bytes ($C s^2$: 196 bytes at 28×28), so the
score is exact up to the $1/255$ rounding, and the image cannot be recovered beyond that
resolution.

Finding the closest earlier query: `tables` keys per query from p-stable locality-sensitive
hashing (Datar, Immorlica, Indyk, Mirrokni, SoCG 2004) of the pooled image: key $t$ hashes the
`projections` integers $\\lfloor (a_{ti} \\cdot \\bar x + b_{ti}) / w \\rfloor$, with secret
$a_{ti} \\sim N(0, I / D)$ and $b_{ti} \\sim U[0, w)$. Two queries whose pooled images are
close share each key with a probability that falls with their distance, so the queries of one
attack share keys with each other; the stored queries sharing a key (each key's newest
`posting_cap`, 8 by default) are the candidates, at most $16 \\times 8 = 128$ a query, and the
score is computed exactly on them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from randfeat.checks import check_int, check_positive_float
from randfeat.detect.base import Detector
from randfeat.detect.hashing import derive_generator, hash_coefficients, keyed_hash
from randfeat.detect.pairs import shared_pairs
from randfeat.detect.stores.base import Candidates

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from randfeat.detect.base import DetectorOptions

__all__ = ["PooledLinf", "pooled_payload"]

_SEQ_BITS = 40
_SEQ_MASK = (1 << _SEQ_BITS) - 1


def pooled_payload(x: Tensor, size: int) -> Tensor:
    """The area-pooled image `[N, C·s·s]` in bytes (uint8, `round(255·mean)`), `s = min(size, H, W)`
    per side."""
    pooled = F.adaptive_avg_pool2d(x.float(), (min(size, x.shape[2]), min(size, x.shape[3])))
    return torch.round(pooled.flatten(1) * 255).to(torch.uint8)


def linf_similarity(a: Tensor, b: Tensor) -> Tensor:
    """$255 - \\max_j |a_j - b_j|$ of payloads `a, b: [..., D]` (uint8), as int64."""
    return 255 - (torch.maximum(a, b) - torch.minimum(a, b)).amax(dim=-1).long()


class PooledLinf(Detector):
    """The default detector (see the module docstring): ℓ∞ on area-pooled images, LSH lookup.

    Args:
        size: side of the pooled image (`s`).
        tables: keys per query (`K`), one per hash table.
        projections: projections hashed into each key.
        width: bucket width `w` of each projection, in units of the root-mean-square difference
            of two pooled images (a projection of two images that differ by $\\delta$ per value
            differs by about $\\delta$).
        **kwargs: the [Detector][randfeat.detect.base.Detector] arguments (`threshold`,
            `store`, `capacity`, `ttl`, `posting_cap`, `seed`, `shape`, `clock`).

    Examples:
        >>> import torch
        >>> from randfeat.detect import DETECTORS, DEFAULT
        >>> det = DETECTORS[DEFAULT](seed=0)
        >>> x = torch.rand(1, 1, 28, 28)
        >>> det.observe(x, account="alice").flagged.tolist()
        [False]
        >>> probe = (x + 0.02 * torch.randn_like(x)).clamp(0, 1)  # an NES-like probe
        >>> det.observe(probe, account="alice").flagged.tolist()
        [True]
    """

    name = "pooled-linf"
    default_threshold = 0.87
    default_posting_cap = 8

    def __init__(
        self,
        *,
        size: int = 14,
        tables: int = 16,
        projections: int = 4,
        width: float = 0.1,
        **kwargs: Unpack[DetectorOptions],
    ) -> None:
        self.size = check_int(size, "size", low=1, high=64)
        self.tables = check_int(tables, "tables", low=1, high=256)
        self.projections = check_int(projections, "projections", low=1, high=64)
        self.width = check_positive_float(width, "width")
        self._a = torch.empty(0)
        self._b = torch.empty(0)
        self._coefficients = torch.empty(0)
        super().__init__(**kwargs)

    def _settings(self) -> dict[str, object]:
        return {
            "size": self.size,
            "tables": self.tables,
            "projections": self.projections,
            "width": self.width,
        }

    def _keys_per_query(self, shape: tuple[int, int, int]) -> int:
        return self.tables

    def _payload_bytes(self, shape: tuple[int, int, int]) -> int:
        c, h, w = shape
        return c * min(self.size, h) * min(self.size, w)

    def _prepare(self, shape: tuple[int, int, int], key: bytes) -> None:
        d = self._payload_bytes(shape)
        m = self.tables * self.projections
        gen = derive_generator(key, "pooled-linf projections")
        self._a = torch.randn(d, m, generator=gen) / math.sqrt(d)
        self._b = torch.rand(m, generator=gen) * self.width
        self._coefficients = hash_coefficients(
            key, "pooled-linf tables", (self.tables, self.projections)
        )

    def _fingerprint(self, x: Tensor) -> tuple[Tensor, Tensor]:
        payload = pooled_payload(x, self.size)
        a, b = self._a.to(x.device), self._b.to(x.device)
        # from the stored bytes, so that a stored query's keys can be recomputed from its payload
        h = torch.floor((payload.float() / 255 @ a + b) / self.width)
        keys = keyed_hash(h.view(-1, self.tables, self.projections), self._coefficients)
        return keys, payload

    def _score_store(
        self, keys: Tensor, payload: Tensor, found: Candidates
    ) -> tuple[Tensor, Tensor]:
        n, dev = keys.shape[0], keys.device
        flat = found.postings.to(dev).reshape(n, -1)
        valid = flat >= 0
        rows = torch.arange(n, device=dev).unsqueeze(1).expand_as(flat)
        pairs = torch.unique((rows[valid] << _SEQ_BITS) | flat[valid])  # distinct (row, seq)
        row, seq = pairs >> _SEQ_BITS, pairs & _SEQ_MASK
        seqs = found.seqs.to(dev)
        pos = torch.searchsorted(seqs, seq)
        cand = found.payload.to(dev).index_select(0, pos)  # index_select: faster than [pos]
        sim = linf_similarity(payload.index_select(0, row), cand)
        best = torch.full((n,), -1, dtype=torch.long, device=dev)
        best.scatter_reduce_(0, row, (sim << _SEQ_BITS) | pos, "amax")
        score = torch.where(best >= 0, (best >> _SEQ_BITS).float() / 255, 0.0)
        return score, torch.where(best >= 0, best & _SEQ_MASK, -1)

    def _score_within(self, keys: Tensor, payload: Tensor) -> tuple[Tensor, Tensor]:
        n, dev = keys.shape[0], keys.device
        if n == 1:  # no earlier row
            return torch.zeros(1, device=dev), torch.full((1,), -1, device=dev)
        row, other, _ = shared_pairs(keys)
        sim = linf_similarity(payload.index_select(0, row), payload.index_select(0, other))
        best = torch.full((n,), -1, dtype=torch.long, device=dev)
        best.scatter_reduce_(0, row, (sim << _SEQ_BITS) | other, "amax")
        score = torch.where(best >= 0, (best >> _SEQ_BITS).float() / 255, 0.0)
        return score, torch.where(best >= 0, best & _SEQ_MASK, -1)
