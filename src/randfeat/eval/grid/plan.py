"""Rank 0's preparation of a run: the model, the images, ν, the header and what is left to do.

Part of `randfeat eval`, the protocol of Nguyen et al., "Understanding the Robustness of
Randomized Feature Defense Against Query-Based Adversarial Attacks", ICLR 2024 (§5): a
class-balanced random subset of test images is attacked, and the randomized defenses are compared
at equal cost, their ν calibrated by `randfeat.calibrate_nu` to each target drop in clean accuracy
on held-out images disjoint from the attacked ones.
[prepare][randfeat.eval.grid.plan.prepare] reads what the result file already holds, loads the
model and the pool of images, draws the attacked and calibration images, calibrates ν (or reuses
the file's), writes the header and returns the [Plan][randfeat.eval.grid.plan.Plan] that rank 0
broadcasts to every rank.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from randfeat.calibration import calibrate_nu
from randfeat.eval.attacks.registry import ATTACKS
from randfeat.eval.data.loaders import balanced_subset
from randfeat.eval.data.registry import Pool
from randfeat.eval.errors import ConfigError
from randfeat.eval.grid.config import EvalConfig, derive_seed
from randfeat.eval.grid.detection import detection_info
from randfeat.eval.grid.distributed import Dist, device_name
from randfeat.eval.grid.units import build_attacks
from randfeat.eval.models.sources import ModelRequest, model_source
from randfeat.eval.oracle import Model
from randfeat.eval.remote import HTTPModel, RemoteError
from randfeat.eval.results.file import (
    FORMAT,
    FORMAT_VERSION,
    NON_RESULT_SETTINGS,
    ResultWriter,
    complete_units,
)
from randfeat.eval.results.records import (
    AttackInfo,
    CalibratedDefense,
    DataInfo,
    Header,
    ModelInfo,
    Radii,
    Unit,
)
from randfeat.layers import resolve_layers

__all__ = ["Plan", "connect", "load_model", "load_pool", "prepare"]

logger = logging.getLogger(__name__)

_RANDOMIZED = ("input", "feature", "keyed")
"""The defenses whose ν is calibrated (keyed noise takes the feature defense's ν: for each image
one draw of the same N(0, ν), so the same expected clean accuracy)."""


@dataclass(frozen=True)
class Plan:
    """What rank 0 broadcasts: the header, the units already done, the image size.

    Attributes:
        header: the result file's header.
        done: units whose rows are all in the file.
        image_size: the side the data is resized to (None: the data's own).
    """

    header: Header
    done: frozenset[Unit]
    image_size: int | None


def load_model(cfg: EvalConfig) -> Model:
    """The model `cfg` names, in eval mode, taking images in $[0, 1]$ (or the `--target` URL).

    Raises:
        ConfigError: it cannot be loaded (the message says what to fix).
    """
    if cfg.target is not None:
        return connect(cfg)
    spec = cfg.data_spec
    classes = cfg.num_classes if cfg.num_classes is not None else spec.dataset.classes
    request = ModelRequest(cfg.model, cfg.pretrained, cfg.checkpoint, classes, spec.path)
    return model_source(cfg.model).load(request)


def connect(cfg: EvalConfig) -> HTTPModel:
    """The served model at `cfg.target`: scores, or labels when every attack is decision-based.

    Raises:
        ConfigError: the server cannot be reached, is not a randfeat server, or answers labels
            only while a score-based attack is asked for.
    """
    url = str(cfg.target)
    model = _connect(cfg, url)
    info = model.info
    if info.detection and cfg.votes > 1 and model.noise == "fresh":
        model.close()
        raise ConfigError(
            f"The server at {url} detects repeated queries and draws fresh noise: the "
            f"oracle's --votes {cfg.votes} verification forwards of a point, and the fresh "
            "judging, repeat it and would be refused. Pass --votes 1 (the query decides), serve "
            "with --keyed-noise (one answer a point), or evaluate in process with --detect."
        )
    return model


def _connect(cfg: EvalConfig, url: str) -> HTTPModel:
    try:
        try:
            return HTTPModel(url, api_key=cfg.api_key)
        except ValueError as err:  # a labels-only server
            needs_scores = [a for a in cfg.attacks if ATTACKS[a].output == "scores"]
            if needs_scores:
                raise ConfigError(
                    f"{err} Attacks {', '.join(needs_scores)} need scores: choose decision-based "
                    "attacks (rays, signflip) for this server."
                ) from err
            return HTTPModel(url, output="labels", api_key=cfg.api_key)
    except RemoteError as err:
        raise ConfigError(f"Cannot use --target {url}: {err}") from err


def image_size(cfg: EvalConfig, model: Model) -> int | None:
    """`--image-size`, else the model's own input side for data sets that default to it."""
    if cfg.image_size is not None or not cfg.data_spec.dataset.native_size:
        return cfg.image_size
    if isinstance(model, HTTPModel):
        return model.info.input_shape[-1]
    return model_source(cfg.model).native_size(_local(model)) or 224


def load_pool(cfg: EvalConfig, size: int | None) -> Pool:
    """The pool of test images `cfg` names, resized to `size` where the data set allows."""
    return cfg.data_spec.load(size)


def _versions() -> dict[str, str]:
    """Installed versions, from package metadata (importing timm just for this costs seconds)."""
    from importlib import metadata

    from randfeat import __version__

    out = {"randfeat": __version__, "torch": torch.__version__}
    try:
        out["timm"] = metadata.version("timm")
    except metadata.PackageNotFoundError:  # pragma: no cover - timm is a core dependency
        out["timm"] = "not installed"
    out["python"] = platform.python_version()
    return out


def _indices(cfg: EvalConfig, pool: Pool) -> tuple[Tensor, Tensor]:
    """Attacked indices (class-balanced, in a seeded random order) and disjoint calibration ones."""
    n = int(cfg.n_images or 0)
    try:
        attacked = balanced_subset(pool.labels, n, seed=derive_seed(cfg.seed, "attacked"))
    except ValueError as err:
        raise ConfigError(f"Cannot draw --n-images {n} balanced images: {err}") from err
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "attacked-order"))
    attacked = attacked[torch.randperm(attacked.numel(), generator=g)]
    rest = torch.ones(pool.labels.numel(), dtype=torch.bool)
    rest[attacked] = False
    remaining = rest.nonzero().squeeze(1)
    want = cfg.calib_images or min(1000, remaining.numel())
    needs_cal = any(k in _RANDOMIZED for k in cfg.defenses)
    if needs_cal and want > remaining.numel():
        raise ConfigError(
            f"--calib-images {want} exceeds the {remaining.numel()} images left after the "
            f"{n} attacked ones; lower --calib-images or --n-images."
        )
    g.manual_seed(derive_seed(cfg.seed, "calibration"))
    cal = remaining[torch.randperm(remaining.numel(), generator=g)[:want]].sort().values
    return attacked, cal if needs_cal else cal[:0]


