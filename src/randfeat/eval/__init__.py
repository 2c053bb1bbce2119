"""Evaluation: the oracle, black-box attacks, baseline defenses, data and the protocol."""

from __future__ import annotations
