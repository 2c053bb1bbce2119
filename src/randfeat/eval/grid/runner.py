"""The evaluation grid of the paper (§5, appendix D): [run_eval][randfeat.eval.grid.runner.run_eval].

Protocol (Nguyen et al., "Understanding the Robustness of Randomized Feature Defense Against
Query-Based Adversarial Attacks", ICLR 2024, §5): a class-balanced random subset of test images is
attacked under every (defense, attack, budget). The randomized defenses (`input` = RND, `feature`
= noise at `layers`, default the penultimate features) are compared at equal cost: their ν is
calibrated to each target drop in clean accuracy on held-out images. Success is decided by the
oracle's judging rule (a strict majority of `votes` forwards, appendix D.4), and every returned
point is judged afresh with `randfeat.eval.oracle.rejudge`.

`run_eval` runs (or resumes) one configuration, alone or under `torchrun`: rank 0 takes the
result file's lock and prepares the run ([randfeat.eval.grid.plan][]), broadcasts the plan, the
units left to do ([randfeat.eval.grid.units][]) are dealt round-robin to the ranks, and after
each round rank 0 gathers the rows and appends them ([randfeat.eval.results.file][]).

Randomness: every unit draws its attack seed and its defense-noise seed from `seed` and the unit
([derive_seed][randfeat.eval.grid.config.derive_seed]), so results do not depend on which rank
runs a unit, on how many ranks there are, or on what ran before. The attacked subset, its order
and the calibration subset are drawn the same way.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

from randfeat.eval.data.registry import Pool
from randfeat.eval.errors import ConfigError
from randfeat.eval.grid.config import EvalConfig
from randfeat.eval.grid.detection import build_detector
from randfeat.eval.grid.distributed import Dist, device_name, init_dist
from randfeat.eval.grid.plan import Plan, load_model, load_pool, prepare
from randfeat.eval.grid.progress import Progress
from randfeat.eval.grid.units import (
    UnitRunner,
    build_attacks,
    build_defenses,
    build_forwards,
    grid_units,
)
from randfeat.eval.oracle import Model
from randfeat.eval.results.file import ResultWriter
from randfeat.wrapper import RandomizedFeatureWrapper

__all__ = ["run_eval"]

logger = logging.getLogger(__name__)


def run_eval(cfg: EvalConfig) -> Path:
    """Run (or resume) the evaluation `cfg` and return the result file's path.

    Works alone or under `torchrun` (one process per rank, the same arguments everywhere).

    Raises:
        ConfigError: bad names, paths, data, a mismatching result file, or a failed calibration.
        ResultFileBusy: another run is writing the same result file.
    """
    dist, dev = init_dist(cfg.device)
    try:
        cfg.forward_options.check(dev)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    try:
        return _run(cfg, dist, dev)
    finally:
        if dist.active:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def _run(cfg: EvalConfig, dist: Dist, dev: torch.device) -> Path:
    t_start = time.perf_counter()
    writer = ResultWriter(cfg.out) if dist.rank == 0 else None
    try:
        plan, model, pool = _plan(cfg, dist, dev, writer)
        if isinstance(model, nn.Module):  # a served model (--target) stays where it is
            model.to(dev)
        header = plan.header
        attacked = torch.tensor(header.attacked_indices, dtype=torch.long)
        x, y = pool.images(attacked)
        runner = UnitRunner(cfg, dev, header.attacked_indices, x, y)
        runner.defended = build_defenses(cfg, model, header.calibration)
        runner.forwards = build_forwards(cfg, runner.defended, dev)
        runner.attacks = build_attacks(cfg)
        if header.detection is not None:
            runner.detection = header.detection
            runner.detector = build_detector(header.detection, pool)
        try:
            _run_units(cfg, dist, dev, runner, plan, writer)
        finally:
            for m in runner.defended.values():
                if isinstance(m, RandomizedFeatureWrapper):
                    m.unwrap()
    finally:
        if writer is not None:
            writer.close()
    path = Path(cfg.out).expanduser()
    if dist.rank == 0:
        logger.info("Wrote %s in %.1f s.", path, time.perf_counter() - t_start)
    return path


def _plan(
    cfg: EvalConfig, dist: Dist, dev: torch.device, writer: ResultWriter | None
) -> tuple[Plan, Model, Pool]:
    """Rank 0 prepares (under the file's lock) and broadcasts the plan; the others load."""
    plan: Plan | str | None = None
    model: Model | None = None
    pool: Pool | None = None
    if writer is not None:
        note = "; the paper's 0.05 / 5 are for 224×224 images" if "digits" in cfg.eps_source else ""
        logger.info("ε: ℓ∞ %g, ℓ2 %g (%s%s).", cfg.eps, cfg.eps_l2, cfg.eps_source, note)
        try:
            writer.open()
            plan, model, pool = prepare(cfg, dist, dev, writer)
        except ConfigError as err:
            dist.broadcast(str(err))  # release the other ranks before failing
            raise
    plan = dist.broadcast(plan)
    if not isinstance(plan, Plan):  # rank 0 failed and broadcast its message
        raise ConfigError(str(plan))
    if model is None or pool is None:
        model = load_model(cfg)
        pool = load_pool(cfg, plan.image_size)
    return plan, model, pool


def _run_units(
    cfg: EvalConfig,
    dist: Dist,
    dev: torch.device,
    runner: UnitRunner,
    plan: Plan,
    writer: ResultWriter | None,
) -> None:
    """Deal the units left to do round-robin to the ranks; rank 0 appends each round's rows."""
    units = grid_units(cfg, plan.header.n_chunks)
    todo = [u for u in units if u not in plan.done]
    if writer is not None:
        logger.info(
            "%d unit(s) of up to %d image(s) to run, %d done; %d rank(s), device %s.",
            len(todo),
            cfg.batch_size,
            len(units) - len(todo),
            dist.world,
            device_name(dev),
        )
    show = writer is not None and not cfg.quiet and sys.stderr.isatty()
    progress = Progress(plan.header.n_attacked, show)
    for u in units:
        if u in plan.done:  # bars and summaries count what is already in the file
            progress.skip(u, len(runner.chunk(u.chunk)[2]))
    try:
        for start in range(0, len(todo), dist.world):
            round_units = todo[start : start + dist.world]
            progress.begin(round_units)
            mine = round_units[dist.rank] if dist.rank < len(round_units) else None
            rows = runner.run(mine) if mine is not None else []
            gathered = dist.gather(rows)
            if writer is not None:
                for unit, unit_rows in zip(round_units, gathered, strict=False):
                    writer.append(unit_rows)
                    progress.update(unit, unit_rows)
    finally:
        progress.close()
