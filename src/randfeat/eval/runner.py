"""The evaluation grid of the paper (§5, appendix D): calibrate, attack, append JSONL, resume, shard.

Protocol (Nguyen et al., "Understanding the Robustness of Randomized Feature Defense Against
Query-Based Adversarial Attacks", ICLR 2024, §5): a class-balanced random subset of test images is
attacked under every (defense, attack, budget). The randomized defenses (``input`` = RND,
``feature`` = noise at ``layers``, default the penultimate features) are compared at equal cost:
their ν is calibrated by :func:`randfeat.calibration.calibrate_nu` to each target drop in clean
accuracy, on held-out images disjoint from the attacked ones. Success is decided by the oracle
(a majority of ``votes`` uncharged forwards, appendix D.4), and every returned point is judged
afresh with :func:`randfeat.eval.oracle.rejudge`.

:func:`run_eval` runs (or resumes) one configuration. Rank 0 prepares the run here: it checks the
result file, loads the model and the images, draws the attacked and the calibration images,
calibrates ν (or reuses the file's) and writes the header; then the units are dealt to the ranks and
their rows appended. The other parts live in modules named for them:

* :mod:`randfeat.eval.config`: :class:`~randfeat.eval.config.EvalConfig`, the attack, defense and
  data names, the default radii, :func:`~randfeat.eval.config.make_attack`, seeds;
* :mod:`randfeat.eval.results`: the result file (JSON Lines): every record and field, resuming;
* :mod:`randfeat.eval.loading`: the model and the image pool a configuration names;
* :mod:`randfeat.eval.units`: units of work (a chunk of images under one defense, attack and
  budget) and the rows of one;
* :mod:`randfeat.eval.progress`: progress bars and summary lines on rank 0;
* :mod:`randfeat.eval.distributed`: ranks under ``torchrun`` and their devices.

Randomness: every unit draws its attack seed and its defense-noise seed
(:meth:`~randfeat.wrapper.RandomizedFeatureWrapper.manual_seed`) from ``seed`` and the unit's
(chunk, defense, attack, budget) with :func:`derive_seed`, so results do not depend on which rank
runs a unit, on how many ranks there are, or on what ran before. The attacked subset, its order
and the calibration subset are drawn the same way.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) rank 0 prepares (reads the file, calibrates),
broadcasts the plan, and units are dealt round-robin; after each round rank 0 gathers the rows
(``gather_object``) and writes them. Backends: NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# `name as name`: re-exported, so the names that lived here before config.py and results.py
# keep working from randfeat.eval.runner (the CLI, the demo and user code import them).
from randfeat.eval.config import ATTACKS as ATTACKS
from randfeat.eval.config import DATA_KINDS as DATA_KINDS
from randfeat.eval.config import DEFENSE_KINDS as DEFENSE_KINDS
from randfeat.eval.config import DIGITS_EPS as DIGITS_EPS
from randfeat.eval.config import PAPER_EPS as PAPER_EPS
from randfeat.eval.config import ConfigError as ConfigError
from randfeat.eval.config import EvalConfig as EvalConfig
from randfeat.eval.config import derive_seed as derive_seed
from randfeat.eval.config import make_attack as make_attack
from randfeat.eval.distributed import _device_name, _Dist, _init_dist
from randfeat.eval.loading import _Batches, _check_data_path, _load, _load_model, _load_pool, _Pool
from randfeat.eval.progress import _Progress
from randfeat.eval.results import FORMAT as FORMAT
from randfeat.eval.results import FORMAT_VERSION as FORMAT_VERSION
from randfeat.eval.results import NON_RESULT_SETTINGS as NON_RESULT_SETTINGS
from randfeat.eval.results import RESULT_SCHEMA as RESULT_SCHEMA
from randfeat.eval.results import TIMING_FIELDS as TIMING_FIELDS
from randfeat.eval.results import (
    _check_existing,
    _check_out,
    _complete_units,
    _dumps,
    _fsync_write,
    _rewrite,
)
from randfeat.eval.results import config_differences as config_differences
from randfeat.eval.results import load_results as load_results
from randfeat.eval.units import _attacks, _build_defenses, _Context, _run_unit, _units
from randfeat.wrapper import RandomizedFeatureWrapper

__all__ = [
    "ATTACKS",
    "DATA_KINDS",
    "DEFENSE_KINDS",
    "FORMAT_VERSION",
    "NON_RESULT_SETTINGS",
    "RESULT_SCHEMA",
    "TIMING_FIELDS",
    "ConfigError",
    "EvalConfig",
    "config_differences",
    "derive_seed",
    "load_results",
    "make_attack",
    "run_eval",
]

logger = logging.getLogger(__name__)


def _calibrate(
    cfg: EvalConfig, model: nn.Module, pool: _Pool, idx: Tensor
) -> dict[str, dict[str, Any]]:
    """ν for every ``input@drop`` / ``feature@drop`` defense (one search per kind, all drops)."""
    from randfeat.calibration import calibrate_nu

    out: dict[str, dict[str, Any]] = {}
    kinds = [k for k in cfg.defenses if k in ("input", "feature")]
    if not kinds:
        return out
    # digits: one small tensor pair; image files: streamed in batches, never all in memory
    data: Any = pool.images(idx) if pool.x is not None else _Batches(pool, idx, 256)
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
            name = f"{kind}@{t:g}"
            out[name] = {
                "kind": kind,
                "layers": list(r.layers),
                "target_drop": t,
                "nu": r.nu,
                "base_accuracy": r.base_accuracy,
                "accuracy": r.accuracy,
                "drop": r.drop,
                "n_images": r.n_images,
                "draws": r.draws,
                "stopped": r.stopped,
                "fast_path": r.fast_path,
                "seed": seed,
                "wall_time_s": r.wall_time_s,
            }
            logger.info(
                "  %s: ν = %.4g, accuracy %.4f -> %.4f (drop %.4f, target %g)",
                name,
                r.nu,
                r.base_accuracy,
                r.accuracy,
                r.drop,
                t,
            )
    return out


def _versions() -> dict[str, str]:
    """Installed versions, from package metadata (importing timm just for this costs seconds)."""
    from importlib import metadata

    import randfeat

    out = {"randfeat": randfeat.__version__, "torch": torch.__version__}
    try:
        out["timm"] = metadata.version("timm")
    except metadata.PackageNotFoundError:  # pragma: no cover - timm is a core dependency
        out["timm"] = "not installed"
    out["python"] = platform.python_version()
    return out


def _indices(cfg: EvalConfig, pool: _Pool) -> tuple[Tensor, Tensor]:
    """Attacked indices (class-balanced, in a seeded random order) and disjoint calibration ones."""
    from randfeat.eval.data import balanced_subset

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
    needs_cal = any(k in ("input", "feature") for k in cfg.defenses)
    if needs_cal and want > remaining.numel():
        raise ConfigError(
            f"--calib-images {want} exceeds the {remaining.numel()} images left after the "
            f"{n} attacked ones; lower --calib-images or --n-images."
        )
    g.manual_seed(derive_seed(cfg.seed, "calibration"))
    cal = remaining[torch.randperm(remaining.numel(), generator=g)[:want]].sort().values
    return attacked, cal if needs_cal else cal[:0]


def _prepare(
    cfg: EvalConfig, dist: _Dist, dev: torch.device
) -> tuple[dict[str, Any], nn.Module, _Pool]:
    """Rank 0: check the file, load, calibrate (or reuse the header's ν), write the header.

    Returns the plan broadcast to every rank (header, finished units), the model and the pool.
    """
    path = Path(cfg.out).expanduser()
    _check_out(path)
    new_cfg = json.loads(json.dumps(cfg.to_dict()))
    records, damaged = _check_existing(path, new_cfg)
    _check_data_path(cfg)
    model, pool, image_size = _load(cfg)
    attacked, cal = _indices(cfg, pool)
    if records:
        header = records[0]
        if header.get("attacked_indices") != attacked.tolist():
            raise ConfigError(
                f"{str(path)!r} attacked other images than this run would (the data set "
                "changed?); choose another --out."
            )
        if header.get("device") != _device_name(dev):
            logger.warning(
                "Resuming results written on %s on %s: rows stay valid measurements, but are not "
                "bit-identical to a run on one device.",
                header.get("device"),
                _device_name(dev),
            )
    else:
        header = _new_header(cfg, new_cfg, dist, dev, model, pool, image_size, attacked, cal)
    rows = records[1:]
    done, kept = _complete_units(header, cfg.batch_size, rows)
    if not records or damaged or len(kept) != len(rows):
        if damaged:
            logger.warning("%s: ignoring a damaged last line (a crash mid-write).", path)
        if len(kept) != len(rows):
            logger.warning(
                "%s: dropping %d row(s) of unfinished or duplicated chunks.",
                path,
                len(rows) - len(kept),
            )
        _rewrite(path, [header, *kept])
    if kept:
        logger.info("Resuming %s: %d row(s) already done.", path, len(kept))
    plan = {"header": header, "done": [list(k) for k in done], "image_size": image_size}
    return plan, model, pool


def _new_header(
    cfg: EvalConfig,
    new_cfg: dict[str, Any],
    dist: _Dist,
    dev: torch.device,
    model: nn.Module,
    pool: _Pool,
    image_size: int | None,
    attacked: Tensor,
    cal: Tensor,
) -> dict[str, Any]:
    """Check the model against the data, calibrate, and describe the run."""
    model.to(dev)
    x0, _ = pool.images(attacked[:1])
    with torch.no_grad():
        classes = int(model(x0.to(dev)).shape[-1])
    if int(pool.labels.max()) >= classes:
        raise ConfigError(
            f"--data {cfg.data!r} has labels up to {int(pool.labels.max())}, but model "
            f"{cfg.model!r} has {classes} outputs; pass --num-classes or a matching --checkpoint."
        )
    if "feature" in cfg.defenses:
        from randfeat.layers import resolve_layers

        try:
            resolve_layers(model, list(cfg.layers))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"Bad --layers {','.join(cfg.layers)!r}: {err}") from err
    calibration = _calibrate(cfg, model, pool, cal)
    n_chunks = math.ceil(attacked.numel() / cfg.batch_size)
    n_rows = attacked.numel() * len(cfg.defense_names()) * (1 + len(cfg.attacks) * len(cfg.budgets))
    return {
        "type": "header",
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": new_cfg,
        "settings_not_compared": sorted(NON_RESULT_SETTINGS),
        "versions": _versions(),
        "device": _device_name(dev),
        "world_size": dist.world,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "eps": {"linf": cfg.eps, "l2": cfg.eps_l2, "source": cfg.eps_source},
        "data": {
            "name": pool.name,
            "path": pool.path,
            "pool_size": int(pool.labels.numel()),
            "classes": int(pool.labels.unique().numel()),
            "image_shape": list(x0.shape[1:]),
        },
        "model": {
            "name": cfg.model,
            "parameters": sum(p.numel() for p in model.parameters()),
            "outputs": classes,
            "image_size": image_size,
        },
        "defenses": cfg.defense_names(),
        "attacks": {
            a: {"norm": atk.norm, "eps": atk.eps, "repr": repr(atk)}
            for a, atk in _attacks(cfg).items()
        },
        "calibration": calibration,
        "attacked_indices": attacked.tolist(),
        "calibration_indices": cal.tolist(),
        "n_attacked": int(attacked.numel()),
        "n_calibration": int(cal.numel()),
        "n_chunks": n_chunks,
        "rows_expected": n_rows,
    }


def run_eval(cfg: EvalConfig) -> Path:
    """Run (or resume) the evaluation ``cfg`` and return the result file's path.

    Works alone or under ``torchrun`` (one process per rank, the same arguments everywhere).

    Raises:
        ConfigError: bad names, paths, data, a mismatching result file, or a failed calibration.
    """
    dist, dev = _init_dist(cfg.device)
    try:
        return _run(cfg, dist, dev)
    finally:
        if dist.active:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def _run(cfg: EvalConfig, dist: _Dist, dev: torch.device) -> Path:
    t_start = time.perf_counter()
    path = Path(cfg.out).expanduser()
    model: nn.Module | None = None
    pool: _Pool | None = None
    plan: dict[str, Any] = {}
    if dist.rank == 0:
        note = "; the paper's 0.05 / 5 are for 224×224 images" if "digits" in cfg.eps_source else ""
        logger.info("ε: ℓ∞ %g, ℓ2 %g (%s%s).", cfg.eps, cfg.eps_l2, cfg.eps_source, note)
        try:
            plan, model, pool = _prepare(cfg, dist, dev)
        except ConfigError as err:
            dist.broadcast({"error": str(err)})  # release the other ranks before failing
            raise
    plan = dist.broadcast(plan)
    if "error" in plan:
        raise ConfigError(plan["error"])
    header = plan["header"]
    if model is None or pool is None:
        model = _load_model(cfg)
        pool = _load_pool(cfg, plan["image_size"])
    model.to(dev)
    attacked = torch.tensor(header["attacked_indices"], dtype=torch.long)
    x, y = pool.images(attacked)
    ctx = _Context(cfg, dev, header, x, y)
    ctx.defended = _build_defenses(cfg, model, header["calibration"])
    ctx.attacks = _attacks(cfg)
    done = {tuple(k) for k in plan["done"]}
    units = _units(cfg, header["n_chunks"])
    todo = [u for u in units if u.key not in done]
    if dist.rank == 0:
        logger.info(
            "%d unit(s) of up to %d image(s) to run, %d done; %d rank(s), device %s.",
            len(todo),
            cfg.batch_size,
            len(units) - len(todo),
            dist.world,
            _device_name(dev),
        )
    show = dist.rank == 0 and not cfg.quiet and sys.stderr.isatty()
    progress = _Progress(len(attacked), show)
    for u in units:
        if u.key in done:  # bars and summaries count what is already in the file
            progress.skip(u, len(ctx.chunk(u.chunk)[2]))
    f = path.open("a", encoding="utf-8") if dist.rank == 0 else None
    try:
        for start in range(0, len(todo), dist.world):
            round_units = todo[start : start + dist.world]
            progress.begin(round_units)
            mine = round_units[dist.rank] if dist.rank < len(round_units) else None
            rows = _run_unit(ctx, mine) if mine is not None else []
            gathered = dist.gather(rows)
            if f is not None:
                for unit, unit_rows in zip(round_units, gathered, strict=False):
                    _fsync_write(f, _dumps(unit_rows))
                    progress.update(unit, unit_rows)
    finally:
        progress.close()
        if f is not None:
            f.close()
        for m in ctx.defended.values():
            if isinstance(m, RandomizedFeatureWrapper):
                m.unwrap()
    if dist.rank == 0:
        logger.info("Wrote %s in %.1f s.", path, time.perf_counter() - t_start)
    return path
