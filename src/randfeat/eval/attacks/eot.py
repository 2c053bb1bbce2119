"""EOT: the adaptive attack against randomized defenses (expectation over transformation).

The randomized feature paper (Nguyen et al., "Understanding the Robustness of Randomized Feature
Defense Against Query-Based Adversarial Attacks", ICLR 2024, section 4.5) evaluates an adaptive
attacker who averages the model's output over `m` queries at every point it evaluates, so that
the defense's noise averages out (Athalye, Carlini and Wagner, ICML 2018; Athalye, Engstrom, Ilyas
and Kwok, ICML 2018). The paper's code (`mail-research/randomized_defenses`,
`attack/base.py:get_adaptive_output`) averages the logits of `m` independent noisy forwards and
computes the loss on the average; we do the same, and charge every one of the `m` forwards.
"""

from __future__ import annotations

import torch
from torch import Tensor

from randfeat.checks import check_positive_int
from randfeat.eval.attacks.base import Attack
from randfeat.eval.oracle import Model
from randfeat.eval.outcome import AttackResult

__all__ = ["EOT"]


class EOT(Attack):
    """Wrap an attack so that every evaluation averages `m` forwards, charged as `m` queries.

    $$
    \\hat f(x) = \\frac{1}{m} \\sum_{j=1}^{m} f_{\\mathrm{rand}}(x; \\delta_j),
    \\qquad \\delta_j \\sim \\mathcal{N}(0, \\nu I) \\text{ i.i.d.}
    $$

    The inner attack runs unchanged against an oracle whose every query averages `m` forwards of
    the model (scores averaged; for a label-only model the one-hot votes are averaged, i.e. a
    majority vote) and is charged `m` queries. A budget of `B` queries therefore buys
    `B // m` evaluations (`oracle.n_calls`); attacks size their schedules by `oracle.n_calls`.
    The success check (D.4) is unchanged: an apparent success of the averaged scores is verified by
    `votes` single, uncharged forwards. `EOT(attack, 1)` reproduces `attack` exactly for the
    same seed. `output`, `eps` and `norm` are the inner attack's; EOTs nest
    (`EOT(EOT(a, 2), 3)` averages 6 forwards a query).

    Deviation from the paper's code: there Square's EOT loop runs `n_iters // M` iterations but
    reports 1 query per iteration per image (the log multiplies by `M`) and SignHunt charges `M`
    per iteration while calling the `M`-average twice; here the oracle charges every forward.

    Args:
        attack: the attack to make adaptive (any `Attack`).
        m: forwards averaged per evaluation (an int `>= 1`). The paper's code uses `M = 5`
            (`configs/nes_adapt_l2.yaml`; commands with `--num_adapt 5`).

    References:
        Athalye, A., Engstrom, L., Ilyas, A. and Kwok, K. "Synthesizing Robust Adversarial
        Examples." ICML 2018.
        Nguyen, Q. H. et al. "Understanding the Robustness of Randomized Feature Defense Against
        Query-Based Adversarial Attacks." ICLR 2024, section 4.5.
    """

    def __init__(self, attack: Attack, m: int) -> None:
        if not isinstance(attack, Attack):
            raise TypeError(
                f"Expected argument `attack` to be a randfeat Attack, but got {type(attack)!r}."
            )
        check_positive_int(m, "m")
        super().__init__(attack.eps, attack.norm)
        self.attack = attack
        self.m = m
        # mirror the inner attack's door (class attribute on every other attack)
        self.output = attack.output  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"EOT({self.attack!r}, m={self.m})"

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
        """Run the inner attack with every query averaging `samples * m` forwards.

        See [Attack.run][randfeat.eval.attacks.base.Attack.run] for the arguments; `samples`
        multiplies (an EOT of an EOT averages the product).
        """
        check_positive_int(samples, "samples")
        return self.attack.run(
            model,
            x,
            y,
            budget,
            votes,
            seed,
            batch_size=batch_size,
            samples=samples * self.m,
        )
