r"""The theory of the paper as tools: Theorem 1 (Eq. 26), gradient ratios, robustness magnitude.

Notation (paper, sections 3.3-3.5): the model splits at a layer as $f = g \circ h$; the attacker
proposes $u \sim \mathcal{N}(0, \mu I)$ at the input; the defense adds
$\delta \sim \mathcal{N}(0, \nu I)$ to $h(x)$; $\mathcal{L}$ is the margin loss of
Eq. 3, $\mathcal{L}(f(x), y) = f_y(x) - \max_{i \neq y} f_i(x)$
(`randfeat.losses.margin_loss`).

- `gradients`: per-sample gradient norms at the input and at any layer; the Figure 1 experiment;
- `fooling`: Theorem 1 (Eq. 26) and its Monte-Carlo check (Eq. 15);
- `ranking`: the ν predicted for a drop, and layers ranked by robustness magnitude.
"""

from __future__ import annotations

from randfeat.theory.fooling import fooling_probability_from_ratio as fooling_probability_from_ratio
from randfeat.theory.fooling import (
    monte_carlo_fooling_probability as monte_carlo_fooling_probability,
)
from randfeat.theory.fooling import theorem1_fooling_probability as theorem1_fooling_probability
from randfeat.theory.gradients import GradientNorms as GradientNorms
from randfeat.theory.gradients import gradient_norms as gradient_norms
from randfeat.theory.gradients import (
    gradient_ratio_before_after_step as gradient_ratio_before_after_step,
)
from randfeat.theory.ranking import LayerReport as LayerReport
from randfeat.theory.ranking import LayerRow as LayerRow
from randfeat.theory.ranking import layer_report as layer_report
from randfeat.theory.ranking import predicted_nu as predicted_nu

__all__ = [
    "GradientNorms",
    "LayerReport",
    "LayerRow",
    "fooling_probability_from_ratio",
    "gradient_norms",
    "gradient_ratio_before_after_step",
    "layer_report",
    "monte_carlo_fooling_probability",
    "predicted_nu",
    "theorem1_fooling_probability",
]
