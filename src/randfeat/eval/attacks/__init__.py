"""Query-based black-box attacks. Each sees the model only through the oracle.

Score-based: :class:`Square`, :class:`NES`, :class:`SignHunter`; decision-based (labels only):
:class:`RayS`, :class:`SignFlip`; adaptive: :class:`EOT` (averages ``m`` queries per evaluation).
"""

from __future__ import annotations

from randfeat.eval.attacks.base import Attack as Attack
from randfeat.eval.attacks.eot import EOT as EOT
from randfeat.eval.attacks.nes import NES as NES
from randfeat.eval.attacks.rays import RayS as RayS
from randfeat.eval.attacks.signflip import SignFlip as SignFlip
from randfeat.eval.attacks.signhunter import SignHunter as SignHunter
from randfeat.eval.attacks.square import Square as Square
from randfeat.eval.oracle import AttackResult as AttackResult

__all__ = ["EOT", "NES", "Attack", "AttackResult", "RayS", "SignFlip", "SignHunter", "Square"]
