"""RayS: hard-label ray search (Chen & Gu, KDD 2020), ℓ∞ only.

RayS recasts the hard-label attack as a discrete search over ray directions. For a sign vector
`s ∈ {±1}^D` (`D = C·H·W`, flattened in NCHW order as the official code does) and the unit ray
`u = s / ||s||_2 = s / sqrt(D)`, the decision-boundary radius along `s` is

$$
g(s) = \\min \\{ r \\ge 0 : \\arg\\max_k f_k(\\mathrm{clip}_{[0,1]}(x_0 + r u)) \\ne y \\},
$$

measured as an ℓ2 length along the ray, so the ℓ∞ size of the perturbation is `r / sqrt(D)`
before clipping. RayS minimises `g` by hierarchical block sign flips: at stage `k` the vector is
cut into `2^k` contiguous blocks, each block of the current best `s` is flipped in turn, and a
flip is kept when it shortens the boundary radius. Each candidate `s'` costs

1. a *fast check*: one query at `clip(x_0 + r_best u')`; if it is not adversarial, `s'` cannot
   beat the current best radius `r_best` and is dropped;
2. otherwise a *binary search* for `g(s')` on `[0, min(r_best, sqrt(D))]`, one query per step,
   until the bracket is at most `tol` (ray length) wide; the upper end becomes the new `r_best`.

The attack succeeds when `r_best / sqrt(D) <= ε`. Here the oracle decides success: it verifies any
queried point inside the ε-ball that the model misclassifies, and the attack stops querying a sample
as soon as the oracle reports success (early stopping as in the official `RayS_Single.py` and
BlackboxBench), or when the sample's budget is spent.

Vectorisation: every sample runs its own state machine (its own block counter, and either "next fast
check" or "inside a binary search" with its own bracket); one step of `RayS._attack` asks every
active sample for exactly one query, so samples at different stages share each model call.

References:
    Jinghui Chen and Quanquan Gu. "RayS: A Ray Searching Method for Hard-label Adversarial Attack."
    KDD 2020. Official code: `uclaml/RayS` (`RayS.py`, `RayS_Single.py`).
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar, Literal

import torch
from torch import Tensor

from randfeat.checks import check_positive_float
from randfeat.eval.attacks.base import FarthestInBall, OracleAttack
from randfeat.eval.oracle import Oracle, Output

__all__ = ["RayS"]

_log = logging.getLogger(__name__)


class RaySearch:
    """Per-sample RayS state machines for a batch, stepped together (one query per sample a step).

    The state of sample `n`: its best direction `sign[n]` (`s`, starting at all `+1`), the best
    boundary radius `r_best[n]` (ray length, `inf` until the first adversarial direction), its
    block counter `(level[n], ind[n])`, and, while `searching[n]`, the candidate block
    `[start[n], end[n])` that is flipped and the bisection bracket `[lo[n], hi[n]]`.

    Use: `points = search.propose(idx)`, query the model at `points` for the samples `idx`,
    then `search.update(idx, adversarial)`. Only samples in `idx` move.

    Args:
        x0: `[N, D]` clean images, flattened, in `[0, 1]`.
        tol: bisection tolerance on the ray length (official `tol = 1e-3`).
    """

    def __init__(self, x0: Tensor, tol: float = 1e-3) -> None:
        if x0.ndim != 2 or x0.shape[1] == 0:
            raise ValueError(f"Expected argument `x0` of shape [N, D], got {tuple(x0.shape)}.")
        self.tol = check_positive_float(tol, "tol")
        n, dim = x0.shape
        dev = x0.device
        self.x0 = x0
        self.dim = dim
        self.sqrt_dim = math.sqrt(dim)
        # 2**max_level >= D: from there on blocks are single coordinates (the official code keeps
        # raising block_level, which changes nothing once the block size is 1; capping avoids overflow).
        self.max_level = (dim - 1).bit_length()
        self.sign = torch.ones_like(x0)
        self.r_best = torch.full((n,), math.inf, dtype=torch.float64, device=dev)
        self.level = torch.zeros(n, dtype=torch.long, device=dev)
        self.ind = torch.zeros(n, dtype=torch.long, device=dev)
        self.searching = torch.zeros(n, dtype=torch.bool, device=dev)
        self.start = torch.zeros(n, dtype=torch.long, device=dev)
        self.end = torch.zeros(n, dtype=torch.long, device=dev)
        self.lo = torch.zeros(n, dtype=torch.float64, device=dev)
        self.hi = torch.zeros(n, dtype=torch.float64, device=dev)
        self._coords = torch.arange(dim, device=dev)

    # ------------------------------------------------------------------ geometry
    def _block(self, level: Tensor, ind: Tensor) -> tuple[Tensor, Tensor]:
        """Block `[start, end)` number `ind` of the `2^level` blocks of size `ceil(D / 2^level)`."""
        num = torch.ones_like(level) << level
        size = (self.dim + num - 1) // num
        start = ind * size
        return start, torch.clamp(start + size, max=self.dim)

    def candidate(self, idx: Tensor) -> Tensor:
        """`[n, D]`: `sign[idx]` with the block `[start, end)` of each row negated."""
        c = self._coords.view(1, -1)
        flip = (c >= self.start[idx].view(-1, 1)) & (c < self.end[idx].view(-1, 1))
        s = self.sign[idx]
        return torch.where(flip, -s, s)

    def point(self, idx: Tensor, sign: Tensor, radius: Tensor) -> Tensor:
        """`clip(x0 + r · s / sqrt(D))` for rows `idx`: `[n, D]`; `r = inf` saturates the image.

        `r` is capped at `sqrt(D)` (ℓ∞ size 1), which gives the same clipped point as any larger
        radius, `inf` included (the official `get_xadv(x, s, inf)`).
        """
        t = torch.clamp(radius, max=self.sqrt_dim) / self.sqrt_dim
        x0 = self.x0[idx]
        return (x0 + t.to(x0.dtype).view(-1, 1) * sign).clamp(0.0, 1.0)

    # ------------------------------------------------------------------ one step
    def propose(self, idx: Tensor) -> Tensor:
        """The next query of each sample in `idx`: `[n, D]` in `[0, 1]`.

        A sample that is not searching takes its next block (the fast check, at `r_best`); a
        searching sample queries the midpoint of its bracket.

        Args:
            idx: `[n]` distinct sample indices (int64), the samples that query in this step.
        """
        fresh = idx[~self.searching[idx]]
        if fresh.numel() > 0:
            self.start[fresh], self.end[fresh] = self._block(self.level[fresh], self.ind[fresh])
        srch = self.searching[idx]
        radius = torch.where(srch, (self.lo[idx] + self.hi[idx]) / 2, self.r_best[idx])
        return self.point(idx, self.candidate(idx), radius)

    def update(self, idx: Tensor, adversarial: Tensor) -> None:
        """Advance the samples `idx` by the answers to the points `propose` gave them.

        Args:
            idx: `[n]` the indices passed to the last `propose`.
            adversarial: `[n]` bool, whether each proposed point was misclassified.
        """
        adversarial = adversarial.to(device=idx.device, dtype=torch.bool)
        srch = self.searching[idx]
        # Fast checks: the block counter moves on whatever the answer (official order of blocks);
        # an adversarial answer opens a bisection on [0, min(r_best, sqrt(D))].
        fresh = idx[~srch]
        if fresh.numel() > 0:
            nxt = self.ind[fresh] + 1
            wrap = (nxt == (torch.ones_like(nxt) << self.level[fresh])) | (
                self.end[fresh] == self.dim
            )
            self.level[fresh] = torch.where(
                wrap, torch.clamp(self.level[fresh] + 1, max=self.max_level), self.level[fresh]
            )
            self.ind[fresh] = torch.where(wrap, torch.zeros_like(nxt), nxt)
            opened = fresh[adversarial[~srch]]
            self.searching[opened] = True
            self.lo[opened] = 0.0
            self.hi[opened] = torch.clamp(self.r_best[opened], max=self.sqrt_dim)
        # Bisection steps: the adversarial end of the bracket is always `hi`.
        busy = idx[srch]
        if busy.numel() > 0:
            mid = (self.lo[busy] + self.hi[busy]) / 2
            adv = adversarial[srch]
            self.hi[busy] = torch.where(adv, mid, self.hi[busy])
            self.lo[busy] = torch.where(adv, self.lo[busy], mid)
        # Finished searches: keep the candidate if it shortens the boundary radius.
        done = idx[self.searching[idx] & (self.hi[idx] - self.lo[idx] <= self.tol)]
        if done.numel() > 0:
            self._commit(done)
            self.searching[done] = False

    def _commit(self, rows: Tensor) -> None:
        better = rows[self.hi[rows] < self.r_best[rows]]
        if better.numel() > 0:
            self.sign[better] = self.candidate(better)
            self.r_best[better] = self.hi[better]

    def best_point(self) -> Tensor:
        """`[N, D]`: `clip(x0 + r_best · s / sqrt(D))`, counting an unfinished bisection's progress."""
        pending = self.searching.nonzero().squeeze(1)
        if pending.numel() > 0:
            # A bisection cut short by the budget: its `hi` is an adversarial radius too.
            self._commit(pending)
            self.searching[pending] = False
        every = torch.arange(self.x0.shape[0], device=self.x0.device)
        return self.point(every, self.sign, self.r_best)


