"""Gaussian noise δ ~ N(0, ν·I) or N(0, diag Σ), and the seeding policy.

ν is a **variance** everywhere in randfeat, as in the paper (δ ~ N(0, ν I)); its square root is
called ``sigma``. Noise is drawn on the feature's own device and dtype, with the feature's memory
format, independently per sample and per call.

Seeding is a security property: by default each noise stream is seeded from OS entropy
(:func:`secrets.randbits`), so nobody can predict it; an explicit ``seed`` makes it reproducible.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = [
    "NoiseRNG",
    "Variance",
    "add_noise",
    "check_feature",
    "per_layer",
    "sigma_for",
    "validate_nu",
]

Variance = float | Tensor
"""A scalar variance ν, or a tensor Σ of per-feature variances (the diagonal case)."""


def validate_nu(nu: object, name: str = "nu") -> Variance:
    """Check one variance: a finite float ``>= 0`` or a finite, non-negative float tensor Σ.

    Returns the float (``0.0`` for an all-zero Σ, so that zero stays bit-for-bit the identity) or a
    detached float tensor.

    Raises:
        TypeError: not a number or a floating tensor.
        ValueError: negative, NaN or infinite.
    """
    if isinstance(nu, Tensor):
        if not nu.is_floating_point():
            raise TypeError(
                f"Expected `{name}` to be a float tensor of variances, got dtype {nu.dtype}."
            )
        if nu.numel() == 0:
            raise ValueError(
                f"Expected `{name}` to be a non-empty tensor of variances, got shape {tuple(nu.shape)}."
            )
        if not bool(torch.isfinite(nu).all()) or bool((nu < 0).any()):
            raise ValueError(
                f"Expected `{name}` to hold finite variances >= 0, but got values in "
                f"[{float(nu.min())}, {float(nu.max())}]."
            )
        if nu.ndim == 0:
            return float(nu)
        if not bool((nu != 0).any()):
            return 0.0
        return nu.detach().clone()
    if isinstance(nu, bool) or not isinstance(nu, (int, float)):
        raise TypeError(
            f"Expected `{name}` to be a float variance >= 0, a tensor of variances or a mapping "
            f"from layer spec to variance, but got {nu!r} ({type(nu).__name__})."
        )
    v = float(nu)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"Expected `{name}` to be a finite variance >= 0, but got {nu!r}.")
    return v


class NoiseRNG:
    """One noise stream per device, seeded from OS entropy unless a seed is given.

    Args:
        seed: ``None`` (OS entropy: unpredictable, the default), an int (reproducible), or a
            ``torch.Generator`` (used as is on its device; other devices get a generator seeded
            from its ``initial_seed()``).
    """

    def __init__(self, seed: int | torch.Generator | None = None) -> None:
        self._gens: dict[torch.device, torch.Generator] = {}
        if isinstance(seed, torch.Generator):
            self.seeded = True
            self._base = seed.initial_seed()
            self._gens[torch.device(seed.device)] = seed
        elif seed is None:
            self.seeded = False
            self._base = secrets.randbits(63)
        elif isinstance(seed, int) and not isinstance(seed, bool):
            self.seeded = True
            self._base = int(seed)
        else:
            raise TypeError(
                f"Expected argument `seed` to be None, an int or a torch.Generator, but got {seed!r}."
            )

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator for ``device`` (created on first use)."""
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        g = self._gens.get(device)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self._base)
            self._gens[device] = g
        return g

    def __getstate__(self) -> dict[str, object]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        if not self.seeded:  # a copy of an unpredictable stream must not replay the original
            self._base = secrets.randbits(63)
            self._gens = {}

    def reseed(self, seed: int) -> None:
        """Restart every stream from ``seed`` (used for common random numbers in calibration)."""
        self._base = int(seed)
        self.seeded = True
        for g in self._gens.values():
            g.manual_seed(self._base)


def sigma_for(nu: Variance, feature: Tensor, where: str) -> float | Tensor:
    """The standard deviation ``sqrt(ν)`` (or ``sqrt(Σ)`` on ``feature``'s device and dtype).

    Raises:
        ValueError: Σ does not broadcast to the feature shape without the batch dimension.
    """
    if not isinstance(nu, Tensor):
        return math.sqrt(nu)
    shape = tuple(feature.shape[1:])
    try:
        ok = torch.broadcast_shapes(tuple(nu.shape), shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"Expected the variance tensor Σ for {where!r} to broadcast to the feature shape "
            f"{list(shape)} (without the batch dimension), but got shape {list(nu.shape)}."
        )
    return nu.to(device=feature.device, dtype=feature.dtype).sqrt()


def check_feature(feature: object, where: str) -> Tensor:
    """Raise a clear TypeError unless ``feature`` is a floating tensor.

    ``None`` is what a pre-hook sees on a module called with keyword arguments only.
    """
    if feature is None:
        raise TypeError(
            f"Cannot add Gaussian noise at {where!r}: the module there was called without a "
            "positional input (keyword arguments only), so it has no input feature. Use the "
            "output spec of the module before it instead."
        )
    if not isinstance(feature, Tensor) or not feature.is_floating_point():
        kind = f"dtype {feature.dtype}" if isinstance(feature, Tensor) else type(feature).__name__
        raise TypeError(
            f"Cannot add Gaussian noise at {where!r}: the feature there is {kind}, not a floating "
            "tensor. Choose a layer whose output (or input, with '.pre') is a float tensor."
        )
    return feature


def add_noise(feature: Tensor, sigma: float | Tensor, gen: torch.Generator) -> Tensor:
    """Return ``feature + sigma * ε`` with ``ε ~ N(0, I)`` drawn like ``feature`` (device, dtype,
    memory format), independently per sample."""
    delta = torch.empty_like(feature).normal_(generator=gen)
    return feature + delta * sigma


def per_layer(nu: object, keys: list[str], specs: list[str]) -> dict[str, Variance]:
    """Expand ``nu`` (one variance, or a mapping keyed by spec or canonical key) to every layer."""
    if isinstance(nu, Mapping):
        out: dict[str, Variance] = {}
        known = set(keys) | set(specs)
        extra = [k for k in nu if k not in known]
        if extra:
            raise ValueError(
                f"Expected the keys of `nu` to be wrapped layers {specs}, but got unknown {extra}."
            )
        for key, spec in zip(keys, specs, strict=True):
            if spec in nu:
                out[key] = validate_nu(nu[spec], f"nu[{spec!r}]")
            elif key in nu:
                out[key] = validate_nu(nu[key], f"nu[{key!r}]")
            else:
                raise ValueError(
                    f"Expected `nu` to give a variance for layer {spec!r}; it has none."
                )
        return out
    v = validate_nu(nu)
    return dict.fromkeys(keys, v)
