"""The secret key of a detector and the keyed hash of integer vectors, in torch ops.

A detector's randomness (Blacklight's salt, the hash coefficients, the projections of the
embedding) is derived from one 32-byte secret key: from OS entropy by default, or from an int
`seed` for reproducible tests. The key is never printed: a detector's `repr` names no key.

The keyed hash maps integer vectors `v: [..., w]` to 62-bit keys. Two universal affine hashes
modulo the Mersenne prime $p = 2^{31} - 1$,

$$ \\ell_i(v) = \\Big(r_{i0} + \\sum_{j=1}^{w} r_{ij} v_j\\Big) \\bmod p, \\qquad
   r_{ij} \\in [1, p) \\text{ secret}, $$

collide for two different vectors with probability $1/p$ each; each is then passed through a
32-bit mixer (multiply-xorshift, Mueller's `hash32`) so that the key's bits look random even for
related vectors, and the two are packed into $32 + 30$ bits. Everything stays inside 63-bit
integers (products below $2^{59}$), so the hash is the same on every device; the linear part runs
as a float64 matrix product, exact while $|\\sum_j r_{ij} v_j| < 2^{53}$ (`|v_j| < 2^{21} / w`).
"""

from __future__ import annotations

import hashlib
import secrets

import torch
from torch import Tensor

from randfeat.checks import check_seed

__all__ = [
    "KEY_BYTES",
    "MERSENNE",
    "derive_generator",
    "hash_coefficients",
    "key_digest",
    "keyed_hash",
    "make_key",
    "mix32",
    "window_hash",
]

KEY_BYTES = 32
"""The length of a detector's secret key."""
MERSENNE = 2**31 - 1
"""The prime modulus $p$ of the linear hashes."""
_MIX = 0x45D9F3B
_MASK32 = 0xFFFFFFFF
_MASK30 = (1 << 30) - 1
_VALUE_LIMIT = 1 << 21


def make_key(seed: int | None) -> bytes:
    """A fresh secret key from OS entropy (`seed=None`), or the key that `seed` always gives.

    Raises:
        TypeError: `seed` is neither `None` nor an int.
    """
    seed = check_seed(seed)
    if seed is None:
        return secrets.token_bytes(KEY_BYTES)
    return hashlib.sha256(f"randfeat.detect seed {seed}".encode()).digest()


def key_digest(key: bytes) -> str:
    """A public name of the key (SHA-256 of a derived value): tells keys apart, reveals nothing."""
    return hashlib.sha256(b"randfeat.detect key id\0" + key).hexdigest()[:16]


def derive_generator(key: bytes, purpose: str) -> torch.Generator:
    """A CPU generator seeded from the key and a purpose string (one stream per use)."""
    digest = hashlib.sha256(key + b"\0" + purpose.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def hash_coefficients(key: bytes, purpose: str, shape: tuple[int, ...]) -> Tensor:
    """Secret coefficients $r \\in [1, p)$ for vectors of length `w = shape[-1]`: a tensor of
    `shape[:-1] + (w + 1, 2)` float64 (CPU), the offsets $r_{i0}$ last."""
    gen = derive_generator(key, purpose)
    r = torch.randint(
        1, MERSENNE, (*shape[:-1], shape[-1] + 1, 2), generator=gen, dtype=torch.int64
    )
    return r.double()


def mix32(h: Tensor) -> Tensor:
    """Mueller's 32-bit integer mixer on int64 values in $[0, 2^{32})$ (no overflow)."""
    h = (((h >> 16) ^ h) * _MIX) & _MASK32
    h = (((h >> 16) ^ h) * _MIX) & _MASK32
    return (h >> 16) ^ h


def finish(lin: Tensor) -> Tensor:
    """62-bit keys from the two affine hashes `lin: [..., 2]` (int64, or float64 integers)."""
    if lin.is_floating_point():
        lin = torch.remainder(lin, float(MERSENNE)).long()  # in [0, p)
    else:
        lin = torch.remainder(lin, MERSENNE)
    return (mix32(lin[..., 0]) << 30) | (mix32(lin[..., 1]) & _MASK30)


def keyed_hash(v: Tensor, coefficients: Tensor) -> Tensor:
    """62-bit keys `[..., *T]` (int64 >= 0) of integer vectors `v: [..., *T, w]`.

    Args:
        v: integer-valued tensor (any dtype), `|v| < 2^21 / w` so that the float64 sums are exact.
        coefficients: `[*T, w + 1, 2]` float64 from `hash_coefficients` (moved to `v`'s device):
            one set per leading index `T` (a table), broadcast over the other dimensions.
    """
    r = coefficients.to(v.device)
    lin = torch.matmul(v.double().unsqueeze(-2), r[..., :-1, :]).squeeze(-2) + r[..., -1, :]
    return finish(lin)


def window_hash(levels: Tensor, coefficients: Tensor, step: int) -> Tensor:
    """Keys `[N, n_windows]` of every window of `levels: [N, L]` (small integers), `step` apart.

    The same as `keyed_hash(levels.unfold(1, w, step), coefficients)` with `coefficients:
    [w + 1, 2]`, computed as `w` shifted multiply-adds over all windows at once in int64 (exact:
    the sums stay below $2^{53}$), so that the windows are never materialised.
    """
    r = coefficients.long().tolist()  # Python ints: no device round trip per coefficient
    w = len(r) - 1
    v = levels.long()
    n_windows = (v.shape[1] - w) // step + 1
    span = step * (n_windows - 1) + 1
    lin = [torch.full((v.shape[0], n_windows), r[w][i], device=v.device) for i in (0, 1)]
    for j in range(w):  # one pass per position in the window, over every window
        shifted = v[:, j : j + span : step]
        for i in (0, 1):
            lin[i].add_(shifted * r[j][i])
    return finish(torch.stack(lin, dim=-1))


def keyed_hash_reference(values: list[int], coefficients: list[tuple[int, int]]) -> int:
    """The same hash for one vector, in plain Python integers (the tests' reference);
    `coefficients` has `len(values) + 1` pairs, the offsets last."""

    def mix(h: int) -> int:
        h = (((h >> 16) ^ h) * _MIX) & _MASK32
        h = (((h >> 16) ^ h) * _MIX) & _MASK32
        return (h >> 16) ^ h

    *weights, offset = coefficients
    lins = [
        (offset[i] + sum(c[i] * v for c, v in zip(weights, values, strict=True))) % MERSENNE
        for i in (0, 1)
    ]
    return (mix(lins[0]) << 30) | (mix(lins[1]) & _MASK30)


def value_limit(width: int) -> int:
    """The largest `|v_j|` that `keyed_hash` hashes exactly for vectors of length `width`."""
    return _VALUE_LIMIT // max(1, width)
