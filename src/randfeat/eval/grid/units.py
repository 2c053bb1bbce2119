"""Units of work of the evaluation grid: one chunk of images under one (defense, attack, budget).

Part of `randfeat eval`, the protocol of Nguyen et al., "Understanding the Robustness of
Randomized Feature Defense Against Query-Based Adversarial Attacks", ICLR 2024 (§5). A
[Unit][randfeat.eval.results.records.Unit] is one chunk of `batch_size` attacked images (chunk `c` holds
`attacked_indices[c * batch_size:(c + 1) * batch_size]`) under one (defense, attack, budget), or
under one defense for the clean rows; [UnitRunner.run][randfeat.eval.grid.units.UnitRunner.run]
computes its rows. Each unit restarts the defense's noise stream and the attack's generator from
seeds of the unit alone ([derive_seed][randfeat.eval.grid.config.derive_seed]), so its rows do not
depend on which rank runs it, on how many ranks there are, or on what ran before.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from randfeat.detect import Detector
from randfeat.eval.attacks.base import Attack
from randfeat.eval.attacks.registry import ATTACKS
from randfeat.eval.defenses import AAA
from randfeat.eval.forward import Forward, ForwardOptions
from randfeat.eval.grid.config import SERVED, EvalConfig, derive_seed
from randfeat.eval.grid.detection import attack_behind, attack_served
from randfeat.eval.oracle import Model, count_wrong, distance, rejudge
from randfeat.eval.remote import HTTPModel
from randfeat.eval.results.records import (
    AttackRow,
    CalibratedDefense,
    CleanRow,
    DetectionInfo,
    DetectionRow,
    Row,
    Unit,
)
from randfeat.wrapper import RandomizedFeatureWrapper, wrap

__all__ = ["UnitRunner", "build_attacks", "build_defenses", "build_forwards", "grid_units"]


def grid_units(cfg: EvalConfig, n_chunks: int) -> list[Unit]:
    """Every unit of the grid, in the order they run: per defense, its clean units, then every
    (attack, budget)."""
    out: list[Unit] = []
    for d in cfg.defense_names():
        out += [Unit("clean", d, None, None, c) for c in range(n_chunks)]
        for a in cfg.attacks:
            for b in cfg.budgets:
                out += [Unit("attack", d, a, b, c) for c in range(n_chunks)]
    return out


def build_attacks(cfg: EvalConfig) -> dict[str, Attack]:
    """The grid's attacks by name, built from `randfeat.eval.ATTACKS` at the configured radii."""
    out = {}
    for name in cfg.attacks:
        factory = ATTACKS[name]
        out[name] = factory(cfg.radius(factory.norm), eot_m=cfg.eot_m)
    return out


def build_defenses(
    cfg: EvalConfig, model: Model, calibration: Mapping[str, CalibratedDefense]
) -> dict[str, Model]:
    """The grid's defended models by name: `base` is `model`, `aaa` wraps it, and every
    randomized defense is a wrapper with its calibrated ν (several wrappers may hook one model:
    each hook acts only in its own forward). `served` (`--target`) is the served model itself."""
    out: dict[str, Model] = {}
    for name in cfg.defense_names():
        if name in ("base", SERVED):
            out[name] = model
        elif not isinstance(model, nn.Module):
            raise TypeError(f"The defense {name!r} needs a local model, not {model!r}.")
        elif name == "aaa":
            out[name] = AAA(model)
        elif name.startswith("keyed@"):  # the key from the run's seed: reproducible
            cal = calibration[name]
            key = hashlib.sha256(f"randfeat-eval/{cfg.seed}/noise-key/{name}".encode()).digest()
            out[name] = wrap(model, layers=list(cal.layers), nu=cal.nu, noise="keyed", key=key)
        else:
            cal = calibration[name]
            out[name] = wrap(model, layers=list(cal.layers), nu=cal.nu, seed=0)
    return out


def build_forwards(
    cfg: EvalConfig, defended: Mapping[str, Model], device: torch.device
) -> dict[str, Model]:
    """What the grid calls for each defense: its local models run with `cfg.forward_options`
    (precision, memory format, compilation; [Forward][randfeat.eval.forward.Forward]), built once
    per process. With the default options, and for a served model, the defense itself."""
    options = cfg.forward_options
    if options == ForwardOptions():
        return dict(defended)
    return {
        name: Forward(m, options, device) if isinstance(m, nn.Module) else m
        for name, m in defended.items()
    }


