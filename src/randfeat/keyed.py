r"""Input-keyed noise: one secret key, and each input row's noise a function of its bytes.

With fresh noise (the default) every forward draws a new $\delta \sim \mathcal{N}(0, \nu I)$, so an
attacker can resubmit one image until a lucky draw fools the model, or average many answers for it
(EOT). With keyed noise the draw is a deterministic function of a secret key $k$ and the input
row $x$ as the model receives it (its exact bytes):

$$
\delta(x) = \sqrt{\nu}\,\varepsilon(k, x, \ell), \qquad
\varepsilon(k, x, \ell) \approx \mathcal{N}(0, I) \text{ over inputs } x,
$$

for the wrapped point $\ell$. The same image gets the same answer every time, in any batch position
and batch size, so resubmitting it fishes for nothing and averaging exact repeats gains nothing;
any change to the image, one bit of one pixel, gives noise independent of the original's.

How it is computed, on the input's and the feature's device, with no loop over rows:

1. **Row hash** (a keyed universal hash). The row's bytes are read as 32-bit signed integers
   $x_j \in [-2^{31}, 2^{31})$ (16- or 8-bit ones when the row's length in bytes is not a
   multiple of 4) and hashed as $h_c(x) = \sum_j K_{jc}\, x_j \bmod (2^{61} - 1)$ for eight
   columns $c$, with secret coefficients $K_{jc} \in [0, 2^{10})$ derived from the key. Each
   chunk of $2^{12}$ lanes is a float64 matrix product of integers whose partial sums stay below
   $2^{53}$, so it is exact in any summation order: the same row gives the same hash in any batch,
   on any device. For two different rows, each column collides with probability at most
   $2^{-10}$ over the coefficients (fix every coefficient but one where the rows differ: at most
   one value of it makes the sums equal), all eight with at most $2^{-80}$.
2. **Row seed**: the eight sums and the row length, 18 words of 32 bits, each mixed with its own
   key words through murmur3's 32-bit finalizer and summed, give a 64-bit seed per row.
3. **Counter-based draws**: for wrapped point $\ell$ and pair index $i$, two 32-bit words
   $\mathrm{mix}(\mathrm{mix}(i \oplus t_0) \oplus t_1)$ and $\mathrm{mix}(\mathrm{mix}(i \oplus
   t_2) \oplus t_3)$ (the $t$'s from the row seed and $\ell$) become two uniforms, and Box-Muller
   turns them into two standard normals. The uniforms lie on steps of $2^{-24}$ ($2^{-32}$ for
   float64 features), which caps the radius $\sqrt{-2 \ln u}$ at 5.9 (6.8): a draw beyond it has
   probability $2^{-25}$ ($2^{-33}$) per pair under the exact Gaussian.

Every integer operation stays inside int64: the mixing keeps 32-bit values in int64 lanes and
multiplies a 32-bit value by a 16-bit half of a constant ($< 2^{48}$), and the hash's running sums
stay below $2^{63}$, so nothing relies on how int64 overflow wraps (on the CPU, on a GPU, or in
code that `torch.compile` generates).

**This is not a cryptographic pseudo-random function.** It is keyed hashing that an attacker
without the key cannot predict from the outputs of an ordinary deployment (noisy logits or labels),
not a construction with a security proof. What it protects against: resubmitting the same image
and averaging exact repeats (both get one answer). What it does not: an attacker who changes the
point slightly at each query (one pixel by one step) gets fresh, independent noise every time, as
with fresh noise; keyed noise only takes away the *free* repeats.

The key: 32 bytes (256 bits) from `secrets.token_bytes` unless given. It is never shown by `repr`,
`str` or an error message; [KeyedNoise.key][randfeat.keyed.KeyedNoise.key] reads it back
deliberately (to give several server workers one key). A pickled or deep-copied `KeyedNoise`
keeps its key (a pickle file of it is a secret); forked children share it: one key, one answer per
image, wherever it is computed.
"""

from __future__ import annotations

import math
import secrets
from typing import Literal

import torch
from torch import Tensor

from randfeat.noise import in_graph

__all__ = [
    "KEYED_DATA_PARALLEL_REFUSAL",
    "KEYED_ONNX_REFUSAL",
    "KEY_BYTES",
    "KeyedNoise",
    "NoiseKind",
    "check_key",
    "check_noise_options",
    "mix32",
    "refuse_onnx",
]

