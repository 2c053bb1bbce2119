"""Choose the noise variance ν by its clean-accuracy cost (paper §5: defenses compared at equal drops).

The paper compares defenses at noise scales that cost ≈1, 2 or 4 points of clean accuracy (Tables
1–3, 14). With the randomized model's accuracy (Eq. 12)

.. math::

    \\mathrm{Acc}(\\nu) = \\mathbb{E}_{(x,y)}\\,\\mathbb{E}_{\\varepsilon \\sim \\mathcal{N}(0, I)}
        \\big[\\mathbb{1}\\{\\arg\\max g(h(x) + \\sqrt{\\nu}\\,\\sigma \\odot \\varepsilon) = y\\}\\big],

:func:`calibrate_nu` finds ν with ``Acc(0) - Acc(ν) ≈ target_drop`` on calibration data, estimating
``Acc(ν)`` with ``draws`` noise draws per image.

**Common random numbers.** Every candidate ν reuses the same noise ε (the noise stream is reseeded
before each candidate), scaled by √ν, so each draw moves the feature along a fixed ray
``h + s·σ⊙ε``, ``s = √ν``. For a linear (affine) head the set of features classified ``y`` is an
intersection of half-spaces, hence convex, so along the ray it is an interval: a draw of a
correctly classified image stays correct up to some ``s*`` and wrong beyond it. The estimated
accuracy over clean-correct images is therefore *exactly* non-increasing in ν; a clean-*mis*classified
image can be "rescued" by noise on an interval of ν, the only source of non-monotonicity (rare; none
when the labels are the model's own predictions). Deeper heads give no such guarantee, so the search
below never relies on monotonicity: it keeps the tightest consistent bracket.

**Search.** Start at a data-derived guess (a tenth of the measured feature variance, i.e. a
signal-to-noise ratio of 10), step ×10 / ÷10 until the target is bracketed (within 60 decades, else
a clear error), then bisect in log space. Stop at ``tol`` (``stopped="tol"``) or at the resolution
the data allow (``stopped="resolution"``: the bracket's relative width is below 1e-3, or its two
ends differ by one correct draw so no ν in between can do better). Every evaluated candidate is
shared across targets.

**Fast path.** When the single perturbed point is the input of a module whose output *is* the
model's output (``head.pre`` on the digits CNN and timm ViTs, ``fc.pre`` on ResNets), verified on
every batch of the clean pass (exactly one call, one positional input, its output ``torch.equal`` to
the model's output, and re-running it on the captured input reproduces that output), the clean pass
caches the head's input features ``[N, *F]`` on the model's device (memory ``N × prod(F) ×
itemsize``: 16 MB for 2,000 ResNet-50 images) and each candidate runs only the head on
``features + √ν·σ⊙ε``. Calibration then costs about one clean pass. Any other choice of layers
(``"input"``, mid-network layers, several layers) runs full noisy forwards through a
:class:`~randfeat.wrapper.RandomizedFeatureWrapper`.

This module holds the public API; the argument checks, the search (``_Search``, with its constants
``MAX_DECADES``, ``SATURATED_DECADES``, ``NARROW``, re-exported here) and the progress bar are in
:mod:`randfeat._calibration_search`, and the passes over the data (batching, the clean pass with its
feature moments and fast-path check, the evaluation of one candidate ν) are in
:mod:`randfeat._calibration_data`.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypedDict, overload

import torch
from torch import Tensor, nn

from randfeat._calibration_data import Path as Path
from randfeat._calibration_data import (
    _clean_pass,
    _Evaluator,
    _model_device_dtype,
    _Moments,
    _NonFinite,
    _Source,
)
from randfeat._calibration_search import MAX_DECADES as MAX_DECADES
from randfeat._calibration_search import NARROW as NARROW
from randfeat._calibration_search import SATURATED_DECADES as SATURATED_DECADES
from randfeat._calibration_search import Stopped as Stopped
from randfeat._calibration_search import _check_args, _check_targets, _progress, _Search
from randfeat.layers import HookPoint, resolve_layers
from randfeat.wrapper import NuSpec

__all__ = ["Calibration", "calibrate_nu"]

logger = logging.getLogger(__name__)

NoiseShape = Literal["isotropic", "feature-variance"]
Data = tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]]

DRAW_BUDGET = 20_000
"""Default ``draws = ceil(DRAW_BUDGET / N)``: 20,000 draws make the Monte-Carlo standard error of a
2-point drop √(0.02·0.98/20000) ≈ 0.001, the default ``tol``."""
MAX_DRAWS = 64
"""Cap on the default draws: below ~300 images the data's own sampling error √(p(1-p)/N) dominates
and more draws per image cannot reduce it."""
MIN_TOL = 1e-3
"""Default ``tol = max(MIN_TOL, resolution / 2)``: 0.1 point, the Monte-Carlo error at 20,000 draws
and 10× finer than the smallest drop the paper uses; bisecting finer only fits noise."""
GUESS_FACTOR = 0.1
"""First candidate: ν = 0.1 × feature variance (isotropic), ν = 0.1 (feature-variance)."""
DEFAULT_ROWS = 256
"""Default rows (images or noisy copies) per model forward."""
CHANCE_SE = 3.0
"""A model is "at chance" when its accuracy is at most ``1/K + 3·√((1/K)(1-1/K)/N)``: a guessing
classifier exceeds that on N images with probability ≈ 0.1%."""


class _ReadOnly(Mapping[str, Tensor]):
    """A read-only, picklable mapping layer → Σ (``types.MappingProxyType`` does not pickle)."""

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
    """Keyword arguments for :func:`randfeat.wrap` / :class:`RandomizedFeatureWrapper`."""

    layers: list[str]
    nu: NuSpec


@dataclass(frozen=True, eq=False)
class Calibration:
    """The result of :func:`calibrate_nu` for one target drop.

    Use it with ``randfeat.wrap(model, **c.wrap_kwargs())`` or
    ``randfeat.wrap(model, layers=c.layers, nu=c.nu_for_wrap)``.

    Attributes:
        nu: the scale ν found (a variance for ``"isotropic"``; a factor on Var(feature) for
            ``"feature-variance"``).
        covariance: the covariance Σ to give the wrapper (variances, not standard deviations): the
            float ν for ``"isotropic"``, or a read-only mapping layer → ``ν·Var(feature)`` (float32 CPU tensors
            shaped like the feature without the batch dimension) for ``"feature-variance"``.
        layers: the canonical perturbed points (``"head.pre"``, ``"input"``, ...).
        noise: ``"isotropic"`` or ``"feature-variance"``.
        target_drop: the absolute accuracy drop asked for.
        base_accuracy: clean accuracy on the data (noise off).
        accuracy: estimated accuracy of the defended model at ``nu`` (mean over ``draws`` draws).
        drop: ``base_accuracy - accuracy``.
        n_images: ``N``, images in the calibration data.
        draws: noise draws per image for each candidate.
        resolution: the smallest accuracy step, ``1 / (N · draws)``.
        tol: the tolerance on ``|drop - target_drop|`` used.
        stopped: ``"tol"`` (within tol) or ``"resolution"`` (no finer step possible).
        history: every ``(ν, estimated accuracy)`` evaluated, in search order (shared by all the
            targets of one call).
        fast_path: whether the candidates avoided full forwards (`path` is not `"full"`).
        path: which way the candidates were evaluated: `"projected"` (a linear head: the noise
            drawn and projected to the logits once, each candidate compared in logit space),
            `"head"` (the head re-run on cached noisy features) or `"full"` (noisy forwards of the
            whole model).
        model_evals: full forwards of single images (clean pass + noisy passes) for the whole call.
        head_evals: head-only evaluations of single images for the whole call: the verification of
            the head (N), then N·draws once (`"projected"`) or per candidate (`"head"`).
        clean_pass_equivalents: wall time of the whole call / wall time of its first (clean) pass.
        wall_time_s: wall time of the whole call, seconds.
        seed: the ``seed`` argument (``None``: OS entropy, not recorded).
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
    path: Path
    model_evals: int
    head_evals: int
    clean_pass_equivalents: float
    wall_time_s: float
    seed: int | None

    @property
    def nu_for_wrap(self) -> NuSpec:
        """The ``nu`` argument of :func:`randfeat.wrap` (:attr:`covariance`)."""
        return self.covariance

    @property
    def sigma(self) -> float | Mapping[str, Tensor]:
        """Deprecated name of :attr:`covariance` (it holds variances, which ``sigma`` hid)."""
        warnings.warn(
            "`Calibration.sigma` is deprecated and will be removed in 0.2: use "
            "`Calibration.covariance` (the same value: variances, not standard deviations).",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.covariance

    def wrap_kwargs(self) -> WrapKwargs:
        """``{"layers": [...], "nu": ...}`` for ``randfeat.wrap(model, **c.wrap_kwargs())``."""
        return {"layers": list(self.layers), "nu": self.covariance}


# ---------------------------------------------------------------------------- calibrate_nu
@overload
def calibrate_nu(
    model: nn.Module,
    data: Data,
    layers: str | Sequence[str] = ...,
    target_drop: float = ...,
    *,
    seed: int | None = ...,
    tol: float | None = ...,
    progress: bool = ...,
    draws: int | None = ...,
    noise: NoiseShape = ...,
    batch_size: int | None = ...,
) -> Calibration: ...


@overload
def calibrate_nu(
    model: nn.Module,
    data: Data,
    layers: str | Sequence[str],
    target_drop: Sequence[float],
    *,
    seed: int | None = ...,
    tol: float | None = ...,
    progress: bool = ...,
    draws: int | None = ...,
    noise: NoiseShape = ...,
    batch_size: int | None = ...,
) -> list[Calibration]: ...


@overload
def calibrate_nu(
    model: nn.Module,
    data: Data,
    *,
    target_drop: Sequence[float],
    layers: str | Sequence[str] = ...,
    seed: int | None = ...,
    tol: float | None = ...,
    progress: bool = ...,
    draws: int | None = ...,
    noise: NoiseShape = ...,
    batch_size: int | None = ...,
) -> list[Calibration]: ...


def calibrate_nu(
    model: nn.Module,
    data: Data,
    layers: str | Sequence[str] = ("penultimate",),
    target_drop: float | Sequence[float] = 0.01,
    *,
    seed: int | None = None,
    tol: float | None = None,
    progress: bool = True,
    draws: int | None = None,
    noise: NoiseShape = "isotropic",
    batch_size: int | None = None,
) -> Calibration | list[Calibration]:
    """Find the noise scale ν whose clean-accuracy cost on ``data`` is ``target_drop``.

    Args:
        model: the undefended classifier returning logits ``[N, K]`` (eval mode).
        data: an ``(x, y)`` pair (``x: [N, ...]``, ``y: [N]`` int64 in ``[0, K)``) or an iterable of
            such batches (a DataLoader without shuffling). Moved to the device and floating dtype of
            the model's first parameter or buffer (CPU if none).
        layers: layer specs as for :func:`randfeat.wrap` (default ``"penultimate"``, the
            classifier's input; ``"head.pre"``, ``"input"`` = RND, a module name, or several: one
            shared ν).
        target_drop: absolute accuracy drop (0.02 = two points) in ``(0, base accuracy)``, or a
            sequence of them (one result each, all from the same pass over the data).
        seed: ``None`` draws the calibration noise from OS entropy; an int makes it reproducible.
        tol: stop when ``|drop - target_drop| <= tol``; default ``max(0.001, resolution / 2)``.
        progress: show a tqdm bar (if tqdm is installed and stderr is a terminal).
        draws: noise draws per image per candidate; default ``min(64, ceil(20000 / N))``.
        noise: ``"isotropic"`` (Σ = ν·I) or ``"feature-variance"`` (Σ = ν·Var(feature), per feature,
            measured over ``data`` in the clean pass).
        batch_size: most rows (images, or noisy copies of images) per forward; default 256.

    Returns:
        A :class:`Calibration`, or a list of them (same order) when ``target_drop`` is a sequence.

    Raises:
        TypeError: a wrapped or non-module ``model``, malformed ``data``, non-integer labels.
        ValueError: an unknown layer, a target outside ``(0, base accuracy)``, empty data, labels
            out of range, x/y length mismatch, non-finite logits, a model at chance accuracy, or a
            target the noise cannot reach within 60 decades of ν.
    """
    targets, many = _check_targets(target_drop)
    _check_args(model, noise, seed, tol, draws, batch_size)
    points = resolve_layers(model, layers)
    if model.training:
        logger.warning(
            "calibrate_nu: the model is in training mode (dropout/batch-norm make the accuracy "
            "random and update buffers); call model.eval() first."
        )
    with torch.no_grad():
        results = _calibrate(
            model, data, points, targets, seed, tol, progress, draws, noise, batch_size
        )
    return results if many else results[0]


def _calibrate(
    model: nn.Module,
    data: object,
    points: list[HookPoint],
    targets: list[float],
    seed: int | None,
    tol: float | None,
    progress: bool,
    draws: int | None,
    noise: NoiseShape,
    batch_size: int | None,
) -> list[Calibration]:
    t_start = time.perf_counter()
    rows = batch_size or DEFAULT_ROWS
    device, dtype = _model_device_dtype(model)
    source = _Source(data, rows, device, dtype)
    keys = [p.key for p in points]
    per_feature = noise == "feature-variance"
    bar = _progress(progress)
    try:
        clean = _clean_pass(model, source, points, per_feature, bar)
        n, k = clean.n, clean.k
        if n == 0:
            raise ValueError(
                "Expected argument `data` to hold at least one image, but it is empty."
            )
        base = clean.base_count / n
        chance = 1.0 / k + CHANCE_SE * math.sqrt((1.0 / k) * (1.0 - 1.0 / k) / n)
        if base <= chance:
            raise ValueError(
                f"Expected a model better than chance, but its clean accuracy on `data` is "
                f"{base:.4f} <= 1/K + 3 SE = {chance:.4f} (K={k}, N={n}); there is no accuracy to "
                "trade for noise."
            )
        for t in targets:
            if not t < base:
                raise ValueError(
                    f"Expected argument `target_drop` to lie in (0, base accuracy = {base:.4f}), "
                    f"but got {t!r}."
                )
        if clean.fast_reason:
            logger.info("calibrate_nu: fast path off (%s); full noisy forwards.", clean.fast_reason)
        else:
            logger.info("calibrate_nu: %s path.", clean.path)
        d = draws or min(MAX_DRAWS, max(1, math.ceil(DRAW_BUDGET / n)))
        total = n * d
        resolution = 1.0 / total
        tol_v = float(tol) if tol is not None else max(MIN_TOL, resolution / 2)
        spec, guess = _noise_shape(clean.moments, keys, per_feature)
        seed_v = seed if seed is not None else secrets.randbits(63)
        evaluate = _Evaluator(model, source, clean, keys, spec, d, rows, seed_v, bar)
        search = _Search(evaluate, total, clean.base_count * d, guess)
        found: list[tuple[float, Stopped]] = []
        try:
            for t in targets:
                found.append(search.solve((base - t) * total, tol_v * total))
        except _NonFinite as err:
            raise ValueError(f"Expected finite logits during calibration, but {err}.") from None
        finally:
            evaluate.close()
    finally:
        bar.close()
    wall = time.perf_counter() - t_start
    history = tuple((v, search.cache[v] / total) for v in search.order)
    results = []
    for t, (nu, stopped) in zip(targets, found, strict=True):
        acc = search.cache[nu] / total
        s = spec(nu)
        results.append(
            Calibration(
                nu=nu,
                covariance=_ReadOnly(s) if isinstance(s, dict) else s,
                layers=tuple(keys),
                noise=noise,
                target_drop=t,
                base_accuracy=base,
                accuracy=acc,
                drop=base - acc,
                n_images=n,
                draws=d,
                resolution=resolution,
                tol=tol_v,
                stopped=stopped,
                history=history,
                fast_path=clean.path != "full",
                path=clean.path,
                model_evals=evaluate.model_evals,
                head_evals=evaluate.head_evals,
                clean_pass_equivalents=wall / clean.seconds if clean.seconds > 0 else math.nan,
                wall_time_s=wall,
                seed=seed,
            )
        )
    return results


def _noise_shape(
    moments: dict[str, _Moments], keys: list[str], per_feature: bool
) -> tuple[Callable[[float], float | dict[str, Tensor]], float]:
    """The map ν → wrapper ``nu`` (a float, or Σ per layer) and the first candidate ν."""
    if not per_feature:
        pooled = [v for v in (moments[k].pooled_variance() for k in keys) if v > 0]
        scale = math.exp(sum(map(math.log, pooled)) / len(pooled)) if pooled else 1.0
        return (lambda nu: nu), GUESS_FACTOR * scale
    variances = {k: moments[k].variance() for k in keys}
    if not any(bool((v > 0).any()) for v in variances.values()):
        raise ValueError(
            f"Cannot use noise='feature-variance' at {keys}: every feature is constant over `data` "
            "(variance 0), so the noise would be zero. Use noise='isotropic'."
        )
    return (lambda nu: {k: v * nu for k, v in variances.items()}), GUESS_FACTOR
