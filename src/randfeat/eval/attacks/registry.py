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

from randfeat.eval.attacks.adaptive import AdaptiveSquare
from randfeat.eval.attacks.base import Attack
from randfeat.eval.attacks.eot import EOT
from randfeat.eval.attacks.hsja import HopSkipJump
from randfeat.eval.attacks.nes import NES
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
    """

    name: str
    family: str
    norm: Norm
    output: Output
    build: Callable[[float], Attack]
    eot: bool = False

    def __call__(self, eps: float, *, eot_m: int = 5) -> Attack:
        """The attack at radius `eps`; an `eot-` attack averages `eot_m` forwards a query."""
        attack = self.build(eps)
        return EOT(attack, eot_m) if self.eot else attack

    def label(self, eot_m: int | None = None) -> str:
        """The table name: `Square ℓ∞`, `RayS`, `EOT-5 Square ℓ∞`."""
        text = self.family
        if self.name.removeprefix("eot-").count("-"):  # the norm is part of the name
            text += f" {_NORM_LABELS[self.norm]}"
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
)

ATTACKS: Mapping[str, AttackFactory] = MappingProxyType(
    {f.name: f for f in (*_BASE, *_EOT, *_ADAPTIVE)}
)
"""Every attack `randfeat eval --attacks` accepts, by name: `square-linf`, `square-l2`,
`nes-linf`, `nes-l2`, `signhunter-linf`, `signhunter-l2`, `rays`, `signflip`, `hsja-linf`,
`hsja-l2`, `eot-<name>` for each (the adaptive attack of section 4.5, `--eot-m` forwards a query),
and `adaptive-square-linf`, `adaptive-square-l2` (Feng et al.'s attacker against detection)."""
