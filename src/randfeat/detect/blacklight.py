"""`blacklight`: the reference detector of Li et al. (USENIX Security 2022), minus two defects.

Li, Shan, Wenger, Zhang, Zheng, Zhao. "Blacklight: Scalable Defense for Neural Networks against
Query-Based Black-Box Attacks." USENIX Security 2022. Official code: `Huiying-Li/blacklight`
(`probabilistic_fingerprint.py`).

A query's fingerprint, as in the official code:

1. scale to $[0, 255]$ and add a per-pixel salt $s \\sim U[0, 255)$: $v = 255x + s$;
2. quantize: $q = \\operatorname{round}(v / Q)$ with $Q = 50$ (`quantization`);
3. flatten (here in `C, H, W` order) and slide a window of `window = 20` values with
   `step = 1`; hash each window;
4. keep the `top = 50` largest distinct hashes: the fingerprint.

A query's score is the largest number of fingerprint hashes it shares with any one earlier
query; it is flagged when the score exceeds the threshold, 25 (the official notebook's `>`).

What differs from the official code, and why:

- **Secret salt.** The official code draws the salt after `np.random.seed(666)` at import, so
  every deployment's salt is public; here it comes from the detector's key (OS entropy).
- **No wrap-around.** The official code takes $(255x + s) \\bmod 255$, which maps a pixel of 1.0
  onto 0.0 (and folds the salted range); here $v$ is not wrapped, so $q \\in \\{0, \\dots, 10\\}$
  and the salt acts as a secret per-pixel offset of the quantization grid.
- **Keyed hash in torch.** SHA-256 of each window's bytes in a process pool becomes the keyed
  62-bit hash of `randfeat.detect.hashing` computed for all windows at once (a float64
  convolution), on the images' device; "the top 50" is by this hash's value, as the official
  code's is by its (reversed hex) digest: a secret pseudo-random choice of windows either way.
- **Windows.** For `step > 1` every complete window is hashed (`torch.unfold`); the official
  loop, `range((L - w + 1) // step)`, can miss the last one. With `step = 1` they agree.
- **Bounded index.** Each hash keeps only its newest `posting_cap` stored queries (the official
  dictionary grows without bound): a lookup reads at most `top · posting_cap` entries.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from randfeat.checks import check_float, check_int, check_positive_int
from randfeat.detect.base import Detector
from randfeat.detect.hashing import derive_generator, hash_coefficients, value_limit, window_hash
from randfeat.detect.pairs import shared_pairs
from randfeat.detect.stores.base import Candidates

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from randfeat.detect.base import DetectorOptions

__all__ = ["Blacklight", "quantize", "shared_counts", "top_distinct"]

_SEQ_BITS = 40
_SEQ_MASK = (1 << _SEQ_BITS) - 1


def quantize(x: Tensor, salt: Tensor, quantization: float) -> Tensor:
    """Steps 1-2: $\\operatorname{round}((255 x + s) / Q)$ of `x: [N, C, H, W]` flattened to
    `[N, C·H·W]` (float64 integers; no wrap-around), with `salt: [C·H·W]` in $[0, 255)$."""
    return torch.round((x.flatten(1).double() * 255 + salt.to(x.device)) / quantization)


def top_distinct(hashes: Tensor, k: int) -> Tensor:
    """The `k` largest distinct values of each row of `hashes: [N, W]` (int64 >= 0), largest
    first, padded with `-1` when a row has fewer than `k` distinct values."""
    w = hashes.shape[1]
    first = min(w, 4 * k)  # enough unless a row repeats its largest values many times
    top = torch.topk(hashes, first, dim=1).values
    out = _dedupe(top, k)
    if first < w:
        short = (out < 0).any(dim=1).nonzero().squeeze(1)
        if short.numel():
            full = torch.sort(hashes[short], dim=1, descending=True).values
            out[short] = _dedupe(full, k)
    return out


def _dedupe(sorted_desc: Tensor, k: int) -> Tensor:
    dup = torch.zeros_like(sorted_desc, dtype=torch.bool)
    dup[:, 1:] = sorted_desc[:, 1:] == sorted_desc[:, :-1]
    kept = sorted_desc.masked_fill(dup, -1)
    top = torch.topk(kept, min(k, kept.shape[1]), dim=1).values
    if top.shape[1] < k:
        pad = torch.full((top.shape[0], k - top.shape[1]), -1, dtype=top.dtype, device=top.device)
        top = torch.cat([top, pad], dim=1)
    return top


def shared_counts(postings: Tensor) -> tuple[Tensor, Tensor]:
    """For each row of `postings: [n, K, P]` (stored numbers, `-1` none): the largest number of
    its lists one stored query appears in, and that query (the newest on ties; `-1` if none)."""
    n = postings.shape[0]
    flat = postings.reshape(n, -1)
    valid = flat >= 0
    rows = torch.arange(n, device=flat.device).unsqueeze(1).expand_as(flat)
    pairs, count = torch.unique((rows[valid] << _SEQ_BITS) | flat[valid], return_counts=True)
    best = torch.zeros(n, dtype=torch.long, device=flat.device)
    best.scatter_reduce_(0, pairs >> _SEQ_BITS, (count << _SEQ_BITS) | (pairs & _SEQ_MASK), "amax")
    score = best >> _SEQ_BITS
    return score, torch.where(score > 0, best & _SEQ_MASK, -1)


class Blacklight(Detector):
    """Blacklight's fingerprint and rule (see the module docstring), on a bounded index.

    Args:
        window: values per hashed window (`w`; 20 in the paper for CIFAR-10, 50 for ImageNet).
        step: stride of the window (`p`; 1, or 25 for ImageNet).
        quantization: the quantization step `Q` on the $[0, 255]$ scale (50).
        top: hashes kept per query (`S`, 50).
        **kwargs: the [Detector][randfeat.detect.base.Detector] arguments (`threshold` 25 by
            default, `store`, `capacity`, `ttl`, `posting_cap`, `seed`, `shape`, `clock`).

    Examples:
        >>> import torch
        >>> from randfeat.detect import DETECTORS
        >>> det = DETECTORS["blacklight"](seed=0)
        >>> x = torch.rand(2, 1, 28, 28)
        >>> det.observe(x[:1], account="alice").flagged.tolist()
        [False]
        >>> det.observe(x[:1], account="bob").score.tolist()  # 50 hashes shared
        [50.0]
    """

    name = "blacklight"
    default_threshold = 25.0

    def __init__(
        self,
        *,
        window: int = 20,
        step: int = 1,
        quantization: float = 50,
        top: int = 50,
        **kwargs: Unpack[DetectorOptions],
    ) -> None:
        self.window = check_int(window, "window", low=1, high=value_limit(1) // 16)
        self.step = check_positive_int(step, "step")
        self.quantization = check_float(quantization, "quantization", low=1, high=255)
        self.top = check_int(top, "top", low=1, high=4096)
        self._salt = torch.empty(0)
        self._coefficients = torch.empty(0)
        super().__init__(**kwargs)

    def _settings(self) -> dict[str, object]:
        return {
            "window": self.window,
            "step": self.step,
            "quantization": self.quantization,
            "top": self.top,
        }

    def _keys_per_query(self, shape: tuple[int, int, int]) -> int:
        return self.top

    def _payload_bytes(self, shape: tuple[int, int, int]) -> int:
        return 0

    def _prepare(self, shape: tuple[int, int, int], key: bytes) -> None:
        if math.prod(shape) < self.window:
            raise ValueError(
                f"Expected images of at least `window` = {self.window} values, but got shape "
                f"{list(shape)}. Pass a smaller window."
            )
        gen = derive_generator(key, "blacklight salt")
        self._salt = torch.rand(math.prod(shape), generator=gen, dtype=torch.float64) * 255
        self._coefficients = hash_coefficients(key, "blacklight window", (self.window,))

    def _fingerprint(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hashes = window_hash(
            quantize(x, self._salt, self.quantization), self._coefficients, self.step
        )
        keys = top_distinct(hashes, self.top)
        return keys, torch.empty(x.shape[0], 0, dtype=torch.uint8, device=x.device)

    def _score_store(
        self, keys: Tensor, payload: Tensor, found: Candidates
    ) -> tuple[Tensor, Tensor]:
        count, seq = shared_counts(found.postings.to(keys.device))
        seqs = found.seqs.to(keys.device)
        pos = torch.searchsorted(seqs, seq.clamp(min=0))
        return count.float(), torch.where(seq >= 0, pos, -1)

    def _score_within(self, keys: Tensor, payload: Tensor) -> tuple[Tensor, Tensor]:
        i, j, count = shared_pairs(keys)
        best = torch.zeros(keys.shape[0], dtype=torch.long, device=keys.device)
        best.scatter_reduce_(0, i, (count << _SEQ_BITS) | j, "amax")  # the newest on ties
        score = best >> _SEQ_BITS
        return score.float(), torch.where(score > 0, best & _SEQ_MASK, -1)