NoiseKind = Literal["fresh", "keyed"]
"""`"fresh"`: a new draw at every forward; `"keyed"`: a function of a secret key and the input."""

KEY_BYTES = 32
"""The length of a noise key: 256 bits."""

MASK32 = 0xFFFFFFFF
COEF_BITS = 10  # coefficients K in [0, 2^10)
COLUMNS = 8  # independent hash columns: two rows collide with probability <= 2^(-10 * 8)
CHUNK = 1 << 12  # lanes per exact product: 2^12 lanes * 2^31 * 2^10 = 2^53
BLOCK = 1 << 19  # float64 lanes converted at once (4 MiB: no page faults, stays in cache)
PRIME = (1 << 61) - 1  # the chunk sums are added modulo this Mersenne prime

KEYED_ONNX_REFUSAL = (
    "torch.onnx.export cannot export keyed noise: the graph would carry the secret key as a "
    "constant, readable by anyone with the file. Use randfeat.export.to_onnx(defended, example_x, "
    "path), which makes the noise a graph input and keeps the key out of the file, and "
    "randfeat.export.OnnxDefended(path, key=defended.noise_key), which computes the keyed noise "
    "at every call (docs/defense.md)."
)
"""Why `torch.onnx.export` of a keyed wrapper stops, and the way out."""

KEYED_DATA_PARALLEL_REFUSAL = (
    "Keyed noise cannot follow the rows that nn.DataParallel scatters to its replicas. Run one "
    "wrapped model per device (one process each), or use noise='fresh'."
)
"""Why a keyed wrapper of an `nn.DataParallel` on several devices stops."""


def refuse_onnx() -> None:
    """Raise the [KEYED_ONNX_REFUSAL][randfeat.keyed.KEYED_ONNX_REFUSAL] inside an ONNX export."""
    if torch.onnx.is_in_onnx_export():
        raise RuntimeError(KEYED_ONNX_REFUSAL)


# The exporter traces with torch.export, non-strict first (plain Python: `refuse_onnx` runs), then
# strict (Dynamo, which does not run it); an op's fake implementation runs in both.
@torch.library.custom_op("randfeat::keyed_mixing", mutates_args=())
def _keyed_mixing(mixing: Tensor) -> Tensor:
    """The row seed's key words, through an op that an ONNX export cannot pass."""
    refuse_onnx()
    return mixing.clone()


@_keyed_mixing.register_fake
def _(mixing: Tensor) -> Tensor:
    refuse_onnx()
    return torch.empty_like(mixing)


def check_noise_options(noise: object, seed: object, key: object) -> NoiseKind:
    """Check the `noise` kind and that `seed` and `key` fit it; returns `noise`.

    Raises:
        TypeError: `noise` is not a string.
        ValueError: an unknown `noise`; `seed` with keyed noise; `key` with fresh noise.
    """
    if noise not in ("fresh", "keyed"):
        kind = ValueError if isinstance(noise, str) else TypeError
        raise kind(f"Expected argument `noise` to be 'fresh' or 'keyed', but got {noise!r}.")
    if noise == "keyed" and seed is not None:
        raise ValueError(
            "Expected no `seed` with noise='keyed': keyed noise is a function of the key and the "
            "input, there is no stream to seed. Drop `seed` (pass `key=` to reproduce the noise), "
            "or use noise='fresh' with the seed."
        )
    if noise == "fresh" and key is not None:
        raise ValueError(
            "Expected no `key` with noise='fresh': a key is what keyed noise hashes the input "
            "with. Pass noise='keyed' to use the key, or drop `key`."
        )
    return "keyed" if noise == "keyed" else "fresh"


def check_key(key: object) -> bytes:
    """A 32-byte key (`bytes` or `bytearray`), returned as `bytes`; never echoes its value."""
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError(
            f"Expected argument `key` to be {KEY_BYTES} bytes, but got a {type(key).__name__}. "
            "Pass bytes, e.g. secrets.token_bytes(32) or bytes.fromhex(<64 hex digits>)."
        )
    if len(key) != KEY_BYTES:
        raise ValueError(
            f"Expected argument `key` to be {KEY_BYTES} bytes (256 bits), but got {len(key)} "
            "bytes. Pass secrets.token_bytes(32), or leave `key` out to draw one from OS entropy."
        )
    return bytes(key)


