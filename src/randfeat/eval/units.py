"""Units of work of the evaluation grid: one chunk of images under one (defense, attack, budget).

Part of ``randfeat eval``, the protocol of Nguyen et al., "Understanding the Robustness of
Randomized Feature Defense Against Query-Based Adversarial Attacks", ICLR 2024 (§5). A unit is one
chunk of ``batch_size`` attacked images (chunk ``c`` holds
``attacked_indices[c * batch_size:(c + 1) * batch_size]``) under one (defense, attack, budget), or
under one defense for the clean rows; :func:`_run_unit` computes its rows (the fields of
:data:`randfeat.eval.results.RESULT_SCHEMA`). Each unit restarts the defense's noise stream and the
attack's generator from seeds of the unit alone (:func:`~randfeat.eval.config.derive_seed`), so its
rows do not depend on which rank runs it, on how many ranks there are, or on what ran before.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from randfeat.eval.attacks.base import Attack
from randfeat.eval.config import EvalConfig, derive_seed, make_attack
from randfeat.eval.oracle import distance, rejudge
from randfeat.wrapper import RandomizedFeatureWrapper


@dataclass(frozen=True)
class _Unit:
    kind: Literal["clean", "attack"]
    defense: str
    attack: str | None
    budget: int | None
    chunk: int

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.kind, self.defense, self.attack, self.budget, self.chunk)

    @property
    def group(self) -> tuple[Any, ...]:
        return (self.kind, self.defense, self.attack, self.budget)


def _units(cfg: EvalConfig, n_chunks: int) -> list[_Unit]:
    out: list[_Unit] = []
    for d in cfg.defense_names():
        out += [_Unit("clean", d, None, None, c) for c in range(n_chunks)]
        for a in cfg.attacks:
            for b in cfg.budgets:
                out += [_Unit("attack", d, a, b, c) for c in range(n_chunks)]
    return out


@dataclass
class _Context:
    cfg: EvalConfig
    device: torch.device
    header: dict[str, Any]
    x: Tensor  # [n_attacked, C, H, W] on the CPU
    y: Tensor
    defended: dict[str, nn.Module] = field(default_factory=dict)
    attacks: dict[str, Attack] = field(default_factory=dict)

    def chunk(self, c: int) -> tuple[Tensor, Tensor, list[int]]:
        bs = self.cfg.batch_size
        sl = slice(c * bs, (c + 1) * bs)
        images = self.header["attacked_indices"][sl]
        return self.x[sl].to(self.device), self.y[sl].to(self.device), images


def _reseed(model: nn.Module, seed: int) -> None:
    """Restart a randomized defense's noise stream (base and AAA are deterministic)."""
    if isinstance(model, RandomizedFeatureWrapper):
        model.manual_seed(seed)


def _run_unit(ctx: _Context, unit: _Unit) -> list[dict[str, Any]]:
    """One unit: the clean predictions or one attack on one chunk; its rows in chunk order.

    The defense's noise stream and the attack's generator restart from seeds of the unit alone.
    """
    cfg = ctx.cfg
    t0 = time.perf_counter()
    x, y, images = ctx.chunk(unit.chunk)
    model = ctx.defended[unit.defense]
    randomized = isinstance(model, RandomizedFeatureWrapper)
    parts = (unit.kind, unit.defense, unit.attack, unit.budget, unit.chunk)
    _reseed(model, derive_seed(cfg.seed, "noise", *parts))
    labels = y.tolist()
    if unit.kind == "clean":
        with torch.no_grad():
            if isinstance(model, RandomizedFeatureWrapper):
                pred = model.predict(x, votes=cfg.votes, batch_size=cfg.forward_batch)
            else:
                pred = torch.cat([model(c).argmax(dim=1) for c in x.split(cfg.forward_batch)])
        seconds = time.perf_counter() - t0
        return [
            {
                "type": "clean",
                "image": img,
                "label": lab,
                "defense": unit.defense,
                "pred": p,
                "correct": p == lab,
                "chunk": unit.chunk,
                "seconds": seconds,
            }
            for img, lab, p in zip(images, labels, pred.tolist(), strict=True)
        ]
    attack = ctx.attacks[str(unit.attack)]
    res = attack.run(
        model,
        x,
        y,
        budget=int(unit.budget or 0),
        votes=cfg.votes,
        seed=derive_seed(cfg.seed, "attack", *parts),
        batch_size=cfg.forward_batch,
    )
    # Deterministic defenses (base, AAA) need one forward: the fooling probability is 0 or 1.
    # rejudge repeats each image `forwards` times at once: pass it at most forward_batch rows.
    forwards = cfg.fresh_forwards if randomized else 1
    step = max(1, cfg.forward_batch // forwards)
    fresh = torch.cat(
        [
            rejudge(model, xa, ya, votes=cfg.votes, forwards=forwards, batch_size=cfg.forward_batch)
            for xa, ya in zip(res.x_adv.split(step), y.split(step), strict=True)
        ]
    )
    dist = distance(res.x_adv, x, attack.norm)
    seconds = time.perf_counter() - t0
    cols = zip(
        images,
        labels,
        res.success.tolist(),
        res.queries.tolist(),
        res.success_query.tolist(),
        res.verify_forwards.tolist(),
        fresh.tolist(),
        dist.tolist(),
        strict=True,
    )
    return [
        {
            "type": "attack",
            "image": img,
            "label": lab,
            "defense": unit.defense,
            "attack": unit.attack,
            "budget": unit.budget,
            "eps": attack.eps,
            "norm": attack.norm,
            "success": s,
            "queries": q,
            "success_query": sq,
            "verify_forwards": vf,
            "fresh": fr,
            "dist": di,
            "chunk": unit.chunk,
            "seconds": seconds,
        }
        for img, lab, s, q, sq, vf, fr, di in cols
    ]


def _attacks(cfg: EvalConfig) -> dict[str, Attack]:
    return {
        a: make_attack(a, float(cfg.eps or 0), float(cfg.eps_l2 or 0), cfg.eot_m)
        for a in cfg.attacks
    }


def _build_defenses(
    cfg: EvalConfig, model: nn.Module, calibration: Mapping[str, Mapping[str, Any]]
) -> dict[str, nn.Module]:
    from randfeat import wrap
    from randfeat.eval.defenses import AAA

    out: dict[str, nn.Module] = {}
    for name in cfg.defense_names():
        if name == "base":
            out[name] = model
        elif name == "aaa":
            out[name] = AAA(model)
        else:
            cal = calibration[name]
            # Several wrappers may hook the same model: each hook acts only in its own forward.
            out[name] = wrap(model, layers=cal["layers"], nu=float(cal["nu"]), seed=0)
    return out
