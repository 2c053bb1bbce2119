"""Square Attack: score-based random search over square windows.

Andriushchenko, Croce, Flammarion and Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020. Written after the authors' code
(`max-andr/square-attack`, `attack.py`: `p_selection`, `pseudo_gaussian_pert_rectangles`,
`meta_pseudo_gaussian_pert`, `square_attack_linf`, `square_attack_l2`), with the window
placement vectorised over the batch; see `Square` for every deviation.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
from torch import Tensor

from randfeat.checks import check_probability
from randfeat.eval.attacks.base import OracleAttack, project
from randfeat.eval.oracle import Norm, Oracle
from randfeat.losses import margin_loss

__all__ = [
    "Square",
    "meta_pseudo_gaussian",
    "p_selection",
    "pseudo_gaussian_rectangle",
    "shifted_corner",
    "side_length",
]

logger = logging.getLogger(__name__)

_NOOP_TOL = 1e-7  # official: a window is a no-op when all c*s*s entries move by < 1e-7
_P_INIT = {"linf": 0.05, "l2": 0.1}  # paper D.3 and the official `--p` help text
# (upper end of the rescaled iteration k, divisor of p_init), official `p_selection`
_P_BANDS = (
    (10, 1),
    (50, 2),
    (200, 4),
    (500, 8),
    (1000, 16),
    (2000, 32),
    (4000, 64),
    (6000, 128),
    (8000, 256),
    (10000, 512),
)


def p_selection(p_init: float, it: int, n_iters: int) -> float:
    """The official piecewise-constant schedule of `p`, the fraction of pixels in a window.

    The iteration is first rescaled to a 10000-iteration run, `k = int(it / n_iters * 10000)`,
    then `p = p_init / 2^j` with breakpoints at `k` = 10, 50, 200, 500, 1000, 2000, 4000, 6000,
    8000 (`p_init / 512` up to `k = 10000`). As in the official `else` branch, `k > 10000`
    gives back `p_init` (our loop never gets there).

    Args:
        p_init: the initial fraction `p`.
        it: the iteration index, 0 for the first update after the initialisation query.
        n_iters: the number of queries of the run (the budget in queries).

    Returns:
        `p` for this iteration.
    """
    k = int(it / n_iters * 10000)
    for upper, div in _P_BANDS:
        if k <= upper:
            return p_init / div
    return p_init


def side_length(p: float, h: int, w: int, norm: Norm) -> int:
    """Side `s` of the square window for the fraction `p` of an `h x w` image.

    Official: `s = round(sqrt(p h w))`; ℓ∞ clamps it to `[1, h - 1]`; ℓ2 takes at least 3 and
    makes it odd. We clamp to `min(h, w) - 1` (at least 1) for both norms so that tiny or
    non-square images work; the official sizes are unchanged on square images of side >= 5
    (ℓ∞) or wherever the ℓ2 side fits.
    """
    s = round(math.sqrt(p * h * w))
    if norm == "linf":
        s = max(s, 1)
    else:
        s = max(s, 3)
        s += 1 - s % 2
    return max(min(s, min(h, w) - 1), 1)


def pseudo_gaussian_rectangle(a: int, b: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The official `pseudo_gaussian_pert_rectangles(a, b)`: a `[a, b]` bump of unit ℓ2 norm.

    Concentric square rings around the centre `(a // 2, b // 2)`: ring `r` adds
    `1 / (r + 1)^2` to every entry at Chebyshev distance `<= r` from the centre, for
    `r = 0 .. max(a // 2, b // 2)`; so an entry at distance `d` gets
    `sum_{r=d}^{R} 1/(r+1)^2`. Normalised over the whole array. Empty when `a` or `b` is 0.
    """
    n_rings = max(a // 2, b // 2) + 1
    rings = 1.0 / torch.arange(1, n_rings + 1, dtype=torch.float64).square()
    tail = rings.flip(0).cumsum(0).flip(0)  # tail[d] = sum_{r >= d} 1 / (r + 1)^2
    di = (torch.arange(a) - a // 2).abs().view(-1, 1)
    dj = (torch.arange(b) - b // 2).abs().view(1, -1)
    bump = tail[torch.maximum(di, dj)]
    if bump.numel() > 0:
        bump = bump / bump.square().sum().sqrt()
    return bump.to(dtype)


def meta_pseudo_gaussian(s: int, transpose: bool, dtype: torch.dtype = torch.float64) -> Tensor:
    """The official `meta_pseudo_gaussian_pert(s)`: `[s, s]`, unit ℓ2 norm.

    A positive bump on the top `s // 2` rows and a negative one on the bottom `s - s // 2` rows,
    normalised; transposed when `transpose` (the official code flips a fair coin).
    """
    top = pseudo_gaussian_rectangle(s // 2, s)
    bottom = -pseudo_gaussian_rectangle(s - s // 2, s)
    bump = torch.cat([top, bottom])
    bump = bump / bump.square().sum().sqrt()
    return (bump.T if transpose else bump).to(dtype)


@functools.lru_cache(maxsize=64)
def _bump_pair(s: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The ℓ2 update's bump and its transpose, `[2, s, s]` (read-only: shared between calls)."""
    bump = meta_pseudo_gaussian(s, False, dtype).to(device)
    return torch.stack([bump, bump.T])


@functools.lru_cache(maxsize=256)
def _bands(s: int, size: int, device: torch.device) -> Tensor:
    """`[size, size]` bool, row `t`: the positions `t <= r < t + s` (read-only, shared)."""
    r = torch.arange(size, device=device)
    rel = r.view(1, -1) - r.view(-1, 1)
    return (rel >= 0) & (rel < s)


def _window_masks(top: Tensor, left: Tensor, s: int, h: int, w: int) -> Tensor:
    """`[n, h, w]` bool: for sample `i` the `s x s` window at `(top[i], left[i])`."""
    in_rows = _bands(s, h, top.device)[top]  # [n, h]
    in_cols = _bands(s, w, left.device)[left]  # [n, w]
    return in_rows.unsqueeze(2) & in_cols.unsqueeze(1)


def _positions(n: int, s: int, h: int, w: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per-sample top-left corners, official `randint(0, h - s)` (upper end excluded)."""
    dev = gen.device
    top = torch.randint(0, max(h - s, 1), (n,), generator=gen, device=dev)
    left = torch.randint(0, max(w - s, 1), (n,), generator=gen, device=dev)
    return top, left


def _signs(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Uniform `±1` (int64) of `shape`."""
    return torch.randint(0, 2, shape, generator=gen, device=gen.device) * 2 - 1


def shifted_corner(x0: Tensor, shift: float) -> Tensor:
    """`clip(x0 + shift, 0, 1)` in `x0`'s dtype, within `|shift|` of `x0` in float64.

    Computed in float64 and rounded to the dtype; an entry that rounding pushed past `|shift|`
    moves one ulp back toward `x0` (rounding to nearest overshoots by at most half an ulp).
    """
    bound = (x0.double() + shift).clamp(0.0, 1.0).to(x0.dtype)
    over = (bound.double() - x0.double()).abs() > abs(shift)
    return torch.where(over, torch.nextafter(bound, x0), bound)


def _nonempty_subset(n: int, c: int, gen: torch.Generator) -> Tensor:
    """`[n, c]` bool: a uniform non-empty subset of `c` channels per row.

    Exact for `c <= 62`; beyond, subsets that miss the first 62 channels are never drawn (a
    bias below `2^-62`).
    """
    k = min(c, 62)
    r = torch.randint(1, 2**k, (n, 1), generator=gen, device=gen.device)
    bits = (r >> torch.arange(k, device=gen.device)) & 1 > 0
    if c > k:
        rest = _signs((n, c - k), gen) > 0
        bits = torch.cat([bits, rest], dim=1)
    return bits


def _l2_norm(t: Tensor) -> Tensor:
    """Per-sample ℓ2 norm, shaped `[n, 1, 1, 1]`."""
    return t.square().sum(dim=(1, 2, 3), keepdim=True).sqrt()


class Square(OracleAttack):
    r"""Square Attack (score-based): random search over square windows on the ε-sphere.

    Minimises the margin loss of Eq. (3), $\mathcal{L}(x) = f_y(x) - \max_{i \neq y} f_i(x)$,
    by random search. Each iteration proposes, for every sample not yet fooled, one candidate that
    changes a random `s x s` window (side from `side_length` of `p_selection`),
    queries it once, and keeps it only if its margin is strictly lower than the best so far.

    * ℓ∞: init with vertical stripes (each column of each channel `±ε`); an update paints the
      window with one random `±ε` colour per channel, resampled while the window would not change
      (official no-op check, `< 1e-7` on all `c s^2` entries).
    * ℓ2: init with a grid of pseudo-Gaussian bumps of side `h // 5` with random signs per sample
      and channel, rescaled to `||δ||_2 = ε`; an update moves mass from window 2 into window 1
      (bump with random sign per channel plus the normalised old window content, rescaled per
      channel to the available norm), zeroes window 2 and rescales `δ` to `||δ||_2 = ε`
      (official `square_attack_l2`). Points are then clipped to `[0, 1]`.

    Query accounting (the oracle counts): the init point is 1 query, then 1 query per active
    sample per iteration, at most `oracle.n_calls - 1` iterations, so never more than the budget
    (the official ℓ2 loop spends `n_iters + 1`). The schedule is rescaled to `oracle.n_calls`
    exactly as the official code rescales it to `n_iters`.

    Deviations from the official code, and why:

    * The official code first drops clean-misclassified images with an uncharged query. Here the
      oracle decides success: the first query is the init point, and a sample misclassified there
      succeeds (after the oracle's verification) at query 1.
    * A sample stays active until the oracle verifies its success, not until its stored margin
      is `<= 0`. Against a randomized model, the stored `margin_min` is the noisy margin of one
      forward at the current best; we keep the official rule and compare each candidate's noisy
      margin to that stored value (no re-evaluation of the best point), so a lucky low draw can
      make later improvements harder to accept.
    * Window positions are drawn per sample for both norms (the official ℓ2 code shares one pair
      of positions and one bump across the batch); the ℓ2 bump's random transpose is per sample.
    * The ℓ∞ no-op resampling draws from the same distribution as the official `while` loop
      (uniform over the colour vectors that change the window) in one vectorised step, without a
      loop: a no-op draw is the window's unique no-op colour vector `v*` (one colour per channel
      reproduces the window), and `v*` XOR a uniform non-empty channel subset is uniform over the
      others. (With `ε < 1e-7` every vector is a no-op; the official loop never ends there.)
    * Windows are clamped to the image for tiny images (see `side_length`), and the ℓ2 init
      grid uses `max(min(h, w) // 5, 1)` and crops tiles that cross the border.
    * Candidates are inside the ε-ball when checked in float64 despite rounding: ℓ∞ values
      `clip(x0 ± ε, 0, 1)` are computed in float64 and rounded toward `x0`; ℓ2 candidates go
      through `project`.

    Args:
        eps: radius ε of the threat ball (ℓ∞ or ℓ2), pixels in `[0, 1]`.
        norm: `"linf"` or `"l2"`.
        p_init: initial fraction of pixels per window; default 0.05 (ℓ∞) and 0.1 (ℓ2): paper D.3
            and the official `--p` help ("Linf standard: 0.05, L2 standard: 0.1"). Independent of
            ε, as in the official code.

    Raises:
        ValueError: `eps` not a finite float > 0, unknown `norm`, `p_init` not in `(0, 1]`.

    References:
        Andriushchenko, M., Croce, F., Flammarion, N., Hein, M. Square Attack: a query-efficient
        black-box adversarial attack via random search. ECCV 2020. Code:
        https://github.com/max-andr/square-attack
    """

    output = "scores"
    p_init: float

    def __init__(self, eps: float, norm: Norm = "linf", p_init: float | None = None) -> None:
        super().__init__(eps, norm)
        if p_init is None:
            p_init = _P_INIT[self.norm]
        p_init = check_probability(p_init, "p_init", allow_one=True)
        self.p_init = float(p_init)

    # ------------------------------------------------------------------ the loop
    def _attack(self, oracle: Oracle, generator: torch.Generator) -> Tensor:
        x0, y = oracle.x0, oracle.y
        if x0.ndim != 4:
            raise ValueError(
                f"Expected argument `x` to be images [N, C, H, W], but got shape {tuple(x0.shape)}."
            )
        n, _, h, w = x0.shape
        if self.norm == "linf":
            # Pixel values of a coordinate set to x0 ± ε (clipped to [0, 1], exact).
            x_plus, x_minus = shifted_corner(x0, self.eps), shifted_corner(x0, -self.eps)
            x_best = self._init_linf(x_plus, x_minus, generator)
        else:
            x_plus = x_minus = x0  # unused by the ℓ2 update
            x_best = self._init_l2(x0, generator)

        n_iters = oracle.n_calls
        margin_min = torch.full((n,), math.inf, device=x0.device)
        act = oracle.active(1)
        if not bool(act.any()):
            return x_best
        idx = act.nonzero().squeeze(1)
        xb, ya, xp, xm = x_best[idx], y[idx], x_plus[idx], x_minus[idx]
        seen = oracle.n_succeeded  # before the init query: its successes re-gather too
        mm = margin_loss(oracle.scores(xb, idx), ya)
        # The loop works on the active samples gathered once ("compacted"): x_best and margin_min
        # are written back, and the active samples gathered again, only when the oracle reports a
        # new success (every active sample spends one query per iteration, so the budget never
        # splits them).
        for i_iter in range(n_iters - 1):
            if oracle.n_succeeded != seen:
                x_best[idx], margin_min[idx] = xb, mm
                seen = oracle.n_succeeded
                act = oracle.active(1)
                if not bool(act.any()):
                    break
                idx = act.nonzero().squeeze(1)
                xb, mm, ya = x_best[idx], margin_min[idx], y[idx]
                xp, xm = x_plus[idx], x_minus[idx]
            s = side_length(p_selection(self.p_init, i_iter, n_iters), h, w, self.norm)
            if self.norm == "linf":
                cand = self._candidate_linf(xb, xp, xm, s, generator)
            else:
                cand = self._candidate_l2(xp, xb, s, generator)  # ℓ2: x_plus is x0
            loss = margin_loss(oracle.scores(cand, idx), ya)
            improved = loss < mm  # strict, as in the official code
            mm = torch.where(improved, loss, mm)
            xb = torch.where(improved.view(-1, 1, 1, 1), cand, xb)
        x_best[idx], margin_min[idx] = xb, mm
        logger.debug("Square(%s): %d of %d samples fooled", self.norm, int(oracle.success.sum()), n)
        return x_best

    # ------------------------------------------------------------------ ℓ∞
    @staticmethod
    def _init_linf(x_plus: Tensor, x_minus: Tensor, gen: torch.Generator) -> Tensor:
        """Vertical stripes: one `±ε` per (sample, channel, column), clipped to `[0, 1]`."""
        n, c, _, w = x_plus.shape
        up = _signs((n, c, 1, w), gen) > 0
        return torch.where(up, x_plus, x_minus)

    @staticmethod
    def _candidate_linf(
        x_best: Tensor, x_plus: Tensor, x_minus: Tensor, s: int, gen: torch.Generator
    ) -> Tensor:
        """Paint one `s x s` window per sample with a random `±ε` colour per channel.

        A colour vector that would leave the window unchanged (all `c s^2` entries within
        `1e-7`, official test) is replaced by a uniform draw among the other `2^c - 1`: the
        official rejection loop's distribution, for all samples at once and without a loop.
        """
        n, c, h, w = x_best.shape
        top, left = _positions(n, s, h, w, gen)
        window = _window_masks(top, left, s, h, w).unsqueeze(1)  # [n, 1, h, w]
        # same_plus[i, k]: painting channel k of sample i's window with +ε changes nothing.
        same_plus = (((x_plus - x_best).abs() < _NOOP_TOL) | ~window).flatten(2).all(dim=2)
        same_minus = (((x_minus - x_best).abs() < _NOOP_TOL) | ~window).flatten(2).all(dim=2)
        up = _signs((n, c), gen) > 0
        noop = torch.where(up, same_plus, same_minus).all(dim=1, keepdim=True)  # [n, 1]
        up = up ^ (noop & _nonempty_subset(n, c, gen))
        up = up.view(n, c, 1, 1)
        return torch.where(window, torch.where(up, x_plus, x_minus), x_best)

    # ------------------------------------------------------------------ ℓ2
    def _init_l2(self, x0: Tensor, gen: torch.Generator) -> Tensor:
        """Grid of pseudo-Gaussian bumps (side `h // 5`), random sign per sample/channel/tile."""
        n, c, h, w = x0.shape
        wd = torch.promote_types(x0.dtype, torch.float32)
        s = max(min(h, w) // 5, 1)
        off_h, off_w = max((h - 5 * s) // 2, 0), max((w - 5 * s) // 2, 0)
        corners = [
            (off_h + a * s, off_w + b * s)
            for a in range(h // s)
            for b in range(w // s)
            if off_h + a * s < h and off_w + b * s < w
        ]
        # One bump per tile, shared by the batch (official); a fair coin transposes each.
        flips = (
            torch.randint(0, 2, (len(corners),), generator=gen, device=gen.device) > 0
        ).tolist()
        pattern = torch.zeros(h, w, dtype=torch.float64)
        tile = torch.zeros(h, w, dtype=torch.long)
        for k, ((r, q), flip) in enumerate(zip(corners, flips, strict=True)):
            bump = meta_pseudo_gaussian(s, flip)
            rh, qw = min(s, h - r), min(s, w - q)
            pattern[r : r + rh, q : q + qw] = bump[:rh, :qw]
            tile[r : r + rh, q : q + qw] = k
        signs = _signs((n, c, len(corners)), gen).to(wd)
        tile = tile.to(x0.device)
        delta = pattern.to(device=x0.device, dtype=wd) * signs[:, :, tile]  # [n, c, h, w]
        delta = delta / _l2_norm(delta) * self.eps
        x_new = (x0.to(wd) + delta).clamp(0.0, 1.0).to(x0.dtype)
        return project(x_new, x0, self.eps, "l2")

    def _candidate_l2(self, x0: Tensor, x_best: Tensor, s: int, gen: torch.Generator) -> Tensor:
        """Official `square_attack_l2` update with per-sample windows, vectorised."""
        n, c, h, w = x0.shape
        wd = torch.promote_types(x0.dtype, torch.float32)
        tiny = torch.finfo(wd).tiny
        x0w = x0.to(wd)
        delta = x_best.to(wd) - x0w
        top, left = _positions(n, s, h, w, gen)
        top2, left2 = _positions(n, s, h, w, gen)
        win1 = _window_masks(top, left, s, h, w).unsqueeze(1)  # [n, 1, h, w]
        win12 = win1 | _window_masks(top2, left2, s, h, w).unsqueeze(1)

        # The bump placed in window 1 of each sample: gather by local window coordinates.
        bumps = _bump_pair(s, wd, x0.device)  # [2, s, s], cached: s changes rarely
        flip = torch.randint(0, 2, (n,), generator=gen, device=gen.device).to(x0.device)
        li = (torch.arange(h, device=x0.device).view(1, h) - top.view(-1, 1)).clamp(0, s - 1)
        lj = (torch.arange(w, device=x0.device).view(1, w) - left.view(-1, 1)).clamp(0, s - 1)
        placed = bumps[flip.view(-1, 1, 1), li.unsqueeze(2), lj.unsqueeze(1)].unsqueeze(1)
        placed = placed * win1 * _signs((n, c, 1, 1), gen).to(wd)  # [n, c, h, w]

        norm_win1 = (delta * win1).square().sum(dim=(2, 3), keepdim=True).sqrt()  # per channel
        norm_img = _l2_norm(delta)
        norm_win12 = (delta * win12).square().sum(dim=(2, 3), keepdim=True).sqrt()
        new = placed + delta * win1 / (1e-10 + norm_win1)
        avail = ((self.eps**2 - norm_img.square()).clamp_min(0.0) / c + norm_win12.square()).sqrt()
        new = new / new.square().sum(dim=(2, 3), keepdim=True).sqrt().clamp_min(tiny) * avail
        # Window 2 set to 0, then window 1 written (window 1 wins where they overlap).
        delta = torch.where(win12, new, delta)
        delta = delta / _l2_norm(delta).clamp_min(tiny) * self.eps
        x_new = (x0w + delta).clamp(0.0, 1.0).to(x0.dtype)
        return project(x_new, x0, self.eps, "l2")