def _calibrate(
    cfg: EvalConfig, model: Model, pool: Pool, idx: Tensor
) -> dict[str, CalibratedDefense]:
    """ν for every `input@drop` / `feature@drop` / `keyed@drop` defense (one search per kind,
    all drops; `keyed` reuses the feature search)."""
    out: dict[str, CalibratedDefense] = {}
    wanted = [k for k in cfg.defenses if k in _RANDOMIZED]
    kinds = list(dict.fromkeys("feature" if k == "keyed" else k for k in wanted))
    if not kinds or not isinstance(model, nn.Module):  # a served model: no local calibration
        return out
    # digits: one small tensor pair; image files: streamed in batches, never all in memory
    data = pool.images(idx) if pool.x is not None else _Rereadable(pool, idx)
    for kind in kinds:
        layers = ["input"] if kind == "input" else list(cfg.layers)
        seed = derive_seed(cfg.seed, "calibrate", kind)
        logger.info(
            "Calibrating ν of %s (layers %s) to drops %s on %d held-out images.",
            kind,
            layers,
            ", ".join(f"{t:g}" for t in cfg.target_drop),
            idx.numel(),
        )
        try:
            results = calibrate_nu(
                model,
                data,
                layers,
                list(cfg.target_drop),
                seed=seed,
                progress=not cfg.quiet,
                draws=cfg.calib_draws,
                batch_size=cfg.forward_batch,
            )
        except ValueError as err:
            raise ConfigError(f"Calibration of {kind} failed: {err}") from err
        if not isinstance(results, list):
            results = [results]
        for t, r in zip(cfg.target_drop, results, strict=True):
            cal = CalibratedDefense(
                kind=kind,
                layers=tuple(r.layers),
                target_drop=t,
                nu=r.nu,
                base_accuracy=r.base_accuracy,
                accuracy=r.accuracy,
                drop=r.drop,
                n_images=r.n_images,
                draws=r.draws,
                stopped=r.stopped,
                path=r.path,
                seed=seed,
                wall_time_s=r.wall_time_s,
            )
            for k in wanted:
                if k == kind or (k, kind) == ("keyed", "feature"):
                    out[f"{k}@{t:g}"] = dataclasses.replace(cal, kind=k)
            logger.info(
                "  %s@%g: ν = %.4g, accuracy %.4f -> %.4f (drop %.4f, target %g)",
                kind,
                t,
                r.nu,
                r.base_accuracy,
                r.accuracy,
                r.drop,
                t,
            )
    return out


class _Rereadable:
    """`(x, y)` batches of a pool subset that can be iterated more than once (for calibration)."""

    def __init__(self, pool: Pool, idx: Tensor) -> None:
        self.pool, self.idx = pool, idx

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.pool.batches(self.idx, 256)


