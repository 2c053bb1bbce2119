"""Query-based black-box attacks. Each sees the model only through the oracle.

Score-based: [Square][randfeat.eval.attacks.square.Square], [NES][randfeat.eval.attacks.nes.NES],
[SignHunter][randfeat.eval.attacks.signhunter.SignHunter]; decision-based (labels only):
[RayS][randfeat.eval.attacks.rays.RayS], [SignFlip][randfeat.eval.attacks.signflip.SignFlip],
[HopSkipJump][randfeat.eval.attacks.hsja.HopSkipJump];
adaptive: [EOT][randfeat.eval.attacks.eot.EOT] (averages `m` forwards a query). The attacks by
their command-line names are in `randfeat.eval.ATTACKS`.
"""

from __future__ import annotations

from randfeat.eval.attacks.base import Attack as Attack
from randfeat.eval.attacks.base import OracleAttack as OracleAttack
from randfeat.eval.attacks.eot import EOT as EOT
from randfeat.eval.attacks.hsja import HopSkipJump as HopSkipJump
from randfeat.eval.attacks.nes import NES as NES
from randfeat.eval.attacks.rays import RayS as RayS
from randfeat.eval.attacks.signflip import SignFlip as SignFlip
from randfeat.eval.attacks.signhunter import SignHunter as SignHunter
from randfeat.eval.attacks.square import Square as Square

__all__ = [
    "EOT",
    "NES",
    "Attack",
    "HopSkipJump",
    "OracleAttack",
    "RayS",
    "SignFlip",
    "SignHunter",
    "Square",
]