@dataclass
class UnitRunner:
    """What every unit of one run needs: the settings, the attacked images, models and attacks.

    Attributes:
        cfg: the settings.
        device: where the images and models live.
        images: the dataset indices of the attacked images, in chunk order (the header's
            `attacked_indices`).
        x: `[n_attacked, C, H, W]` attacked images, on the CPU, in chunk order.
        y: `[n_attacked]` their labels.
        defended: defense name → defended model (a wrapper's noise stream is reseeded here).
        forwards: defense name → what the oracle and the judging rule call: the defended model
            run with the forward options ([build_forwards][randfeat.eval.grid.units.build_forwards]);
            a defense missing here is called as it is.
        attacks: attack name → attack.
        detection: the detector's settings (`--detect`; `None`: no detection).
        detector: the run's detector with the benign history stored
            ([build_detector][randfeat.eval.grid.detection.build_detector]); each attack unit
            attacks behind a copy of it.
    """

    cfg: EvalConfig
    device: torch.device
    images: tuple[int, ...]
    x: Tensor
    y: Tensor
    defended: dict[str, Model] = field(default_factory=dict)
    forwards: dict[str, Model] = field(default_factory=dict)
    attacks: dict[str, Attack] = field(default_factory=dict)
    detection: DetectionInfo | None = None
    detector: Detector | None = None

    def chunk(self, c: int) -> tuple[Tensor, Tensor, list[int]]:
        """The images, labels and dataset indices of chunk `c`, on the device."""
        bs = self.cfg.batch_size
        sl = slice(c * bs, (c + 1) * bs)
        images = list(self.images[sl])
        return self.x[sl].to(self.device), self.y[sl].to(self.device), images

    def run(self, unit: Unit) -> list[Row]:
        """The rows of `unit`, in chunk order: the clean verdicts, or one attack's results.

        The defense's noise stream and the attack's generator restart from seeds of the unit
        alone (a served model's noise is the server's, unpredictable by design).
        """
        t0 = time.perf_counter()
        x, y, images = self.chunk(unit.chunk)
        model = self.defended[unit.defense]
        parts = (unit.kind, unit.defense, unit.attack, unit.budget, unit.chunk)
        if isinstance(model, RandomizedFeatureWrapper) and model.noise != "keyed":
            model.manual_seed(derive_seed(self.cfg.seed, "noise", *parts))  # keyed: no stream
        call = self.forwards.get(unit.defense, model)
        randomized = _randomized(model)
        if unit.kind == "clean":
            return self._clean(unit, call, randomized, x, y, images, t0)
        seed = derive_seed(self.cfg.seed, "attack", *parts)
        return self._attack(unit, call, randomized, x, y, images, seed, t0)

    def _clean(
        self,
        unit: Unit,
        model: Model,
        randomized: bool,
        x: Tensor,
        y: Tensor,
        images: list[int],
        t0: float,
    ) -> list[Row]:
        """The judging rule at the clean images; a deterministic defense needs one forward."""
        votes = self.cfg.votes if randomized else 1
        wrong = count_wrong(model, x, y, votes=votes, batch_size=self.cfg.forward_batch)
        seconds = time.perf_counter() - t0
        return [
            CleanRow(img, lab, unit.defense, votes, w, unit.chunk, seconds)
            for img, lab, w in zip(images, y.tolist(), wrong.tolist(), strict=True)
        ]

    def _attack(
        self,
        unit: Unit,
        model: Model,
        randomized: bool,
        x: Tensor,
        y: Tensor,
        images: list[int],
        seed: int,
        t0: float,
    ) -> list[Row]:
        """One attack on the chunk, each returned point judged afresh."""
        cfg = self.cfg
        attack = self.attacks[str(unit.attack)]
        budget = int(unit.budget or 0)
        detected: list[DetectionRow | None] = [None] * len(images)
        served_detecting = isinstance(model, HTTPModel) and model.info.detection
        if self.detection is not None and self.detector is not None:
            res, rows = attack_behind(
                attack,
                model,
                copy.deepcopy(self.detector),
                self.detection,
                x,
                y,
                images,
                budget=budget,
                votes=cfg.votes,
                seed=seed,
                batch_size=cfg.forward_batch,
            )
            detected = list(rows)
        elif served_detecting:
            res, rows = attack_served(
                attack,
                model,
                x,
                y,
                images,
                budget=budget,
                votes=cfg.votes,
                seed=seed,
                batch_size=cfg.forward_batch,
            )
            detected = list(rows)
        else:
            res = attack.run(
                model, x, y, budget=budget, votes=cfg.votes, seed=seed, batch_size=cfg.forward_batch
            )
        # Deterministic defenses (base, AAA) need one forward: the fooling probability is 0 or 1.
        # rejudge gathers the repeated rows one full forward batch at a time.
        forwards = cfg.fresh_forwards if randomized else 1
        if served_detecting:  # a detecting server refuses repeats: its one answer per point
            fresh = res.success.double()
        else:
            fresh = rejudge(
                model,
                res.x_adv,
                y,
                votes=cfg.votes,
                forwards=forwards,
                batch_size=cfg.forward_batch,
            )
        dist = distance(res.x_adv, x, attack.norm)
        seconds = time.perf_counter() - t0
        cols = zip(
            images,
            y.tolist(),
            res.success.tolist(),
            res.queries.tolist(),
            res.success_query.tolist(),
            res.verify_forwards.tolist(),
            fresh.tolist(),
            dist.tolist(),
            detected,
            strict=True,
        )
        return [
            AttackRow(
                image=img,
                label=lab,
                defense=unit.defense,
                attack=str(unit.attack),
                budget=budget,
                eps=attack.eps,
                norm=attack.norm,
                success=s,
                queries=q,
                success_query=sq,
                verify_forwards=vf,
                fresh=fr,
                dist=di,
                chunk=unit.chunk,
                seconds=seconds,
                detection=det,
            )
            for img, lab, s, q, sq, vf, fr, di, det in cols
        ]


def _randomized(model: Model) -> bool:
    """Whether each forward of `model` draws noise (a wrapper, or a defended served model)."""
    if isinstance(model, HTTPModel):
        return model.info.defended
    return isinstance(model, RandomizedFeatureWrapper)