def mul32(a: Tensor, c: int) -> Tensor:
    """`a * c mod 2^32` for `a` in $[0, 2^{32})$ held in int64: two products below $2^{48}$."""
    lo = a * (c & 0xFFFF)
    hi = (a * (c >> 16)) & 0xFFFF
    return (lo + (hi << 16)) & MASK32


def mix32(a: Tensor) -> Tensor:
    """murmur3's 32-bit finalizer on int64 lanes holding $[0, 2^{32})$: a bijection, avalanching."""
    a = a ^ (a >> 16)
    a = mul32(a, 0x85EBCA6B)
    a = a ^ (a >> 13)
    a = mul32(a, 0xC2B2AE35)
    return a ^ (a >> 16)


def derive(words: Tensor, count: int, domain: int = 0) -> Tensor:
    """`count` (a multiple of 8) key-derived 32-bit words: two keyed rounds of `mix32` of indices."""
    index = (torch.arange(count, dtype=torch.int64) | domain).view(-1, 8)
    return mix32(mix32(index ^ words) ^ words.roll(3)).flatten()


def row_lanes(x: Tensor) -> Tensor:
    """The bytes of each row of `x` `[N, ...]` as integer lanes `[N, L]` in logical order.

    32-bit lanes when a row's length in bytes allows it (every float32 or float64 input), else
    16- or 8-bit ones; the values are the bits read as integers, in $[-2^{31}, 2^{31})$.
    """
    flat = x.detach().reshape(x.shape[0], -1).contiguous()
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    size = flat.element_size()
    if (flat.shape[1] * size) % 4 == 0:
        return flat.view(torch.int32)
    return flat.view(torch.int16 if size == 2 else torch.uint8)


