"""randfeat: randomized feature defense against query-based black-box attacks."""

from __future__ import annotations

__version__ = "0.1.0.dev0"
