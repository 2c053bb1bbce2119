r"""Gaussian noise δ ~ N(0, ν·I) or N(0, diag Σ), and the seeding policy.

ν is a **variance** everywhere in randfeat, as in the paper ($\delta \sim \mathcal{N}(0, \nu I)$);
its square root is called `sigma`. Noise is drawn on the feature's own device and dtype, with the
feature's memory format, independently per sample and per call.

Seeding is a security property: by default every noise stream is seeded from OS entropy
(`secrets.randbits`), one stream per thread, re-seeded in forked children, so nobody can predict
it or make two workers replay it; an explicit `seed` makes it reproducible
([NoiseRNG][randfeat.noise.NoiseRNG] says what a seed means under threads and forks).
"""

from __future__ import annotations

import math
import os
import secrets
import threading
import weakref
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = [
    "ONNX_REFUSAL",
    "NoiseRNG",
    "Variance",
    "check_feature",
    "in_graph",
    "per_layer",
    "sigma_for",
    "standard_normal",
    "validate_nu",
]

Variance = float | Tensor
"""A scalar variance ν, or a tensor Σ of per-feature variances (the diagonal case)."""


def validate_nu(nu: object, name: str = "nu") -> Variance:
    """Check one variance: a finite float `>= 0` or a finite, non-negative float tensor Σ.

    Returns the float (`0.0` for an all-zero Σ, so that zero stays bit-for-bit the identity) or a
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
    """The noise streams of one wrapper: one generator per device, and per thread unless seeded.

    Unseeded (the default), every thread draws from its own generators, each seeded from OS
    entropy on first use: threads never share a `torch.Generator` (they are not meant to be used
    by two threads at once) and never draw the same numbers. A process forked after the streams
    were used re-seeds them all from OS entropy in the child (`os.register_at_fork`), so forked
    workers never replay each other's noise. A pickled copy re-seeds too.

    Seeded (an int or a `torch.Generator`), there is one stream per device, shared by every thread
    (torch serialises draws on a generator) and kept by forked children and copies: that is what a
    seed is for. Reproducible in single-threaded use; under concurrency the threads split one
    sequence of draws in an order the scheduler decides.

    Args:
        seed: `None` (OS entropy: unpredictable, the default), an int (reproducible), or a
            `torch.Generator` (used as is on its device; other devices get a generator seeded
            from its `initial_seed()`).
    """

    def __init__(self, seed: int | torch.Generator | None = None) -> None:
        self._shared: dict[torch.device, torch.Generator] = {}
        self._local = threading.local()
        if isinstance(seed, torch.Generator):
            self.seeded = True
            self._base = seed.initial_seed()
            self._shared[torch.device(seed.device)] = seed
        elif seed is None:
            self.seeded = False
            self._base = 0
        elif isinstance(seed, int) and not isinstance(seed, bool):
            self.seeded = True
            self._base = int(seed)
        else:
            raise TypeError(
                f"Expected argument `seed` to be None, an int or a torch.Generator, but got {seed!r}."
            )
        self._register()

    def _register(self) -> None:
        self.stream = secrets.randbits(62)  # how a graph names this stream (see standard_normal)
        _STREAMS[self.stream] = self

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator for `device` in this thread (created on first use)."""
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gens = self._shared if self.seeded else self._thread_generators()
        g = gens.get(device)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self._base if self.seeded else secrets.randbits(63))
            gens[device] = g
        return g

    def _thread_generators(self) -> dict[torch.device, torch.Generator]:
        try:
            gens: dict[torch.device, torch.Generator] = self._local.gens
        except AttributeError:
            gens = self._local.gens = {}
        return gens

    def reseed(self, seed: int) -> None:
        """Restart from `seed`: one shared, reproducible stream per device from here on."""
        self._base = int(seed)
        self.seeded = True
        self._local = threading.local()
        for g in self._shared.values():
            g.manual_seed(self._base)

    def forget(self) -> None:
        """Drop every unseeded stream (the next draw in each thread re-seeds from OS entropy)."""
        if not self.seeded:
            self._local = threading.local()

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        del state["_local"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()  # a copy of an unpredictable stream must not replay it
        self._register()


_STREAMS: weakref.WeakValueDictionary[int, NoiseRNG] = weakref.WeakValueDictionary()
"""Every live stream by its `stream` number: how a graph finds it, and what a fork re-seeds."""

_FALLBACK = NoiseRNG()
"""The stream of a graph whose wrapper is gone or lives in another process (an exported program
loaded elsewhere): unseeded, per thread, re-seeded after fork like every other."""


def _reseed_after_fork() -> None:
    for rng in list(_STREAMS.values()):
        rng.forget()


if hasattr(os, "register_at_fork"):  # not on Windows, which cannot fork
    os.register_at_fork(after_in_child=_reseed_after_fork)


def in_graph() -> bool:
    """Whether torch is recording ops into a graph (`torch.jit.trace`, `torch.compile`,
    `torch.export`) rather than running them one by one."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()  # type: ignore[attr-defined]


ONNX_REFUSAL = (
    "torch.onnx.export cannot export randfeat's noise safely: ONNX runtimes seed random ops alike "
    "in every session (onnxruntime) or ignore their seed (TensorRT), so the noise would replay. "
    "Use randfeat.export.to_onnx(defended, example_x, path), which makes the noise a graph input, "
    "and randfeat.export.OnnxDefended(path), which draws it from OS entropy at every call "
    "(docs/deploy.md)."
)
"""Why `torch.onnx.export` of a wrapper stops, and the way out (raised by the noise op)."""


def _refuse_onnx() -> None:
    if torch.onnx.is_in_onnx_export():
        raise RuntimeError(ONNX_REFUSAL)


# `nondeterministic_seeded`: two calls with equal arguments are different draws, so no compiler
# pass may merge them (common-subexpression elimination) or fold one into a constant.
@torch.library.custom_op(
    "randfeat::standard_normal", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def _standard_normal_op(like: Tensor, stream: int) -> Tensor:
    """`ε ~ N(0, I)` shaped like `like`, drawn at run time from the stream numbered `stream`."""
    _refuse_onnx()  # the TorchScript-based exporter runs the op while it traces
    rng = _STREAMS.get(stream, _FALLBACK)
    return torch.empty_like(like).normal_(generator=rng.generator(like.device))


@_standard_normal_op.register_fake
def _(like: Tensor, stream: int) -> Tensor:
    _refuse_onnx()  # the torch.export-based exporter runs the fake while it traces
    return torch.empty_like(like)


def standard_normal(like: Tensor, rng: NoiseRNG) -> Tensor:
    """`ε ~ N(0, I)` shaped like `like` (device, dtype, memory format) from `rng`, in this thread.

    In eager code it is drawn directly. Inside a graph (`torch.compile`, `torch.export`,
    `torch.jit.trace`) it is the op `randfeat::standard_normal`, which draws when the graph *runs*,
    from the same per-thread stream: a graph never carries a generator (whose state would be saved
    with the program and replayed at every load) and never relies on torch's default generator
    (whose seed is shared by forked children, and fixed on CUDA). A graph run where its wrapper does
    not live (a program exported, saved and loaded in another process) draws from a fresh unseeded
    stream: the seed of an exported wrapper does not travel with the program.
    """
    if in_graph():
        return torch.ops.randfeat.standard_normal(like.detach(), rng.stream)
    return torch.empty_like(like).normal_(generator=rng.generator(like.device))


def sigma_for(nu: Variance, feature: Tensor, where: str) -> float | Tensor:
    """The standard deviation `sqrt(ν)` (or `sqrt(Σ)` on `feature`'s device and dtype).

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
    """Raise a clear TypeError unless `feature` is a floating tensor.

    `None` is what a pre-hook sees on a module called with keyword arguments only.
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


def per_layer(nu: object, keys: list[str], specs: list[str]) -> dict[str, Variance]:
    """Expand `nu` (one variance, or a mapping keyed by spec or canonical key) to every layer."""
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
