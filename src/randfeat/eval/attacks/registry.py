"""The attacks `randfeat eval --attacks` accepts, by name: [ATTACKS][randfeat.eval.attacks.registry.ATTACKS].

The command line, the configuration, the report's column names, the documentation's table and
the tests all read this mapping. To add an attack, write its module in `randfeat/eval/attacks/`
and add one [AttackFactory][randfeat.eval.attacks.registry.AttackFactory] to `_BASE` below (its
`eot-` variant follows).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from randfeat.eval.attacks.adaptive import AdaptiveSquare
from randfeat.eval.attacks.adaptive_hsja import AdaptiveHSJA
from randfeat.eval.attacks.adaptive_nes import AdaptiveNES
from randfeat.eval.attacks.base import Attack
from randfeat.eval.attacks.eot import EOT
from randfeat.eval.attacks.hsja import HopSkipJump
from randfeat.eval.attacks.nes import NES
from randfeat.eval.attacks.persistent import JitterEOT, Resubmit
from randfeat.eval.attacks.rays import RayS
from randfeat.eval.attacks.signflip import SignFlip
from randfeat.eval.attacks.signhunter import SignHunter
from randfeat.eval.attacks.square import Square
from randfeat.eval.oracle import Norm, Output

__all__ = ["ATTACKS", "AttackFactory"]

_NORM_LABELS = {"linf": "ℓ∞", "l2": "ℓ2"}


@dataclass(frozen=True)
class AttackFactory:
    """How to build the attack called `name`: call it with the radius.

    Examples:
        >>> from randfeat.eval import ATTACKS
        >>> ATTACKS["square-l2"](1.5)
        Square(eps=1.5, norm='l2', p_init=0.1)
        >>> ATTACKS["eot-rays"](0.05, eot_m=5)
        EOT(RayS(eps=0.05, norm='linf', tol=0.001), m=5)

    Attributes:
        name: the command-line name (`square-linf`, `eot-rays`, ...).
        family: the attack's name in the paper's tables (`Square`, `RayS`, ...).
        norm: the norm of its ball: the grid gives it `--eps` (ℓ∞) or `--eps-l2` (ℓ2).
        output: what it needs from the model: `"scores"` or `"labels"`.
        build: the attack at a radius.
        eot: whether the attack is wrapped in [EOT][randfeat.eval.attacks.eot.EOT].
        wrapper: the persistent attacker wrapping it (`"jitter-eot"`:
            [JitterEOT][randfeat.eval.attacks.persistent.JitterEOT] with `eot_m` copies;
            `"resubmit"`: [Resubmit][randfeat.eval.attacks.persistent.Resubmit]), or None.
    """

    name: str
    family: str
    norm: Norm
    output: Output
    build: Callable[[float], Attack]
    eot: bool = False
    wrapper: Literal["jitter-eot", "resubmit"] | None = None

    def __call__(self, eps: float, *, eot_m: int = 5) -> Attack:
        """The attack at radius `eps`; an `eot-` attack averages `eot_m` forwards a query, a
        `jitter-eot-` attack `eot_m` jittered copies."""
        attack = self.build(eps)
        if self.wrapper == "jitter-eot":
            return JitterEOT(attack, eot_m)
        if self.wrapper == "resubmit":
            return Resubmit(attack)
        return EOT(attack, eot_m) if self.eot else attack

    def label(self, eot_m: int | None = None) -> str:
        """The table name: `Square ℓ∞`, `RayS`, `EOT-5 Square ℓ∞`, `Jitter-EOT-5 Square ℓ∞`,
        `Resubmit Square ℓ∞`."""
        text = self.family
        base = self.name.removeprefix(f"{self.wrapper}-") if self.wrapper else self.name
        if base.removeprefix("eot-").count("-"):  # the norm is part of the name
            text += f" {_NORM_LABELS[self.norm]}"
        if self.wrapper == "jitter-eot":
            text = f"Jitter-EOT-{eot_m} {text}" if eot_m else f"Jitter-EOT {text}"
        if self.wrapper == "resubmit":
            text = f"Resubmit {text}"
        if self.eot:
            text = f"EOT-{eot_m} {text}" if eot_m else f"EOT {text}"
        return text


_BASE = (
    AttackFactory("square-linf", "Square", "linf", "scores", lambda eps: Square(eps, "linf")),
    AttackFactory("square-l2", "Square", "l2", "scores", lambda eps: Square(eps, "l2")),
    AttackFactory("nes-linf", "NES", "linf", "scores", lambda eps: NES(eps, "linf")),
    AttackFactory("nes-l2", "NES", "l2", "scores", lambda eps: NES(eps, "l2")),
    AttackFactory(
        "signhunter-linf", "SignHunter", "linf", "scores", lambda eps: SignHunter(eps, "linf")
    ),
    AttackFactory("signhunter-l2", "SignHunter", "l2", "scores", lambda eps: SignHunter(eps, "l2")),
    AttackFactory("rays", "RayS", "linf", "labels", RayS),
    AttackFactory("signflip", "SignFlip", "linf", "labels", SignFlip),
    AttackFactory(
        "hsja-linf", "HopSkipJump", "linf", "labels", lambda eps: HopSkipJump(eps, "linf")
    ),
    AttackFactory("hsja-l2", "HopSkipJump", "l2", "labels", lambda eps: HopSkipJump(eps, "l2")),
)
_EOT = tuple(
    AttackFactory(f"eot-{f.name}", f.family, f.norm, f.output, f.build, eot=True) for f in _BASE
)

# The persistent attacker against randomized defenses (Lucas et al., arXiv 2302.13464, 2023).
_PERSISTENT = tuple(
    AttackFactory(f"{w}-{f.name}", f.family, f.norm, f.output, f.build, wrapper=w)
    for w in ("jitter-eot", "resubmit")
    for f in _BASE
)

# The adaptive attacker against stateful detection (Feng et al., CCS 2023): rejections as a signal.
_ADAPTIVE = (
    AttackFactory(
        "adaptive-square-linf",
        "Adaptive Square",
        "linf",
        "scores",
        lambda eps: AdaptiveSquare(eps, "linf"),
    ),
    AttackFactory(
        "adaptive-square-l2",
        "Adaptive Square",
        "l2",
        "scores",
        lambda eps: AdaptiveSquare(eps, "l2"),
    ),
    AttackFactory(
        "adaptive-nes-linf", "Adaptive NES", "linf", "scores", lambda eps: AdaptiveNES(eps, "linf")
    ),
    AttackFactory(
        "adaptive-nes-l2", "Adaptive NES", "l2", "scores", lambda eps: AdaptiveNES(eps, "l2")
    ),
    AttackFactory(
        "adaptive-hsja-linf",
        "Adaptive HopSkipJump",
        "linf",
        "labels",
        lambda eps: AdaptiveHSJA(eps, "linf"),
    ),
    AttackFactory(
        "adaptive-hsja-l2",
        "Adaptive HopSkipJump",
        "l2",
        "labels",
        lambda eps: AdaptiveHSJA(eps, "l2"),
    ),
)

ATTACKS: Mapping[str, AttackFactory] = MappingProxyType(
    {f.name: f for f in (*_BASE, *_EOT, *_ADAPTIVE, *_PERSISTENT)}
)
"""Every attack `randfeat eval --attacks` accepts, by name: `square-linf`, `square-l2`,
`nes-linf`, `nes-l2`, `signhunter-linf`, `signhunter-l2`, `rays`, `signflip`, `hsja-linf`,
`hsja-l2`, `eot-<name>` for each (the adaptive attack of section 4.5, `--eot-m` forwards a query),
and `adaptive-square-linf`, `adaptive-square-l2`, `adaptive-nes-linf`, `adaptive-nes-l2`,
`adaptive-hsja-linf`, `adaptive-hsja-l2` (Feng et al.'s attacker against detection),
and the persistent attackers of Lucas et al. (arXiv 2302.13464) for each base attack:
`jitter-eot-<name>` (every query sent as `--eot-m` jittered copies, averaged) and
`resubmit-<name>` (half the budget attacking, half resubmitting the final point)."""
