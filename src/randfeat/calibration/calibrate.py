r"""`calibrate_nu`: choose the noise variance ν by its clean-accuracy cost (paper §5).

The paper compares defenses at noise scales that cost ≈1, 2 or 4 points of clean accuracy (Tables
1–3, 14). With the randomized model's accuracy (Eq. 12)

$$
\mathrm{Acc}(\nu) = \mathbb{E}_{(x,y)}\,\mathbb{E}_{\varepsilon \sim \mathcal{N}(0, I)}
    \big[\mathbb{1}\{\arg\max g(h(x) + \sqrt{\nu}\,\sigma \odot \varepsilon) = y\}\big],
$$

[calibrate_nu][randfeat.calibration.calibrate_nu] finds ν with `Acc(0) - Acc(ν) ≈ target_drop` on
calibration data, estimating `Acc(ν)` with `draws` noise draws per image: one clean pass
([clean_pass][randfeat.calibration.clean_pass.clean_pass]), then the search
([Search][randfeat.calibration.search.Search]) over candidates evaluated by one of three paths
([candidates][randfeat.calibration.candidates]).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, overload

import torch
from torch import Tensor, nn

from randfeat.calibration.candidates import counter
from randfeat.calibration.clean_pass import Moments, clean_pass
from randfeat.calibration.data import Batches, model_device_dtype
from randfeat.calibration.result import Calibration, NoiseShape, ReadOnlyCovariance, Stopped
from randfeat.calibration.search import NonFiniteLogits, Search
from randfeat.checks import (
    check_choice,
    check_optional,
    check_positive_int,
    check_probability,
    check_seed,
    expected,
)
from randfeat.layers import HookPoint, resolve_layers
from randfeat.wrapper import RandomizedFeatureWrapper

__all__ = ["Data", "calibrate_nu"]

logger = logging.getLogger(__name__)

Data = tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]]
"""An `(x, y)` pair of tensors, or an iterable of such batches (a DataLoader without shuffling)."""

DRAW_BUDGET = 20_000
"""Default `draws = ceil(DRAW_BUDGET / N)`: 20,000 draws make the Monte-Carlo standard error of a
2-point drop √(0.02·0.98/20000) ≈ 0.001, the default `tol`."""
MAX_DRAWS = 64
"""Cap on the default draws: below ~300 images the data's own sampling error √(p(1-p)/N) dominates
and more draws per image cannot reduce it."""
MIN_TOL = 1e-3
"""Default `tol = max(MIN_TOL, resolution / 2)`: 0.1 point, the Monte-Carlo error at 20,000 draws
and 10× finer than the smallest drop the paper uses; bisecting finer only fits noise."""
GUESS_FACTOR = 0.1
"""First candidate: ν = 0.1 × feature variance (isotropic), ν = 0.1 (feature-variance)."""
DEFAULT_ROWS = 256
"""Default rows (images or noisy copies) per model forward."""
CHANCE_SE = 3.0
"""A model is "at chance" when its accuracy is at most `1/K + 3·√((1/K)(1-1/K)/N)`: a guessing
classifier exceeds that on N images with probability ≈ 0.1%."""


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
    """Find the noise scale ν whose clean-accuracy cost on `data` is `target_drop`.

    Args:
        model: the undefended classifier returning logits `[N, K]` (eval mode).
        data: an `(x, y)` pair (`x: [N, ...]`, `y: [N]` int64 in `[0, K)`) or an iterable of
            such batches (a DataLoader without shuffling). Moved to the device and floating dtype of
            the model's first parameter or buffer (CPU if none).
        layers: layer specs as for [`randfeat.wrap`][randfeat.wrap] (default `"penultimate"`, the
            classifier's input; `"head.pre"`, `"input"` = RND, a module name, or several: one
            shared ν).
        target_drop: absolute accuracy drop (0.02 = two points) in `(0, base accuracy)`, or a
            sequence of them (one result each, all from the same pass over the data).
        seed: `None` draws the calibration noise from OS entropy; an int makes it reproducible.
        tol: stop when `|drop - target_drop| <= tol`; default `max(0.001, resolution / 2)`.
        progress: show a tqdm bar (if tqdm is installed and stderr is a terminal).
        draws: noise draws per image per candidate; default `min(64, ceil(20000 / N))`.
        noise: `"isotropic"` (Σ = ν·I) or `"feature-variance"` (Σ = ν·Var(feature), per feature,
            measured over `data` in the clean pass).
        batch_size: most rows (images, or noisy copies of images) per forward; default 256.

    Returns:
        A [`Calibration`][randfeat.calibration.Calibration], or a list of them (same order) when `target_drop` is a sequence.

    Raises:
        TypeError: a wrapped or non-module `model`, malformed `data`, non-integer labels.
        ValueError: an unknown layer, a target outside `(0, base accuracy)`, empty data, labels
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
    device, dtype = model_device_dtype(model)
    source = Batches(data, rows, device, dtype)
    keys = [p.key for p in points]
    per_feature = noise == "feature-variance"
    bar = _progress(progress)
    try:
        clean = clean_pass(model, source, points, per_feature, bar)
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
        evaluate = counter(model, source, clean, keys, spec, d, rows, seed_v, bar)
        search = Search(evaluate, total, clean.base_count * d, guess)
        found: list[tuple[float, Stopped]] = []
        try:
            for t in targets:
                found.append(search.solve((base - t) * total, tol_v * total))
        except NonFiniteLogits as err:
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
                covariance=ReadOnlyCovariance(s) if isinstance(s, dict) else s,
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
    moments: dict[str, Moments], keys: list[str], per_feature: bool
) -> tuple[Callable[[float], float | dict[str, Tensor]], float]:
    """The map ν → wrapper `nu` (a float, or Σ per layer) and the first candidate ν."""
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


def _check_targets(target_drop: object) -> tuple[list[float], bool]:
    many = isinstance(target_drop, Sequence) and not isinstance(target_drop, (str, bytes))
    values = list(target_drop) if many else [target_drop]  # type: ignore[call-overload]
    if not values:
        raise ValueError(
            expected(
                "target_drop", "an accuracy drop in (0, 1) or a non-empty sequence of them", []
            )
        )
    return [check_probability(t, "target_drop") for t in values], many


def _check_args(
    model: object, noise: object, seed: object, tol: object, draws: object, batch_size: object
) -> None:
    if isinstance(model, RandomizedFeatureWrapper):
        raise TypeError(
            "Expected argument `model` to be the undefended model, but got a "
            "RandomizedFeatureWrapper. Pass `wrapper.model` (or `wrapper.unwrap()`)."
        )
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"Expected argument `model` to be an nn.Module, but got {type(model).__name__}."
        )
    check_choice(noise, "noise", ("isotropic", "feature-variance"))
    check_seed(seed)
    check_optional(check_probability, tol, "tol")
    check_optional(check_positive_int, draws, "draws")
    check_optional(check_positive_int, batch_size, "batch_size")


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional dependency
        return _NoBar()
    return tqdm(desc="calibrate ν: clean pass", unit="batch", disable=None, leave=False)
