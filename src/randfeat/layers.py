"""Layer specs: where in a model the noise goes.

A spec is a string:

* `"<name>"`: a module name from `model.named_modules()`; the noise is added to that module's
  **output** (Algorithm 1: `z_i <- h_i(z_{i-1}) + δ`).
* `"<name>.pre"`: the noise is added to that module's **input** (its first positional argument).
  `"head.pre"` on a timm ViT and `"fc.pre"` on a ResNet are the penultimate features.
* `"penultimate"`: the input of the model's classifier: timm's `get_classifier()` where the model
  has one, else the last `torch.nn.Linear` in registration order (the `classifier` of Hugging Face
  image classifiers, `classifier.1` after the `Flatten` of their ResNets).
* `"input"`: the model's input (the RND baseline of Qin et al. 2021).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

__all__ = ["HookPoint", "find_classifier", "resolve_layers", "valid_specs"]

Where = Literal["input", "output"]


@dataclass(frozen=True)
class HookPoint:
    """A resolved layer spec.

    Attributes:
        spec: the spec as the user wrote it (`"penultimate"`, `"head.pre"`, ...).
        name: the module's name in `model.named_modules()` (`""` for the model itself).
        module: the module whose input or output is perturbed.
        where: `"input"` (forward-pre-hook) or `"output"` (forward hook).
    """

    spec: str
    name: str
    module: nn.Module
    where: Where

    @property
    def key(self) -> str:
        """Canonical name of the perturbed tensor: `"input"`, `"<name>"` or `"<name>.pre"`."""
        if self.name == "" and self.where == "input":
            return "input"
        return f"{self.name}.pre" if self.where == "input" else self.name

    def describe(self) -> str:
        """Human-readable form used in `repr`: `penultimate -> head.pre`."""
        return self.key if self.spec == self.key else f"{self.spec} -> {self.key}"


def find_classifier(model: nn.Module) -> tuple[str, nn.Module]:
    """The model's classifier and its name.

    Uses timm's `get_classifier()` contract when present, else the last `nn.Linear` in
    registration order.

    Raises:
        ValueError: the model has no classifier we can find (or timm's classifier is an Identity).
    """
    get = getattr(model, "get_classifier", None)
    if callable(get):
        clf = get()
        if isinstance(clf, nn.Module) and not isinstance(clf, nn.Identity):
            for name, mod in model.named_modules():
                if mod is clf and name:
                    return name, mod
    last: tuple[str, nn.Module] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = (name, mod)
    if last is None:
        raise ValueError(
            "Cannot resolve layer spec 'penultimate': the model has no `get_classifier()` and no "
            "nn.Linear. Name the layer explicitly, e.g. layers=['<classifier name>.pre']."
        )
    return last


def valid_specs(model: nn.Module) -> list[str]:
    """Every spec this model accepts (for error messages and discovery)."""
    names = [n for n, _ in model.named_modules() if n]
    return ["input", "penultimate", *names, *(f"{n}.pre" for n in names)]


def _resolve_one(model: nn.Module, spec: str, modules: dict[str, nn.Module]) -> HookPoint:
    if not isinstance(spec, str):
        raise TypeError(
            f"Expected each layer spec to be a str, but got {spec!r} ({type(spec).__name__})."
        )
    if spec == "input":
        return HookPoint(spec, "", model, "input")
    if spec == "penultimate":
        name, mod = find_classifier(model)
        return HookPoint(spec, name, mod, "input")
    if spec in modules and spec:
        return HookPoint(spec, spec, modules[spec], "output")
    if spec.endswith(".pre") and spec[: -len(".pre")] in modules and spec != ".pre":
        name = spec[: -len(".pre")]
        return HookPoint(spec, name, modules[name], "input")
    close = difflib.get_close_matches(spec, valid_specs(model), n=5, cutoff=0.5)
    hint = f" Closest valid names: {', '.join(repr(c) for c in close)}." if close else ""
    raise ValueError(
        f"Unknown layer spec {spec!r}: no module of {type(model).__name__} has that name.{hint} "
        "Allowed: a name from model.named_modules(), '<name>.pre', 'penultimate' or 'input'."
    )


def resolve_layers(model: nn.Module, layers: str | Sequence[str]) -> list[HookPoint]:
    """Resolve specs to hook points, in the order given.

    Raises:
        ValueError: an empty list, an unknown name (with the closest valid names), or two specs that
            resolve to the same point.
        TypeError: a spec that is not a string.
    """
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError(
            f"Expected argument `layers` to be a non-empty list of layer specs, but got {layers!r}."
        )
    modules = dict(model.named_modules())
    points = [_resolve_one(model, spec, modules) for spec in layers]
    seen: dict[str, str] = {}
    for p in points:
        if p.key in seen:
            raise ValueError(
                f"Layer specs {seen[p.key]!r} and {p.spec!r} both resolve to {p.key!r}; "
                "each point may be perturbed once (combine their variances instead)."
            )
        seen[p.key] = p.spec
    return points
