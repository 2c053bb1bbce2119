"""What [calibrate_nu][randfeat.calibration.calibrate_nu] returns: the frozen `Calibration` record.

It also names the options the record reports: the noise shape, which path evaluated the
candidates, and why the search stopped.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypedDict

from torch import Tensor

from randfeat.wrapper import NuSpec

__all__ = [
    "Calibration",
    "CalibrationPath",
    "NoiseShape",
    "ReadOnlyCovariance",
    "Stopped",
    "WrapKwargs",
]

NoiseShape = Literal["isotropic", "feature-variance"]
"""`"isotropic"`: $\\Sigma = \\nu I$; `"feature-variance"`: $\\Sigma = \\nu\\,\\mathrm{Var}(h)$ per feature."""
CalibrationPath = Literal["projected", "head", "full"]
"""How the candidates were evaluated: noise projected to the logits once (a linear head), the head
re-run on cached noisy features, or full noisy forwards of the model."""
Stopped = Literal["tol", "resolution"]
"""Why the search stopped: within `tol` of the target, or at the resolution the data allow."""


class ReadOnlyCovariance(Mapping[str, Tensor]):
    """A read-only, picklable mapping layer → Σ (`types.MappingProxyType` does not pickle)."""

    def __init__(self, items: Mapping[str, Tensor]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> Tensor:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k!r}: Σ{list(v.shape)}" for k, v in self._items.items()) + "}"


class WrapKwargs(TypedDict):
    """Keyword arguments for [wrap][randfeat.wrap] / `RandomizedFeatureWrapper`."""

    layers: list[str]
    nu: NuSpec


@dataclass(frozen=True, eq=False)
class Calibration:
    """The result of [calibrate_nu][randfeat.calibration.calibrate_nu] for one target drop.

    Use it with `randfeat.wrap(model, **c.wrap_kwargs())` or
    `randfeat.wrap(model, layers=c.layers, nu=c.nu_for_wrap)`.

    Attributes:
        nu: the scale ν found (a variance for `"isotropic"`; a factor on Var(feature) for
            `"feature-variance"`).
        covariance: the covariance Σ to give the wrapper (variances, not standard deviations): the
            float ν for `"isotropic"`, or a read-only mapping layer → `ν·Var(feature)` (float32
            CPU tensors shaped like the feature without the batch dimension) for
            `"feature-variance"`.
        layers: the canonical perturbed points (`"head.pre"`, `"input"`, ...).
        noise: `"isotropic"` or `"feature-variance"`.
        target_drop: the absolute accuracy drop asked for.
        base_accuracy: clean accuracy on the data (noise off).
        accuracy: estimated accuracy of the defended model at `nu` (mean over `draws` draws).
        drop: `base_accuracy - accuracy`.
        n_images: `N`, images in the calibration data.
        draws: noise draws per image for each candidate.
        resolution: the smallest accuracy step, `1 / (N · draws)`.
        tol: the tolerance on `|drop - target_drop|` used.
        stopped: `"tol"` (within tol) or `"resolution"` (no finer step possible).
        history: every `(ν, estimated accuracy)` evaluated, in search order (shared by all the
            targets of one call).
        fast_path: whether the candidates avoided full forwards (`path` is not `"full"`).
        path: how the candidates were evaluated: `"projected"` (a linear head: the noise drawn
            and projected to the logits once, each candidate compared in logit space), `"head"`
            (the head re-run on cached noisy features) or `"full"` (noisy forwards of the whole
            model).
        model_evals: full forwards of single images (clean pass + noisy passes) for the whole call.
        head_evals: head-only evaluations of single images for the whole call: the verification
            of the head (N), then N·draws once (`"projected"`) or for each candidate (`"head"`).
        clean_pass_equivalents: wall time of the whole call / wall time of its first (clean) pass.
        wall_time_s: wall time of the whole call, seconds.
        seed: the `seed` argument (`None`: OS entropy, not recorded).
    """

    nu: float
    covariance: float | Mapping[str, Tensor] = field(repr=False)
    layers: tuple[str, ...]
    noise: NoiseShape
    target_drop: float
    base_accuracy: float
    accuracy: float
    drop: float
    n_images: int
    draws: int
    resolution: float
    tol: float
    stopped: Stopped
    history: tuple[tuple[float, float], ...] = field(repr=False)
    fast_path: bool
    path: CalibrationPath
    model_evals: int
    head_evals: int
    clean_pass_equivalents: float
    wall_time_s: float
    seed: int | None

    @property
    def nu_for_wrap(self) -> NuSpec:
        """The `nu` argument of [wrap][randfeat.wrap] (the `covariance`)."""
        return self.covariance

    @property
    def sigma(self) -> float | Mapping[str, Tensor]:
        """Deprecated name of `covariance` (it holds variances, which `sigma` hid)."""
        warnings.warn(
            "`Calibration.sigma` is deprecated and will be removed in 0.2: use "
            "`Calibration.covariance` (the same value: variances, not standard deviations).",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.covariance

    def wrap_kwargs(self) -> WrapKwargs:
        """`{"layers": [...], "nu": ...}` for `randfeat.wrap(model, **c.wrap_kwargs())`."""
        return {"layers": list(self.layers), "nu": self.covariance}