def _new_header(
    cfg: EvalConfig,
    dist: Dist,
    dev: torch.device,
    model: Model,
    pool: Pool,
    size: int | None,
    attacked: Tensor,
    cal: Tensor,
) -> Header:
    """Check the model against the data, calibrate, and describe the run."""
    x0, _ = pool.images(attacked[:1])
    served = None
    if isinstance(model, HTTPModel):  # no query spent: the server's /v1/info says it all
        try:
            model.check(x0, pool.labels)
        except ValueError as err:
            raise ConfigError(f"{err} (--image-size resizes CIFAR-10 / ImageFolder data.)") from err
        classes, parameters, served = model.info.classes, 0, model.info.to_json()
    else:
        model = _local(model)
        model.to(dev)
        with torch.no_grad():
            classes = int(model(x0.to(dev)).shape[-1])
        parameters = sum(p.numel() for p in model.parameters())
    if int(pool.labels.max()) >= classes:
        raise ConfigError(
            f"--data {cfg.data!r} has labels up to {int(pool.labels.max())}, but model "
            f"{cfg.model!r} has {classes} outputs; pass --num-classes or a matching --checkpoint."
        )
    if {"feature", "keyed"} & set(cfg.defenses) and isinstance(model, nn.Module):
        try:
            resolve_layers(model, list(cfg.layers))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"Bad --layers {','.join(cfg.layers)!r}: {err}") from err
    calibration = _calibrate(cfg, model, pool, cal)
    n_chunks = math.ceil(attacked.numel() / cfg.batch_size)
    n_rows = attacked.numel() * len(cfg.defense_names()) * (1 + len(cfg.attacks) * len(cfg.budgets))
    return Header(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        config=cfg.to_dict(),
        settings_not_compared=tuple(sorted(NON_RESULT_SETTINGS)),
        versions=_versions(),
        device=device_name(dev),
        world_size=dist.world,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        eps=Radii(float(cfg.eps or 0), float(cfg.eps_l2 or 0), cfg.eps_source),
        data=DataInfo(
            name=pool.name,
            path=pool.path,
            pool_size=int(pool.labels.numel()),
            classes=int(pool.labels.unique().numel()),
            image_shape=tuple(x0.shape[1:]),
        ),
        model=ModelInfo(
            name=cfg.model if served is None else str(served["model"]),
            parameters=parameters,
            outputs=classes,
            image_size=size,
            served=served,
        ),
        defenses=tuple(cfg.defense_names()),
        attacks={
            a: AttackInfo(atk.norm, atk.eps, repr(atk)) for a, atk in build_attacks(cfg).items()
        },
        calibration=calibration,
        attacked_indices=tuple(attacked.tolist()),
        calibration_indices=tuple(cal.tolist()),
        n_attacked=int(attacked.numel()),
        n_calibration=int(cal.numel()),
        n_chunks=n_chunks,
        rows_expected=n_rows,
        detection=None if cfg.detect is None else detection_info(cfg, pool, attacked),
    )


def prepare(
    cfg: EvalConfig, dist: Dist, dev: torch.device, writer: ResultWriter
) -> tuple[Plan, Model, Pool]:
    """Rank 0: read the file, load, calibrate (or reuse the header's ν), write the header.

    Returns:
        The plan to broadcast to every rank, the model and the pool.

    Raises:
        ConfigError: see [run_eval][randfeat.eval.grid.runner.run_eval].
    """
    config = cfg.to_dict()
    existing, damaged = writer.existing(config)
    cfg.data_spec.check_path()
    model = load_model(cfg)
    size = image_size(cfg, model)
    pool = load_pool(cfg, size)
    attacked, cal = _indices(cfg, pool)
    if existing is not None:
        header = existing.header
        if list(header.attacked_indices) != attacked.tolist():
            raise ConfigError(
                f"{str(writer.path)!r} attacked other images than this run would (the data set "
                "changed?); choose another --out."
            )
        if header.device != device_name(dev):
            logger.warning(
                "Resuming results written on %s on %s: rows stay valid measurements, but are not "
                "bit-identical to a run on one device.",
                header.device,
                device_name(dev),
            )
        rows = list(existing.rows)
    else:
        header = _new_header(cfg, dist, dev, model, pool, size, attacked, cal)
        rows = []
    done, kept = complete_units(header, cfg.batch_size, rows)
    if existing is None or damaged or len(kept) != len(rows):
        if damaged:
            logger.warning("%s: dropping a damaged last line (a crash mid-write).", writer.path)
        if len(kept) != len(rows):
            logger.warning(
                "%s: dropping %d row(s) of unfinished or duplicated units.",
                writer.path,
                len(rows) - len(kept),
            )
        writer.rewrite(header, kept)
    if kept:
        logger.info("Resuming %s: %d row(s) already done.", writer.path, len(kept))
    return Plan(header, frozenset(done), size), model, pool


def _local(model: Model) -> nn.Module:
    """`model` as the local module `load_model` returns unless there is a `--target`."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"Expected a local torch model (an nn.Module) without --target, but got "
            f"{type(model).__name__}."
        )
    return model
