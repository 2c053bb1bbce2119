"""One forward of a wrapper in one context: its per-call state, and the hook that reaches it.

[Run][randfeat.runs.Run] is what the feature hooks of one forward need to know (is noise on, given
draws, which points were reached, the input's row seeds for keyed noise). The wrapper keeps it in
a context variable, one per thread and asyncio task. [WeakFeatureHook][randfeat.runs.WeakFeatureHook]
is the hook stored on the model: it holds its wrapper weakly, so that a wrapper dropped without
`unwrap()` is not kept alive by the model it wraps.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

__all__ = ["OwnerMethod", "Run", "WeakFeatureHook", "check_draws"]

Owner = TypeVar("Owner")
OwnerMethod = Callable[[Owner, str, object], "Tensor | None"]
"""A function `(owner, key, feature) -> replacement or None` (an unbound method of the owner)."""


@dataclass
class Run:
    """One forward of one wrapper in one context (thread or task): what its hooks need to know.

    Attributes:
        noise_on: whether this forward adds noise.
        explicit: given standard-normal draws per layer key (`forward_with_noise`), else `None`.
        fired: the layer keys reached so far.
        shapes: the feature shape at each reached key.
        x: the input batch, hashed for keyed noise when a point first needs it.
        seeds: the input's row seeds `[N, 2]` (keyed noise), computed once per forward.
    """

    noise_on: bool
    explicit: Mapping[str, Tensor] | None = None
    fired: set[str] = field(default_factory=set)
    shapes: dict[str, torch.Size] = field(default_factory=dict)
    x: Tensor | None = None
    seeds: Tensor | None = None

    def check_reached(self, layers: list[str]) -> None:
        """Raise a RuntimeError unless every one of `layers` was reached in this forward."""
        missing = [k for k in layers if k not in self.fired]
        if missing:
            raise RuntimeError(
                f"Layer(s) {missing} were never reached in the model's forward, so no noise was "
                "added there. Choose layers that the forward pass actually calls."
            )

    def given_draw(self, key: str, feature: Tensor) -> Tensor:
        """The given draw at `key`, in the feature's dtype.

        Raises:
            ValueError: its shape is not the feature's.
        """
        eps = (self.explicit or {})[key]
        if eps.shape != feature.shape:
            raise ValueError(
                f"Expected the noise for {key!r} to have the feature's shape "
                f"{list(feature.shape)}, but got {list(eps.shape)}."
            )
        return eps.to(feature.dtype)


def check_draws(noise: object, layers: list[str]) -> dict[str, Tensor]:
    """Given draws (`forward_with_noise`): exactly one tensor per wrapped layer key.

    Raises:
        ValueError: a layer is missing or unknown, or a draw is not a tensor.
    """
    if not isinstance(noise, Mapping) or set(noise) != set(layers):
        got = sorted(noise) if isinstance(noise, Mapping) else type(noise).__name__
        raise ValueError(
            f"Expected argument `noise` to map every wrapped layer {layers} to a "
            f"standard-normal tensor, but got {got}."
        )
    bad = [k for k, v in noise.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"Expected the noise for {bad} to be tensors.")
    return dict(noise)


class WeakFeatureHook(Generic[Owner]):
    """A feature hook that calls `method(owner, key, feature)` while `owner` lives.

    It holds the owner weakly (the model owns the hook, the wrapper owns the model: a strong
    reference would keep a dropped wrapper alive through the model). Pickled with a strong
    reference, so that a pickled model or wrapper comes back whole. `method` is a plain function
    (e.g. `Wrapper._on_feature`), which `torch.compile` traces through.
    """

    def __init__(self, owner: Owner, method: OwnerMethod[Owner], key: str) -> None:
        self.ref: Callable[[], Owner | None] = weakref.ref(owner)
        self.method = method
        self.key = key

    def __call__(self, feature: object) -> Tensor | None:
        owner = self.ref()
        return None if owner is None else self.method(owner, self.key, feature)

    def __getstate__(self) -> dict[str, object]:
        return {"owner": self.ref(), "method": self.method, "key": self.key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        owner = state["owner"]
        self.ref = weakref.ref(owner) if owner is not None else _dead
        self.method = state["method"]
        self.key = state["key"]


def _dead() -> None:
    return None
