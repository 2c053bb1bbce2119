"""Query detection in the grid (`randfeat eval --detect`): the detector, its benign traffic, and
the attacks run behind it.

A stateful detector ([randfeat.detect][]) sits in front of every defense of the run, in
process, with the semantics of a detecting server (`randfeat serve --detect`;
[Guarded][randfeat.eval.guarded.Guarded]):

1. **Benign traffic.** The pool's images that are not attacked are split once per run (seeded):
   one in five (at most 1,000) builds the benign workloads ([randfeat.eval.workloads][]), the
   rest (at most 10,000) is the *history*: the threshold is calibrated on it
   (`Detector.calibrate`, to `--detect-fpr`), and every attack meets a detector that has already
   stored it, as a server has stored its users' earlier queries. A flag whose closest earlier
   query is a history image is counted apart from a flag caused by the attacker's own queries.
2. **False positives.** Each workload is streamed through its own copy of the preloaded
   detector: its queries, flags and first flag go to the header
   ([DetectionInfo][randfeat.eval.results.records.DetectionInfo]).
3. **Attacks.** Each attacked image is attacked on its own, under API keys of its own
   (`attacker-<image>`, or `--accounts` of them: sybil), against one detector per unit (a
   copy of the preloaded one, so a unit's rows do not depend on what ran before). Its queries
   are observed, flagged, refused (`reject`, `ban`) or answered (`log`); a plain attack ends at
   its first refusal, an adaptive one reacts. The D.4 verification and the fresh judging are
   the evaluator's forwards and bypass the detector ([uncharged][randfeat.eval.oracle.uncharged]).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from randfeat.detect import DETECTORS, Detector
from randfeat.eval.attacks.base import Attack
from randfeat.eval.data.registry import Pool
from randfeat.eval.errors import ConfigError, QueryRefused
from randfeat.eval.grid.config import EvalConfig, derive_seed
from randfeat.eval.guarded import ON_DETECT, Guarded, OnDetect
from randfeat.eval.oracle import Model
from randfeat.eval.outcome import AttackResult
from randfeat.eval.results.records import DetectionInfo, DetectionRow, WorkloadRate
from randfeat.eval.workloads import WORKLOADS, benign_stream

__all__ = [
    "HISTORY_CAP",
    "WORKLOAD_CAP",
    "Refusals",
    "attack_behind",
    "attack_served",
    "benign_split",
    "build_detector",
    "detection_info",
]

HISTORY_CAP = 10_000
"""The most benign images the detector is calibrated on and has stored before an attack."""
WORKLOAD_CAP = 1_000
"""The most images the benign workloads are built from (one in five of the pool's rest)."""
_BATCH = 256
BENIGN = "benign"
"""The account and tag of the benign history."""


def benign_split(cfg: EvalConfig, n_pool: int, attacked: Tensor) -> tuple[Tensor, Tensor]:
    """The history and the workload images: dataset indices, sorted, disjoint from each other
    and from `attacked`."""
    rest = torch.ones(n_pool, dtype=torch.bool)
    rest[attacked] = False
    idx = rest.nonzero().squeeze(1)
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "detect-benign"))
    idx = idx[torch.randperm(idx.numel(), generator=g)]
    n_work = min(WORKLOAD_CAP, idx.numel() // 5)
    return idx[n_work:][:HISTORY_CAP].sort().values, idx[:n_work].sort().values


def _batches(pool: Pool, idx: Tensor) -> Iterator[Tensor]:
    for x, _ in pool.batches(idx, _BATCH):
        yield x


def build_detector(info: DetectionInfo, pool: Pool) -> Detector:
    """The run's detector (its key from the run's seed, its calibrated threshold), with the
    benign history stored under the account and tag `benign`."""
    det = DETECTORS[info.name](seed=info.seed, threshold=info.threshold)
    for x in _batches(pool, torch.tensor(info.history_indices, dtype=torch.long)):
        det.observe(x, BENIGN, tag=BENIGN)
    return det


def detection_info(cfg: EvalConfig, pool: Pool, attacked: Tensor) -> DetectionInfo:
    """Calibrate the detector on the benign history and measure every workload's false
    positives against a detector that stored the history.

    Raises:
        ConfigError: the pool leaves too few history images for `--detect-fpr`.
    """
    name = str(cfg.detect)
    history, work = benign_split(cfg, int(pool.labels.numel()), attacked)
    need = math.ceil(1 / cfg.detect_fpr - 1e-9)
    if history.numel() < need:
        raise ConfigError(
            f"--detect-fpr {cfg.detect_fpr:g} needs at least 1 / fpr = {need} benign images to "
            f"calibrate the detector on, but the pool leaves {history.numel()} (after the "
            f"{attacked.numel()} attacked images and {work.numel()} for the workloads). Raise "
            "--detect-fpr, or lower --n-images."
        )
    seed = derive_seed(cfg.seed, "detector")
    det = DETECTORS[name](seed=seed)
    threshold = det.calibrate(list(_batches(pool, history)), cfg.detect_fpr)
    info = DetectionInfo(
        name=name,
        repr=repr(det),
        threshold=threshold,
        target_fpr=cfg.detect_fpr,
        on_detect=_on_detect(cfg),
        ban_after=cfg.ban_after,
        accounts=cfg.accounts,
        seed=seed,
        history_indices=tuple(history.tolist()),
        workload_indices=tuple(work.tolist()),
        workloads={},
    )
    template = build_detector(info, pool)
    x_work, _ = pool.images(work)
    rates = {}
    for w in WORKLOADS:
        stream = benign_stream(w, x_work, seed=derive_seed(cfg.seed, "workload", w))
        rates[w] = _stream_rate(copy.deepcopy(template), stream)
    return dataclasses.replace(info, workloads=rates)


def _on_detect(cfg: EvalConfig) -> OnDetect:
    for action in ON_DETECT:  # validated by EvalConfig; this narrows the type
        if cfg.on_detect == action:
            return action
    raise ConfigError(f"Unknown on_detect action {cfg.on_detect!r}; valid: {', '.join(ON_DETECT)}.")


def _stream_rate(det: Detector, stream: Tensor) -> WorkloadRate:
    flags = torch.cat(
        [
            det.observe(stream[i : i + _BATCH], "workload").flagged.cpu()
            for i in range(0, stream.shape[0], _BATCH)
        ]
    )
    hit = flags.nonzero()
    first = int(hit[0, 0]) + 1 if hit.numel() else -1
    return WorkloadRate(queries=int(flags.numel()), flagged=int(flags.sum()), first_flag=first)


def attack_behind(
    attack: Attack,
    model: Model,
    detector: Detector,
    info: DetectionInfo,
    x: Tensor,
    y: Tensor,
    images: list[int],
    *,
    budget: int,
    votes: int,
    seed: int,
    batch_size: int,
) -> tuple[AttackResult, list[DetectionRow]]:
    """Attack each image of `x: [n, C, H, W]` on its own behind `detector` (a unit's copy of the
    preloaded one), under keys of its own; the results joined as one batch, in order, and what
    the detector saw of each."""
    guards = [
        Guarded(
            model,
            detector,
            on_detect=info.on_detect,
            ban_after=info.ban_after,
            account=f"attacker-{image}",
            accounts=info.accounts,
        )
        for image in images
    ]
    results = _each(attack, guards, x, y, images, budget, votes, seed, batch_size)
    rows = [
        DetectionRow(
            first_flag=s.first_flag,
            flagged=s.flagged,
            benign_flags=s.flags_by_source.get(BENIGN, 0),
            rejected=s.rejected,
            refused=res.refused,
        )
        for s, res in zip((g.stats for g in guards), results, strict=True)
    ]
    return _joined(results, budget, votes), rows


def _each(
    attack: Attack,
    models: Sequence[Model],
    x: Tensor,
    y: Tensor,
    images: list[int],
    budget: int,
    votes: int,
    seed: int,
    batch_size: int,
) -> list[AttackResult]:
    """Image `i` attacked alone through `models[i]`, its seed from the unit's and the image."""
    return [
        attack.run(
            m,
            x[i : i + 1],
            y[i : i + 1],
            budget=budget,
            votes=votes,
            seed=derive_seed(seed, image),
            batch_size=batch_size,
        )
        for i, (m, image) in enumerate(zip(models, images, strict=True))
    ]


class Refusals:
    """A detecting server as its client sees it: the model, counting the refused queries.

    Args:
        model: the served model ([HTTPModel][randfeat.eval.remote.HTTPModel]).

    Attributes:
        queries: rows sent (answered or refused).
        first: the query index (1-based) of the first refused row, `-1` if none.
        flagged: rows the server named as flagged.
        rejected: rows refused.
    """

    def __init__(self, model: Model) -> None:
        self.module = model  # `independent_votes` looks through it (keyed noise on the server)
        self.queries = self.flagged = self.rejected = 0
        self.first = -1

    def __call__(self, x: Tensor) -> Tensor:
        n = int(x.shape[0])
        try:
            out = self.module(x)
        except QueryRefused as err:
            answered = int(getattr(err, "answered", 0))
            named: tuple[int, ...] = tuple(getattr(err, "rows", ()))
            if self.first < 0:
                self.first = self.queries + (min(named) if named else answered) + 1
            self.flagged += len(named)
            self.rejected += n - answered
            self.queries += n
            raise
        self.queries += n
        return out


def attack_served(
    attack: Attack,
    model: Model,
    x: Tensor,
    y: Tensor,
    images: list[int],
    *,
    budget: int,
    votes: int,
    seed: int,
    batch_size: int,
) -> tuple[AttackResult, list[DetectionRow]]:
    """Attack each image on its own through a detecting server (`--target`), as
    [attack_behind][randfeat.eval.grid.detection.attack_behind] does in process: one image
    per request stream, so that a refusal ends only that image's search."""
    clients = [Refusals(model) for _ in images]
    results = _each(attack, clients, x, y, images, budget, votes, seed, batch_size)
    rows = [
        DetectionRow(
            first_flag=c.first,
            flagged=c.flagged,
            benign_flags=0,
            rejected=c.rejected,
            refused=res.refused,
            seen_by="client",
        )
        for c, res in zip(clients, results, strict=True)
    ]
    return _joined(results, budget, votes), rows


def _joined(results: list[AttackResult], budget: int, votes: int) -> AttackResult:
    return AttackResult(
        x_adv=torch.cat([r.x_adv for r in results]),
        success=torch.cat([r.success for r in results]),
        queries=torch.cat([r.queries for r in results]),
        success_query=torch.cat([r.success_query for r in results]),
        verify_forwards=torch.cat([r.verify_forwards for r in results]),
        budget=budget,
        votes=votes,
        refused=any(r.refused for r in results),
    )