class KeyedNoise:
    """Standard-normal draws that are a deterministic function of a secret key and each input row.

    Args:
        key: 32 bytes; `None` draws 256 bits from OS entropy (`secrets.token_bytes`).

    Raises:
        TypeError: `key` is not bytes.
        ValueError: `key` is not 32 bytes long.
    """

    def __init__(self, key: bytes | None = None) -> None:
        self._key = secrets.token_bytes(KEY_BYTES) if key is None else check_key(key)
        self._setup()

    def _setup(self) -> None:
        # Key material as tensors, never Python ints: a compiled graph must not embed it in code.
        w = torch.tensor(
            [int.from_bytes(self._key[i : i + 4], "little") for i in range(0, KEY_BYTES, 4)],
            dtype=torch.int64,
        )
        self._words_cpu = w
        # 72 words for the row seed (domain 2^31 + i, apart from the coefficients' indices).
        self._mixing_cpu = derive(w, 72, domain=1 << 31).view(4, 18)
        self._mixing: dict[torch.device, Tensor] = {}
        self._coef: dict[torch.device, Tensor] = {}

    @property
    def key(self) -> bytes:
        """The key (32 bytes). Read it deliberately, to give another process the same noise."""
        return self._key

    def __repr__(self) -> str:
        return "KeyedNoise(key=<hidden>)"

    def __getstate__(self) -> dict[str, object]:
        return {"key": self._key}  # the key travels (one key, one answer); caches are rebuilt

    def __setstate__(self, state: dict[str, bytes]) -> None:
        self._key = state["key"]
        self._setup()

    def _mixing_on(self, device: torch.device) -> Tensor:
        mixing = self._mixing.get(device)
        if mixing is None:
            mixing = self._mixing[device] = self._mixing_cpu.to(device)
        return mixing

    def coefficients(self, chunks: int, device: torch.device) -> Tensor:
        """The secret coefficients $K$ `[chunks, 4096, 8]` float64 on `device` (cached)."""
        coef = self._coef.get(device)
        if coef is None or coef.shape[0] < chunks:
            coef = derive(self._words_cpu, chunks * CHUNK * COLUMNS) >> (32 - COEF_BITS)
            coef = coef.view(chunks, CHUNK, COLUMNS).to(device=device, dtype=torch.float64)
            self._coef[device] = coef
        return coef[:chunks]

    def row_seeds(self, x: object) -> Tensor:
        """The 64-bit seed of each row of `x` `[N, ...]`: `[N, 2]` int64 words in $[0, 2^{32})$.

        Raises:
            RuntimeError: inside `torch.onnx.export` (the key would become a graph constant).
            TypeError: `x` is not a tensor with a batch dimension.
        """
        refuse_onnx()
        if not isinstance(x, Tensor) or x.ndim < 1:
            got = f"shape {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(
                "Keyed noise hashes the model's input: expected argument `x` to be a tensor "
                f"[N, ...] with a batch dimension, but got {got}."
            )
        lanes = row_lanes(x)
        n, length = lanes.shape
        chunks = -(-length // CHUNK)
        coef = self.coefficients(chunks, x.device)
        sums = torch.zeros(n, COLUMNS, dtype=torch.int64, device=x.device)
        step = max(1, min(512, BLOCK // max(1, n * CHUNK)))  # chunks per block
        for first in range(0, chunks, step):  # blocks of lanes, every row at once
            part = lanes[:, first * CHUNK : (first + step) * CHUNK]
            g = -(-part.shape[1] // CHUNK)
            if part.shape[1] < g * CHUNK:
                part = torch.nn.functional.pad(part, (0, g * CHUNK - part.shape[1]))
            v = (
                part.view(n, g, CHUNK)
                .transpose(0, 1)
                .to(torch.float64, memory_format=torch.contiguous_format)
            )
            # Exact: every partial sum of 2^12 products below 2^41 is an integer below 2^53.
            block = torch.bmm(v, coef[first : first + g]).to(torch.int64).sum(dim=0)
            sums = torch.remainder(sums + block, PRIME)  # < 2^61 + 2^9 * 2^53 < 2^63
        # 18 words per row (the 8 sums' halves, the length's), each mixed with its own key
        # words, summed: two 32-bit halves of the seed, then each mixed with the other.
        size = torch.tensor([length & MASK32, length >> 32], device=x.device).expand(n, 2)
        words = torch.cat((sums & MASK32, sums >> 32, size), dim=1).unsqueeze(1)  # [N, 1, 18]
        k = self._mixing_on(x.device)
        if in_graph():
            k = torch.ops.randfeat.keyed_mixing(k)
        s = mix32(mix32(words ^ k[0:2]) ^ k[2:4]).sum(dim=2) & MASK32  # [N, 2]
        return mix32((s + mix32(s.flip(1))) & MASK32)

    def standard_normal(self, like: Tensor, seeds: Tensor, layer: int) -> Tensor:
        r"""$\varepsilon \sim \mathcal{N}(0, I)$ shaped like `like` (dtype, device, memory format).

        Row $n$ of the result depends only on `seeds[n]`, `layer` and the shape of one row.

        Args:
            like: the feature `[N, ...]`, batch first.
            seeds: [row_seeds][randfeat.keyed.KeyedNoise.row_seeds] of the model's input `[N, 2]`.
            layer: the index of the wrapped point (each point draws independently).

        Raises:
            ValueError: `like`'s first dimension is not the input's batch `N`.
        """
        n = seeds.shape[0]
        if like.ndim < 1 or like.shape[0] != n:
            raise ValueError(
                f"Keyed noise needs the feature's first dimension to be the input's batch of {n} "
                f"rows, but the feature has shape {list(like.shape)}. Wrap a layer whose output "
                "is batch first, or use noise='fresh'."
            )
        per_row = math.prod(like.shape[1:])
        pairs = (per_row + 1) // 2
        streams = torch.arange(4, dtype=torch.int64, device=like.device) | (layer << 2)
        t = mix32(mix32(seeds[:, :1] ^ streams) ^ seeds[:, 1:]).view(n, 2, 2, 1)  # [N, 2, 2, 1]
        i = torch.arange(pairs, dtype=torch.int64, device=like.device)
        w1, w2 = mix32(mix32(i ^ t[:, :, 0]) ^ t[:, :, 1]).unbind(1)  # two words per pair
        if like.dtype == torch.float64:
            dt, scale = torch.float64, 2.0**-32
        else:  # 24-bit uniforms: exact in float32
            dt, scale, w1, w2 = torch.float32, 2.0**-24, w1 >> 8, w2 >> 8
        u1 = (w1.to(dt) + 0.5) * scale  # (0, 1): the log is finite
        theta = w2.to(dt) * (2 * math.pi * scale)
        r = torch.sqrt(-2.0 * torch.log(u1))
        z = torch.stack((r * torch.cos(theta), r * torch.sin(theta)), dim=2).view(n, 2 * pairs)
        eps = z[:, :per_row].reshape(like.shape).to(like.dtype)
        if like.is_contiguous():
            return eps
        return torch.empty_like(like).copy_(eps)  # the feature's strides (channels_last)
