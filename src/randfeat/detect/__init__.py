"""Stateful detection of query-based black-box attacks: flag a query close to an earlier one.

An iterative black-box attack sends many queries close to one image; benign users rarely do.
A detector fingerprints every query, looks its fingerprint up among the queries stored before
it (every account's: one index), flags it when it is too similar to one of them, and stores it.

    >>> import torch
    >>> from randfeat.detect import DETECTORS, DEFAULT
    >>> det = DETECTORS[DEFAULT](seed=0)        # the key from OS entropy without a seed
    >>> x = torch.rand(4, 1, 28, 28)
    >>> v = det.observe(x, account="alice")     # x: [N, C, H, W] in [0, 1]
    >>> v.flagged.tolist(), det.counts("alice").queries
    ([False, False, False, False], 4)

- [DETECTORS][randfeat.detect.DETECTORS], [DEFAULT][randfeat.detect.DEFAULT]: the detectors
  by name; `blacklight` (Li et al., 2022) is the reference, `pooled-linf` ours.
- [Detector][randfeat.detect.base.Detector]: `observe`, `calibrate`, `threshold`, `counts`.
- [Verdict][randfeat.detect.verdict.Verdict]: what `observe` returns.
- [open_store][randfeat.detect.stores.open_store]: `memory`, `sqlite:PATH`,
  `redis://HOST:PORT/DB`.

This package needs torch alone; the Redis store needs the `redis` client (`pip install redis`),
imported only when a `redis://` store is opened. See `docs/detection.md`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from randfeat.detect.base import Detector as Detector
from randfeat.detect.base import DetectorOptions as DetectorOptions
from randfeat.detect.blacklight import Blacklight as Blacklight
from randfeat.detect.pooled import PooledLinf as PooledLinf
from randfeat.detect.stores import AccountCounts as AccountCounts
from randfeat.detect.stores import Store as Store
from randfeat.detect.stores import StoreMismatch as StoreMismatch
from randfeat.detect.stores import open_store as open_store
from randfeat.detect.verdict import Verdict as Verdict

__all__ = [
    "DEFAULT",
    "DETECTORS",
    "AccountCounts",
    "Blacklight",
    "Detector",
    "DetectorOptions",
    "PooledLinf",
    "Store",
    "StoreMismatch",
    "Verdict",
    "open_store",
]

DETECTORS: Mapping[str, type[Detector]] = MappingProxyType(
    {"blacklight": Blacklight, "pooled-linf": PooledLinf}
)
"""Every detector by name: `blacklight` (the reference) and `pooled-linf` (ours, the default).
Call one to build it: `DETECTORS["blacklight"](threshold=41, store="sqlite:/tmp/d.db")`."""

DEFAULT = "pooled-linf"
"""The name of the default detector in [DETECTORS][randfeat.detect.DETECTORS]."""
