"""Persistent attackers against randomized defenses: [JitterEOT][randfeat.eval.attacks.persistent.JitterEOT]
and [Resubmit][randfeat.eval.attacks.persistent.Resubmit].

Lucas, Jagielski, Tramèr, Bauer and Carlini ("Randomness in ML Defenses Helps Persistent
Attackers and Hinders Evaluators", arXiv 2302.13464, 2023) argue that a randomized defense helps
an attacker who keeps trying: a point that fools the model with probability $p$ per query fools
it at least once in $r$ resubmissions with probability $1 - (1 - p)^r$; the randomized-feature
paper's reviewers raised the same point ("lucky attack", Table 15 of Nguyen et al., ICLR 2024,
`votes=1`). Keyed noise (`wrap(..., noise="keyed")`: the noise of a row is a function of a secret
key and the row's bytes) answers a resubmitted point with the same answer, so an attacker must
move the point to draw fresh noise: `JitterEOT` averages over small random moves, `Resubmit`
resubmits the attack's final point. Both compose any attack through `run`, as
[EOT][randfeat.eval.attacks.eot.EOT] does, and charge every forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from randfeat.checks import (
    check_float,
    check_positive_float,
    check_positive_int,
    expected,
)
from randfeat.eval.attacks.base import Attack, make_generator, project, validate_inputs
from randfeat.eval.errors import QueryRefused
from randfeat.eval.oracle import Model, Oracle, Output, distance
from randfeat.eval.outcome import AttackResult

__all__ = ["JitterEOT", "Resubmit"]

_SHADOW_VOTES = 2  # >= 2: the shadow oracle's verification goes to `unguarded`, never credits


def _check_attack(attack: object) -> Attack:
    if not isinstance(attack, Attack):
        raise TypeError(expected("attack", "a randfeat Attack", attack))
    return attack


def _validate(x: Tensor, y: Tensor, budget: int, votes: int, samples: int) -> tuple[Tensor, Tensor]:
    check_positive_int(samples, "samples")
    return validate_inputs(x, y, budget, votes)


class _Fooled(Exception):
    """The real oracle credited a success: the shadow run of this sample ends here."""


class _Jittered:
    """The model as the wrapped attack sees it while it attacks sample `i` alone.

    Every row it is asked about is moved by a fresh jitter and sent to the real oracle as a
    query of sample `i` (charged, judged there); the answers go back unaveraged (the shadow
    oracle averages its `samples` copies). `unguarded` answers the shadow oracle's own
    verification: "correct" always, since the real oracle is the judge.
    """

    def __init__(
        self, real: Oracle, i: int, jitter: float, output: Output, gen: torch.Generator
    ) -> None:
        self.real, self.i, self.jitter, self.output, self.gen = real, i, jitter, output, gen
        self.x0 = real.x0[i : i + 1]
        self.last_in_ball: Tensor | None = None  # the last point sent inside the ball

    def __call__(self, rows: Tensor) -> Tensor:
        real = self.real
        x0 = self.x0.expand_as(rows).to(rows.dtype)
        inside = (distance(rows, x0, real.norm) <= real.eps).view(-1, *[1] * (rows.ndim - 1))
        u = torch.rand(rows.shape, generator=self.gen, device=rows.device, dtype=rows.dtype)
        moved = rows + (2 * u - 1) * self.jitter
        sent = torch.where(inside, project(moved, x0, real.eps, real.norm), moved.clamp(0, 1))
        idx = torch.full((rows.shape[0],), self.i, dtype=torch.long, device=rows.device)
        out = real.labels(sent, idx) if self.output == "labels" else real.scores(sent, idx)
        if bool(real.success[self.i]):
            raise _Fooled
        ok = (distance(sent, x0, real.norm) <= real.eps).nonzero()
        if ok.numel():
            self.last_in_ball = sent[int(ok[-1])]
        return out

    def unguarded(self, rows: Tensor) -> Tensor:
        y = self.real.y[self.i].expand(rows.shape[0])
        if self.output == "labels" or self.real.num_classes is None:
            return y.clone()
        return torch.nn.functional.one_hot(y, self.real.num_classes).float()


class JitterEOT(Attack):
    """Wrap an attack so that each of its queries is sent as `m` jittered copies, averaged.

    $$
    \\hat f(x) = \\frac{1}{m} \\sum_{j=1}^{m} f_{\\mathrm{rand}}\\big(\\Pi(x + u_j)\\big),
    \\qquad u_j \\sim \\mathcal{U}[-\\tau, \\tau]^d \\text{ i.i.d.},
    $$

    $\\Pi$ the projection onto the ε-ball ∩ $[0, 1]$ (onto $[0, 1]$ for a query outside the
    ball, as decision attacks make), $\\tau$ = `jitter`. Scores are averaged; labels by averaged
    one-hot votes, as the oracle's EOT does. Against fresh noise it is EOT with a little input
    noise; against keyed noise every copy is a new row and so draws new noise, which
    [EOT][randfeat.eval.attacks.eot.EOT] over exact repeats cannot (it gets one answer `m`
    times). Every copy is one charged query: a query of the wrapped attack costs `m`
    (`m * samples` under an outer EOT, every forward a distinct copy).

    **How success is judged.** Only points the model was asked about can fool it: every jittered
    copy is a query row of the real [Oracle][randfeat.eval.oracle.Oracle], which judges it as it
    judges any query (a misclassified copy inside the ball is verified by `votes` uncharged
    forwards, D.4; under keyed noise its answer is the verdict). The average the attack sees
    never credits a success, and the attack's own point (never sent itself) is never credited.
    The point returned for an image not fooled is the last copy sent inside the ball (`x` itself
    if none was).

    Each image is attacked on its own (one `run` of the wrapped attack per image, so that every
    copy is charged to its image and projected into its ball): slower than a batched run by the
    Python overhead of the attack's loop. A refusal ([QueryRefused][randfeat.eval.errors.QueryRefused])
    is charged by the real oracle and reaches the wrapped attack as it would unwrapped; when the
    attack's search ends on it, the run ends there (the result says `refused`, later images are
    not attacked).

    Args:
        attack: the attack to wrap (any `Attack`).
        m: jittered copies per query (`>= 1`).
        jitter: half-width $\\tau$ of the uniform jitter per pixel (`> 0`; default 1/255).

    References:
        Lucas, K., Jagielski, M., Tramèr, F., Bauer, L. and Carlini, N. "Randomness in ML
        Defenses Helps Persistent Attackers and Hinders Evaluators." arXiv 2302.13464, 2023.
        Athalye, A., Engstrom, L., Ilyas, A. and Kwok, K. "Synthesizing Robust Adversarial
        Examples." ICML 2018.
    """

    def __init__(self, attack: Attack, m: int = 5, jitter: float = 1 / 255) -> None:
        self.attack = _check_attack(attack)
        self.m = check_positive_int(m, "m")
        self.jitter = check_positive_float(jitter, "jitter")
        super().__init__(attack.eps, attack.norm)
        self.output = attack.output  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"JitterEOT({self.attack!r}, m={self.m}, jitter={self.jitter:.6g})"

    def run(
        self,
        model: Model,
        x: Tensor,
        y: Tensor,
        budget: int = 1000,
        votes: int = 9,
        seed: int | torch.Generator | None = None,
        *,
        batch_size: int | None = None,
        samples: int = 1,
    ) -> AttackResult:
        """Attack each image with the wrapped attack, every query sent as `samples * m` copies.

        See [Attack.run][randfeat.eval.attacks.base.Attack.run] for the arguments.
        """
        x, y = _validate(x, y, budget, votes, samples)
        real = Oracle(
            model,
            x,
            y,
            budget=budget,
            eps=self.eps,
            norm=self.norm,
            votes=votes,
            output=self.output,
            batch_size=batch_size,
        )
        gen = make_generator(seed, x.device)
        seeds = torch.randint(0, 2**62, (x.shape[0], 2), generator=gen, device=gen.device).tolist()
        x_last = x.clone()
        for i, (attack_seed, jitter_seed) in enumerate(seeds):
            jit = torch.Generator(device=x.device)
            jit.manual_seed(jitter_seed)
            proxy = _Jittered(real, i, self.jitter, self.output, jit)
            try:
                res = self.attack.run(
                    proxy,
                    x[i : i + 1],
                    y[i : i + 1],
                    budget,
                    _SHADOW_VOTES,
                    attack_seed,
                    batch_size=budget,  # one proxy call per query; the real oracle batches
                    samples=samples * self.m,
                )
            except _Fooled:
                continue
            if proxy.last_in_ball is not None:
                x_last[i] = proxy.last_in_ball.to(x.dtype)
            if res.refused or real.refused is not None:
                break
        return real.result(x_last)


class Resubmit(Attack):
    """Run an attack on part of the budget, then resubmit its final point until the budget is
    spent: the persistent attacker of Lucas et al. (2023).

    Phase 1 runs the wrapped attack with budget $B_1 = B - \\lfloor r B \\rfloor$ ($r$ =
    `reserve`). Phase 2 sends, for every image not yet fooled, the point phase 1 returned for it
    (`x_adv`), again and again, one charged query (`samples` forwards) each, until the image has
    spent the whole budget $B$ or is fooled. Each resubmission is judged by the oracle as any
    query: with `votes=1` (the "lucky attack" of Table 15) one misclassified answer suffices, so
    under fresh noise a point fooling with probability $p$ a query succeeds with probability
    $1 - (1 - p)^{R}$ in $R$ resubmissions; with `votes=9` the apparent success must pass the
    verification. Under keyed noise every resubmission gets the same answer (nothing gained);
    under stateful detection every resubmission is an exact duplicate.

    The two phases make one result: queries added, `success_query` of a phase-2 success offset by
    the queries of phase 1, verification forwards added, `x_adv` phase 1's point (the point
    resubmitted). A refusal ([QueryRefused][randfeat.eval.errors.QueryRefused]) ends the search
    where it happens, as it ends the wrapped attack's: charged, the result says `refused`, and a
    refused phase 1 is not followed by phase 2.

    Args:
        attack: the attack to wrap (any `Attack`).
        reserve: the fraction $r \\in [0, 1)$ of the budget kept for resubmission (0.5).

    References:
        Lucas, K., Jagielski, M., Tramèr, F., Bauer, L. and Carlini, N. "Randomness in ML
        Defenses Helps Persistent Attackers and Hinders Evaluators." arXiv 2302.13464, 2023.
    """

    def __init__(self, attack: Attack, reserve: float = 0.5) -> None:
        self.attack = _check_attack(attack)
        self.reserve = check_float(reserve, "reserve", low=0.0, high=1.0, high_open=True)
        super().__init__(attack.eps, attack.norm)
        self.output = attack.output  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"Resubmit({self.attack!r}, reserve={self.reserve:g})"

    def run(
        self,
        model: Model,
        x: Tensor,
        y: Tensor,
        budget: int = 1000,
        votes: int = 9,
        seed: int | torch.Generator | None = None,
        *,
        batch_size: int | None = None,
        samples: int = 1,
    ) -> AttackResult:
        """Phase 1 (the wrapped attack on $B_1$ queries), then phase 2 (resubmission).

        See [Attack.run][randfeat.eval.attacks.base.Attack.run] for the arguments.
        """
        x, y = _validate(x, y, budget, votes, samples)
        first = budget - int(self.reserve * budget)  # >= 1 since reserve < 1
        r1 = self.attack.run(
            model, x, y, first, votes, seed, batch_size=batch_size, samples=samples
        )
        oracle = Oracle(
            model,
            x,
            y,
            budget=budget,
            eps=self.eps,
            norm=self.norm,
            votes=votes,
            output=self.output,
            batch_size=batch_size,
            samples=samples,
        )
        point = r1.x_adv
        left = budget - r1.queries  # what each image may still spend
        if not r1.refused:
            _resubmit(oracle, point, left, r1.success, samples)
        return _combine(r1, oracle, budget)


def _resubmit(oracle: Oracle, point: Tensor, left: Tensor, done: Tensor, samples: int) -> None:
    """Phase 2: one query of every open image a round, until its budget `left` is spent."""
    while True:
        open_ = ~done & ~oracle.success & (oracle.queries + samples <= left)
        idx = open_.nonzero().squeeze(1)
        if idx.numel() == 0:
            return
        try:
            oracle.labels(point[idx], idx)
        except QueryRefused:  # charged by the oracle; the search ends here
            return


def _combine(r1: AttackResult, o2: Oracle, budget: int) -> AttackResult:
    won2 = o2.success & ~r1.success
    success_query = torch.where(
        r1.success,
        r1.success_query,
        torch.where(won2, r1.queries + o2.success_query, torch.full_like(r1.success_query, -1)),
    )
    return AttackResult(
        x_adv=r1.x_adv,
        success=r1.success | won2,
        queries=r1.queries + o2.queries,
        success_query=success_query,
        verify_forwards=r1.verify_forwards + o2.verify_forwards,
        budget=budget,
        votes=r1.votes,
        refused=r1.refused or o2.refused is not None,
    )