class RayS(OracleAttack):
    """RayS (Chen & Gu, 2020): decision-based ℓ∞ attack by hierarchical ray search.

    Hyperparameters and their sources (official `uclaml/RayS` at `29bc1749`):

    * the search starts from `s = +1` everywhere (`torch.sign(torch.ones(shape))`) with
      `r_best = inf`; the first candidate flips the single block of level 0, i.e. tests `s = -1`;
    * blocks: level `k` has `2^k` blocks of `ceil(D / 2^k)` contiguous coordinates of the NCHW
      flattening; after the last block of a level the next level starts; no restart: once blocks are
      single coordinates, the search keeps cycling through them;
    * fast check: one query at `r_best` along the candidate (clipped to `[0, 1]`); for the very
      first adversarial direction (`r_best = inf`) it is the saturated image, and the bisection
      runs on `[0, sqrt(D)]` (batched `RayS.py`: `d_end = min(d_t, ||s||_2)`);
    * bisection until `d_end - d_start <= tol`, `tol = 1e-3` in ray length
      (`binary_search(..., tol=1e-3)`); the upper end is kept if it beats `r_best`;
    * `ε` has no influence on the search itself (it only decides success); the official defaults
      are ε = 0.05 (ImageNet), 0.031 (CIFAR-10), 0.3 (MNIST) and 10000 queries.

    Query accounting: one query per model call per sample, the fast check and each bisection step
    alike (counted by the oracle). The attack is deterministic: the seed is not used.

    Deviations from the official code, and why:

    * The single-image `RayS_Single.py` starts with a "linear search" that queries the saturated
      image up to 10 times (`x + k s` for `k = 1..10` are the same image after clipping) and then
      bisects on `[0, k sqrt(D)]`. We follow the batched `RayS.py`: one fast check at the
      saturated image and a bisection on `[0, sqrt(D)]`.
    * Samples stop as soon as the oracle has verified a success (the official batched code runs on
      to measure boundary distances); the oracle may detect it in the middle of a bisection, i.e.
      a few queries before the official check after the whole bisection.
    * The official batched code charges a bisection in full even past the query limit; here a
      sample stops the moment its budget is spent.
    * For an image it does not fool, RayS returns the point it queried inside the ε-ball that lies
      farthest from `x0` ([FarthestInBall][randfeat.eval.attacks.base.FarthestInBall]; `x0` when
      none was). The official code returns its best adversarial point, outside the ball; its
      projection onto the ball was never queried, so "verified" and "fresh" could disagree on a
      deterministic model.
    * Each sample keeps its own block counter, so the order of candidates per sample is the
      official one although samples reach them at different steps.
    * Untargeted only.

    Args:
        eps: ℓ∞ radius of the threat ball (only decides success).
        norm: must be `"linf"` (RayS is an ℓ∞ attack).
        tol: bisection tolerance on the ray length (ℓ2 length along the unit ray), default `1e-3`.

    Raises:
        ValueError / TypeError: on an invalid `eps`, `norm` or `tol`.

    References:
        Jinghui Chen and Quanquan Gu. "RayS: A Ray Searching Method for Hard-label Adversarial
        Attack." KDD 2020. https://github.com/uclaml/RayS
    """

    output: ClassVar[Output] = "labels"

    def __init__(self, eps: float, norm: Literal["linf"] = "linf", *, tol: float = 1e-3) -> None:
        if norm != "linf":
            raise ValueError(
                f"Expected argument `norm` to be 'linf' (RayS is an ℓ∞ attack), but got {norm!r}."
            )
        super().__init__(eps, norm)
        self.tol = check_positive_float(tol, "tol")

    def _attack(self, oracle: Oracle, generator: torch.Generator) -> Tensor:
        """Step all samples' ray searches together until each has succeeded or spent its budget."""
        del generator  # RayS is deterministic
        x0 = oracle.x0
        shape = x0.shape
        search = RaySearch(x0.flatten(1), self.tol)
        seen = FarthestInBall(x0, self.eps, "linf")
        steps = 0
        while True:
            active = oracle.active(1)
            if not bool(active.any()):
                break
            idx = active.nonzero().squeeze(1)
            points = search.propose(idx)
            labels = seen.labels(oracle, points.view(-1, *shape[1:]), idx)
            search.update(idx, labels != oracle.y[idx])
            steps += 1
        if _log.isEnabledFor(logging.DEBUG):
            linf = (search.r_best / search.sqrt_dim).clamp(max=1.0)
            _log.debug("RayS: %d steps, mean best l-inf radius %.4f", steps, float(linf.mean()))
        return seen.best  # queried in the ball; the oracle returns the fooling point if any
