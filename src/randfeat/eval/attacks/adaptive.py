"""The adaptive Square of Feng et al.: the detector's rejection used as an oracle.

Feng, Hooda, Mangaokar, Fawaz, Jha and Prakash, "Stateful Defenses for Machine Learning Models Are
Not Yet Secure Against Black-box Attacks", CCS 2023 (OARS). Written after their code
(`nmangaokar/ccs_23_oars_stateful_attacks`, `attacks/adaptive/Square.py`:
`binary_search_num_squares`, `binary_search_min_square_size`, `add_squares`, the retry loop of
`attack_untargeted`, and the Square configurations under `configs/`). A stateful detector refuses
a query too close to an earlier one; the refusal tells the attacker which steps are too small.
The attacker (a) binary-searches, with real queries, the number of squares painted per step and
the minimum square side until few of its probes are refused, then (b) attacks with those
settings and resends a refused step with fresh randomness, up to 300 times.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor

from randfeat.checks import check_int, check_probability, expected
from randfeat.eval.attacks.adaptive_hsja import AdaptiveHSJA
from randfeat.eval.attacks.adaptive_nes import AdaptiveNES
from randfeat.eval.attacks.base import Attack, project
from randfeat.eval.attacks.hsja import HopSkipJump
from randfeat.eval.attacks.nes import NES
from randfeat.eval.attacks.square import Square, p_selection, shifted_corner, side_length
from randfeat.eval.attacks.stateful import Banned, Blinding, blind, check_blinding, is_banned
from randfeat.eval.errors import QueryRefused
from randfeat.eval.oracle import Norm, Oracle
from randfeat.losses import margin_loss

__all__ = ["ADAPTABLE", "AdaptiveSquare", "adaptive"]

logger = logging.getLogger(__name__)


class AdaptiveSquare(Square):
    r"""Square against a stateful detector, after Feng et al. (OARS, CCS 2023).

    Each image is attacked on its own, one image per model call (as in their code), so that a
    refusal costs exactly the refused query. For each image:

    1. the Square initialisation (vertical stripes, or the ℓ2 grid), queried; a refused start
       is redrawn;
    2. the number of squares $n_s$ painted per step: a binary search on $[n_{lo}, n_{hi}]$
       (`squares`, their CIFAR-10 default $[10, 100]$), `square_steps` halvings of
       `square_samples` probes each (10 and 5), each probe $n_s$ squares of the first side of
       Square's schedule painted on the start; the smallest $n_s$ tried whose probes were refused
       at a rate $\le$ `square_rate` (0) is kept;
    3. the minimum square side $s_{\min}$: the same search on $[1, \min(H, W)]$ (`min_size`;
       theirs $[1, 32]$ at 32×32) with `size_steps` (10) halvings of `size_samples` (10) probes
       painting $n_s$ squares of side $s_{\min}$, target rate `size_rate` (0.5);
    4. Square: each step paints $n_s$ squares of side $\max(s_t, s_{\min})$ ($s_t$ from
       [p_selection][randfeat.eval.attacks.square.p_selection]) on the best point and keeps
       the candidate if its margin is lower; a refused candidate is redrawn with fresh
       randomness, at most `max_attempts` (300) times in a row before the image is given up
       ("step movement failure").

    Every probe of the searches and every refused query is a real query, charged by the oracle
    (their code counts them too: its budget is on queries including cache hits); any answered
    query, probes included, can fool the model. A ban (`key_banned`) ends the whole attack.
    Without detection (no refusal) both searches end at their lower ends ($n_s = n_{lo}$,
    $s_{\min} = 1$), and the attack is Square painting $n_{lo}$ squares a step, with
    `square_steps · square_samples + size_steps · size_samples` (150) queries spent on the
    searches. `search=False` skips them ($n_s = 1$, $s_{\min} = 1$: Square with retries).

    Deviations from their code: the schedule of $s_t$ is Square's, rescaled to the budget
    (`oracle.n_calls`), where theirs is rescaled to `max_iter = 10000` whatever the budget; a
    step retried counts as a step of the schedule, as in theirs (the loop index advances); the
    ℓ2 variant (theirs is ℓ∞ only) paints its $n_s$ squares with Square's ℓ2 update applied
    $n_s$ times; the point returned for an image not fooled is the best answered point (theirs
    returns the clean image). With `blind`, each query is sent through
    [blind][randfeat.eval.attacks.stateful.blind] and projected onto the ε-ball ∩ $[0, 1]$;
    the attack keeps its own (unblinded) iterate, as theirs, and the point returned for an
    image not fooled is the blinded point sent for its best step.

    Args:
        eps: radius ε of the threat ball.
        norm: `"linf"` or `"l2"`.
        p_init: Square's initial window fraction (default as `Square`).
        squares: the search range $[n_{lo}, n_{hi}]$ of the number of squares per step.
        square_steps: halvings of the number-of-squares search (0 skips it: $n_s = n_{hi}$).
        square_samples: probes per halving.
        square_rate: the largest refused fraction of the probes accepted.
        min_size: the search range of the minimum side; `None` for the upper end: the image's
            side.
        size_steps: halvings of the minimum-side search (0 skips it: $s_{\min}$ = upper end).
        size_samples: probes per halving.
        size_rate: the largest refused fraction accepted.
        max_attempts: sends of one step before the image is given up (`>= 1`; 1: give up at the
            first refusal, their "standard" configuration).
        search: run the two searches (else $n_s = 1$, $s_{\min} = 1$).
        blind: query blinding: `False`, `True` (default transform) or a
            [Blinding][randfeat.eval.attacks.stateful.Blinding].

    Raises:
        ValueError: a bad range, count or rate (or TypeError on a wrong type).

    References:
        Feng, R., Hooda, A., Mangaokar, N., Fawaz, K., Jha, S., Prakash, A. "Stateful Defenses
        for Machine Learning Models Are Not Yet Secure Against Black-box Attacks." ACM CCS 2023.
        Code: https://github.com/nmangaokar/ccs_23_oars_stateful_attacks
    """

    def __init__(
        self,
        eps: float,
        norm: Norm = "linf",
        p_init: float | None = None,
        *,
        squares: tuple[int, int] = (10, 100),
        square_steps: int = 10,
        square_samples: int = 5,
        square_rate: float = 0.0,
        min_size: tuple[int, int | None] = (1, None),
        size_steps: int = 10,
        size_samples: int = 10,
        size_rate: float = 0.5,
        max_attempts: int = 300,
        search: bool = True,
        blind: bool | Blinding = False,
    ) -> None:
        super().__init__(eps, norm, p_init)
        self.squares = _check_range(squares, "squares")
        self.square_steps = check_int(square_steps, "square_steps", low=0, high=64)
        self.square_samples = check_int(square_samples, "square_samples", low=1, high=10_000)
        self.square_rate = check_probability(square_rate, "square_rate", allow_zero=True)
        self.min_size = _check_range(min_size, "min_size")
        self.size_steps = check_int(size_steps, "size_steps", low=0, high=64)
        self.size_samples = check_int(size_samples, "size_samples", low=1, high=10_000)
        self.size_rate = check_probability(size_rate, "size_rate", allow_zero=True)
        self.max_attempts = check_int(max_attempts, "max_attempts", low=1, high=10**9)
        if not isinstance(search, bool):
            raise TypeError(expected("search", "a bool", search))
        self.search = search
        self.blind = check_blinding(blind)

    # ------------------------------------------------------------------ the loop
    def _attack(self, oracle: Oracle, generator: torch.Generator) -> Tensor:
        x0 = oracle.x0
        if x0.ndim != 4:
            raise ValueError(
                f"Expected argument `x` to be images [N, C, H, W], but got shape {tuple(x0.shape)}."
            )
        x_last = x0.clone()
        try:
            for i in range(x0.shape[0]):
                x_last[i] = self._attack_one(oracle, i, generator)[0]
        except Banned:
            logger.info("AdaptiveSquare: the account is banned; the attack ends")
        return x_last

    def _attack_one(self, oracle: Oracle, i: int, gen: torch.Generator) -> Tensor:
        """Steps 1-4 of the class docstring for image `i`; returns its best answered point."""
        x0 = oracle.x0[i : i + 1]
        y = oracle.y[i : i + 1]
        idx = torch.tensor([i], device=x0.device)
        _, _, h, w = x0.shape
        n_iters = oracle.n_calls
        left = int(oracle.remaining[i])
        if self.norm == "linf":
            bounds = (shifted_corner(x0, self.eps), shifted_corner(x0, -self.eps))
        else:
            bounds = (x0, x0)

        sent: list[Tensor] = []  # the point sent by the last `ask`

        def ask(x: Tensor) -> Tensor | None:
            """Scores of `x` (blinded if asked), or `None` when refused."""
            nonlocal left
            left -= 1
            if self.blind is not None:
                x = project(blind(x, self.blind, gen), x0, self.eps, self.norm)
            sent[:] = [x]
            try:
                return oracle.scores(x, idx)
            except QueryRefused as err:
                if is_banned(err):
                    raise Banned from err
                return None

        def done() -> bool:
            return left < 1 or bool(oracle.success[i])

        # 1. the start, redrawn while refused
        x_best, loss_best = x0, math.inf
        kept = x0  # x_best as sent
        for _ in range(self.max_attempts):
            if done():
                return kept
            start = self._init_linf(*bounds, gen) if self.norm == "linf" else self._init_l2(x0, gen)
            out = ask(start)
            if out is not None:
                x_best, loss_best = start, float(margin_loss(out, y)[0])
                kept = sent[0]
                break
        else:
            return kept
        # 2-3. the searches
        s0 = side_length(p_selection(self.p_init, 0, n_iters), h, w, self.norm)
        top = min(h, w) if self.min_size[1] is None else self.min_size[1]
        if self.search:
            n_squares = self._binary_search(
                self.squares,
                self.square_steps,
                self.square_samples,
                self.square_rate,
                lambda v: self._paint(x0, x_best, bounds, s0, v, gen),
                ask,
                done,
            )
            min_side = self._binary_search(
                (self.min_size[0], top),
                self.size_steps,
                self.size_samples,
                self.size_rate,
                lambda v: self._paint(x0, x_best, bounds, v, n_squares, gen),
                ask,
                done,
            )
        else:
            n_squares, min_side = 1, 1
        logger.debug("AdaptiveSquare: image %d: %d squares, min side %d", i, n_squares, min_side)
        # 4. Square with retries; a retried step advances the schedule, as in their code
        attempts = 0
        t = 0
        while not done():
            s = max(side_length(p_selection(self.p_init, t, n_iters), h, w, self.norm), min_side)
            t += 1
            cand = self._paint(x0, x_best, bounds, s, n_squares, gen)
            out = ask(cand)
            if out is None:
                attempts += 1
                if attempts >= self.max_attempts:
                    logger.debug("AdaptiveSquare: image %d: step movement failure", i)
                    break
                continue
            attempts = 0
            loss = float(margin_loss(out, y)[0])
            if loss < loss_best:
                x_best, loss_best, kept = cand, loss, sent[0]
        return kept

    def _paint(
        self,
        x0: Tensor,
        x_best: Tensor,
        bounds: tuple[Tensor, Tensor],
        side: int,
        n_squares: int,
        gen: torch.Generator,
    ) -> Tensor:
        """`n_squares` Square windows of side `side` painted one after the other on `x_best`
        (their `add_squares`)."""
        _, _, h, w = x0.shape
        s = max(min(int(side), min(h, w) - 1), 1)
        cand = x_best
        for _ in range(max(int(n_squares), 1)):
            if self.norm == "linf":
                cand = self._candidate_linf(cand, bounds[0], bounds[1], s, gen)
            else:
                cand = self._candidate_l2(x0, cand, s, gen)
        return cand

    @staticmethod
    def _binary_search(
        bounds: tuple[int, int | None],
        steps: int,
        samples: int,
        rate: float,
        probe: Callable[[int], Tensor],
        ask: Callable[[Tensor], Tensor | None],
        done: Callable[[], bool],
    ) -> int:
        """Their binary search: the smallest value tried whose probes were refused at a rate
        `<= rate` (the upper end when none was)."""
        lower, upper = float(bounds[0]), float(bounds[1] or bounds[0])
        best = upper
        for _ in range(steps):
            mid = (lower + upper) / 2
            refused = 0
            for _ in range(samples):
                if done():
                    return int(best)
                refused += ask(probe(int(mid))) is None
            if refused / samples <= rate:
                best = upper = mid
            else:
                lower = mid
        return int(best)


def _check_range(value: object, name: str) -> tuple[int, int | None]:
    ok = (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], int)
        and (value[1] is None or isinstance(value[1], int))
        and value[0] >= 1
        and (value[1] is None or value[1] >= value[0])
    )
    if not ok or not isinstance(value, tuple):  # the second test narrows the type for mypy
        raise ValueError(expected(name, "a pair (low, high) of ints with 1 <= low <= high", value))
    return (int(value[0]), None if value[1] is None else int(value[1]))


ADAPTABLE: tuple[type[Attack], ...] = (Square, NES, HopSkipJump)
"""The attacks [adaptive][randfeat.eval.attacks.adaptive.adaptive] can adapt."""

_ADAPTIVE_TYPES = (AdaptiveSquare, AdaptiveNES, AdaptiveHSJA)


def adaptive(attack: Attack) -> AdaptiveSquare | AdaptiveNES | AdaptiveHSJA:
    """The adaptive version of `attack` (Feng et al.), with its radius, norm and settings.

    Square keeps `p_init`; NES keeps its probes per estimate (`samples`), its step (`lr`) and
    its probe scale (`fd_eta`, the σ used when the search is off); HopSkipJump keeps `gamma`,
    `init_num_evals` and `max_num_evals`. An adaptive attack is returned as it is.

    Raises:
        TypeError: `attack` is not an attack of `ADAPTABLE` (Square, NES, HopSkipJump).
    """
    if isinstance(attack, _ADAPTIVE_TYPES):
        return attack
    if type(attack) is Square:
        return AdaptiveSquare(attack.eps, attack.norm, attack.p_init)
    if type(attack) is NES:
        return AdaptiveNES(attack.eps, attack.norm, attack.samples, attack.lr, sigma=attack.fd_eta)
    if type(attack) is HopSkipJump:
        return AdaptiveHSJA(
            attack.eps,
            attack.norm,
            gamma=attack.gamma,
            init_num_evals=attack.init_num_evals,
            max_num_evals=attack.max_num_evals,
        )
    raise TypeError(
        expected(
            "attack",
            "an attack the adaptive attacker can adapt: Square (square-linf, square-l2), NES "
            "(nes-linf, nes-l2) or HopSkipJump (hsja-linf, hsja-l2)",
            attack,
            "Use adaptive-square-linf, adaptive-square-l2, adaptive-nes-linf, adaptive-nes-l2, "
            "adaptive-hsja-linf or adaptive-hsja-l2, or the attack without adaptive-.",
        )
    )
