"""Query-based black-box attacks. Each sees the model only through the oracle."""

from __future__ import annotations

from randfeat.eval.attacks.base import Attack as Attack
from randfeat.eval.attacks.nes import NES as NES
from randfeat.eval.attacks.rays import RayS as RayS
from randfeat.eval.attacks.signflip import SignFlip as SignFlip
from randfeat.eval.attacks.square import Square as Square
from randfeat.eval.oracle import AttackResult as AttackResult

__all__ = ["NES", "Attack", "AttackResult", "RayS", "SignFlip", "Square"]
