r"""How a candidate ν is evaluated: the correct draws among N·draws, by one of three paths.

Every path uses common random numbers: the noise stream restarts at the same seed for every
candidate (or is drawn once), so each draw moves along a fixed ray $h + s\,\sigma \odot \varepsilon$,
$s = \sqrt{\nu}$, and two candidates differ only by ν. The projected and cached-head paths draw
ε in antithetic pairs ([antithetic_normal][randfeat.calibration.candidates.antithetic_normal]:
ε and −ε for each image), which halves the normals drawn and the projection's work and, for a
linear head, never lets both draws of a pair fail through the same class.

- [ProjectedLogits][randfeat.calibration.candidates.ProjectedLogits]: a linear head whose output is
  the logits. The noise is drawn and projected to the logits once; each candidate then costs one
  comparison per draw.
- [CachedHead][randfeat.calibration.candidates.CachedHead]: another module whose output is the
  logits. Each candidate runs only that module on the cached features plus noise.
- [FullForwards][randfeat.calibration.candidates.FullForwards]: anything else. Each candidate runs
  `draws` noisy passes of the model through a `RandomizedFeatureWrapper`.

The clean pass ([clean_pass][randfeat.calibration.clean_pass.clean_pass]) decides which applies;
[counter][randfeat.calibration.candidates.counter] builds it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from randfeat.calibration.clean_pass import CleanPass
from randfeat.calibration.data import Batches
from randfeat.calibration.search import NonFiniteLogits
from randfeat.layers import resolve_layers
from randfeat.noise import sigma_for
from randfeat.outputs import logits_of
from randfeat.wrapper import RandomizedFeatureWrapper

__all__ = [
    "HEAD_ELEMENTS",
    "CachedHead",
    "Counter",
    "FullForwards",
    "ProjectedLogits",
    "antithetic_half",
    "antithetic_normal",
    "correct_intervals",
    "counter",
]

Spec = Callable[[float], "float | dict[str, Tensor]"]
"""ν → the wrapper's `nu`: the float ν, or Σ per layer key."""

HEAD_ELEMENTS = 1 << 24
"""Rows per head call (and per draw of ε) are `max(rows, HEAD_ELEMENTS // D)` (64 MB float32)."""


class Counter(Protocol):
    """Correct draws at a candidate ν, and the work done so far."""

    model_evals: int
    head_evals: int

    def __call__(self, nu: float) -> int: ...

    def close(self) -> None: ...


def counter(
    model: nn.Module,
    source: Batches,
    clean: CleanPass,
    keys: list[str],
    spec: Spec,
    draws: int,
    rows: int,
    seed: int,
    bar: Any,
) -> Counter:
    """The counter for the path the clean pass verified (`clean.path`)."""
    if clean.path == "projected":
        return ProjectedLogits(clean, keys[0], spec, draws, rows, seed, bar)
    if clean.path == "head":
        return CachedHead(
            resolve_layers(model, keys)[0].module, clean, keys[0], spec, draws, rows, seed, bar
        )
    return FullForwards(model, source, clean, keys, spec, draws, rows, seed, bar)


def antithetic_normal(
    images: int, draws: int, shape: tuple[int, ...], like: Tensor, gen: torch.Generator
) -> Tensor:
    r"""`[images, draws, *shape]` standard normals in antithetic pairs (Hammersley and Morton, 1956).

    Draws $0 \ldots h-1$ of each image are i.i.d. $\varepsilon_k \sim \mathcal{N}(0, I)$, $h =
    \lceil draws / 2 \rceil$, and draws $h \ldots draws-1$ are $-\varepsilon_0, -\varepsilon_1, \ldots$:
    every draw is still $\mathcal{N}(0, I)$, so the mean over draws stays unbiased, and only $h$
    draws are generated (and, on the projected path, projected). For a linear head the two draws of
    a pair move the logits in opposite directions, $z \pm s\,p$: for a clean-correct image both
    fail at the same $s$ only through two different classes, so the pair's failures are negatively
    correlated in the usual case and the estimate of the accuracy is no noisier than with
    independent draws (tests/calibration/test_candidates.py measures it).

    Args:
        images: images in the chunk.
        draws: draws per image.
        shape: the shape of one draw (a feature's shape without the batch dimension).
        like: gives the dtype and device.
        gen: the generator; `images · h · prod(shape)` normals are taken from it.

    Returns:
        `[images, draws, *shape]`, image-major as `repeat_interleave(draws, 0)` lays rows out.
    """
    half = antithetic_half(draws)
    eps = like.new_empty((images, half, *shape)).normal_(generator=gen)
    return torch.cat([eps, eps[:, : draws - half].neg()], 1)


def antithetic_half(draws: int) -> int:
    r"""The draws of each image that are generated, $\lceil draws / 2 \rceil$; the rest are their
    negations (`antithetic_normal`'s layout)."""
    return (draws + 1) // 2


def _head_images(rows: int, width: int, draws: int) -> int:
    """Images per chunk of noisy features (the projected path draws ε in the same chunks)."""
    return max(1, max(rows, HEAD_ELEMENTS // max(1, width)) // draws)


class FullForwards:
    """`draws` noisy passes of the whole model per candidate, through a wrapper reseeded each time."""

    def __init__(
        self,
        model: nn.Module,
        source: Batches,
        clean: CleanPass,
        keys: list[str],
        spec: Spec,
        draws: int,
        rows: int,
        seed: int,
        bar: Any,
    ) -> None:
        self.source, self.n, self.spec, self.draws, self.seed, self.bar = (
            source, clean.n, spec, draws, seed, bar,
        )  # fmt: skip
        self.model_evals, self.head_evals = clean.n, clean.head_evals
        self.images = max(1, rows // draws)
        self.wrapper = RandomizedFeatureWrapper(model, keys, nu=0.0, seed=seed)

    def close(self) -> None:
        """Remove the wrapper's hooks."""
        self.wrapper.unwrap()

    def __call__(self, nu: float) -> int:
        self.bar.set_description(f"calibrate ν={nu:.3g}")
        self.wrapper.nu = self.spec(nu)
        self.wrapper.manual_seed(self.seed)
        hits = torch.zeros((), dtype=torch.int64, device=self.source.device)
        bad = torch.zeros((), dtype=torch.bool, device=self.source.device)
        for x, y in self.source:
            for xc, yc in zip(x.split(self.images), y.split(self.images), strict=True):
                out = logits_of(self.wrapper(xc.repeat_interleave(self.draws, 0)))
                bad |= ~torch.isfinite(out).all()
                hits += (out.argmax(1) == yc.repeat_interleave(self.draws)).sum()
            self.bar.update()
        self.model_evals += self.n * self.draws
        if bool(bad):
            raise NonFiniteLogits(f"the model returned NaN/inf logits under noise ν={nu:.3g}")
        return int(hits)


class CachedHead:
    """The head alone on the cached features plus noise, N·draws rows per candidate."""

    def __init__(
        self,
        head: nn.Module,
        clean: CleanPass,
        key: str,
        spec: Spec,
        draws: int,
        rows: int,
        seed: int,
        bar: Any,
    ) -> None:
        if clean.features is None or clean.labels is None:
            raise RuntimeError("calibrate_nu: cached head without features (please report this).")
        self.head, self.features, self.labels = head, clean.features, clean.labels
        self.key, self.spec, self.draws, self.seed, self.bar = key, spec, draws, seed, bar
        self.model_evals, self.head_evals = clean.n, clean.head_evals
        self.images = _head_images(rows, self.features[0].numel(), draws)

    def close(self) -> None:
        """Nothing to release."""

    def __call__(self, nu: float) -> int:
        self.bar.set_description(f"calibrate ν={nu:.3g}")
        s = self.spec(nu)
        sigma = sigma_for(s[self.key] if isinstance(s, dict) else s, self.features, self.key)
        gen = torch.Generator(device=self.features.device).manual_seed(self.seed)
        hits = torch.zeros((), dtype=torch.int64, device=self.features.device)
        bad = torch.zeros((), dtype=torch.bool, device=self.features.device)
        for f, y in zip(
            self.features.split(self.images), self.labels.split(self.images), strict=True
        ):
            eps = antithetic_normal(f.shape[0], self.draws, tuple(f.shape[1:]), f, gen)
            noisy = f.repeat_interleave(self.draws, 0) + eps.flatten(0, 1) * sigma
            out = logits_of(self.head(noisy))
            bad |= ~torch.isfinite(out).all()
            hits += (out.argmax(1) == y.repeat_interleave(self.draws)).sum()
        self.head_evals += self.features.shape[0] * self.draws
        self.bar.update()
        if bool(bad):
            raise NonFiniteLogits(f"the model returned NaN/inf logits under noise ν={nu:.3g}")
        return int(hits)


class ProjectedLogits:
    r"""A linear head: the noise drawn and projected to the logits once, then one comparison a draw.

    With $g(h) = W h + b$ the noisy logits of a draw are $z + \sqrt{\nu}\,p$, where $z$ is the
    clean logits and $p = W(\sigma \odot \varepsilon)$: $W\delta \sim \mathcal{N}(0, \nu\,W \Sigma
    W^\top)$ ($\sigma = 1$ for isotropic noise, $\sqrt{\mathrm{Var}(h)}$ per feature for
    feature-variance noise). ε is drawn from the seed in antithetic pairs in the chunks `CachedHead`
    uses, so both paths judge the same draws, and only the first draw of each pair is projected (the
    second is $-p$); each draw's interval of $\sqrt{\nu}$ on which it stays correct is found
    once ([correct_intervals][randfeat.calibration.candidates.correct_intervals]), and a candidate
    counts the draws whose interval holds $\sqrt{\nu}$.
    """

    def __init__(
        self, clean: CleanPass, key: str, spec: Spec, draws: int, rows: int, seed: int, bar: Any
    ) -> None:
        if clean.linear is None or clean.logits is None or clean.labels is None:
            raise RuntimeError(
                "calibrate_nu: projected path without its data (please report this)."
            )
        self.head, self.logits, self.labels = clean.linear, clean.logits, clean.labels
        self.key, self.spec, self.draws, self.seed, self.bar = key, spec, draws, seed, bar
        self.model_evals, self.head_evals = clean.n, clean.head_evals
        self.images = _head_images(rows, self.head.in_features, draws)
        self.bounds: tuple[Tensor, Tensor] | None = None  # (lo, hi) [N·draws], once projected

    def close(self) -> None:
        """Nothing to release."""

    def __call__(self, nu: float) -> int:
        self.bar.set_description(f"calibrate ν={nu:.3g}")
        lo, hi = self.bounds if self.bounds is not None else self._project()
        root = math.sqrt(nu)
        return int(((lo < root) & (root < hi)).sum())

    def _project(self) -> tuple[Tensor, Tensor]:
        weight = self.head.weight.detach()
        width = self.head.in_features
        compute = torch.promote_types(weight.dtype, torch.float32)
        unit = self.spec(1.0)
        scale = sigma_for(unit[self.key] if isinstance(unit, dict) else unit,
                          weight.new_empty(0, width), self.key)  # fmt: skip
        projection = (weight * scale).to(compute)  # W diag(σ): scale W once, not every draw
        gen = torch.Generator(device=weight.device).manual_seed(self.seed)
        step = max(1, HEAD_ELEMENTS // self.logits.shape[1] // self.draws)  # images per product
        lo_parts, hi_parts = [], []
        half = antithetic_half(self.draws)  # generated and projected; the partners are -p
        for z, y in zip(
            self.logits.split(self.images), self.labels.split(self.images), strict=True
        ):
            eps = weight.new_empty((z.shape[0], half, width)).normal_(generator=gen)
            for zc, yc, ec in zip(z.split(step), y.split(step), eps.split(step), strict=True):
                p = nn.functional.linear(ec.to(compute), projection)  # [m, half, K]
                lo, hi = correct_intervals(zc, yc, p, self.draws)  # and the partners -p
                lo_parts.append(lo)
                hi_parts.append(hi)
        self.head_evals += self.logits.shape[0] * self.draws
        self.bar.update()
        self.bounds = torch.cat(lo_parts), torch.cat(hi_parts)
        return self.bounds


def correct_intervals(
    logits: Tensor, y: Tensor, noise: Tensor, draws: int | None = None
) -> tuple[Tensor, Tensor]:
    r"""Where along the ray $z + s\,p$ ($s \ge 0$) each draw is classified as its image's label.

    Draw $d$ of image $i$ is classified $y_i$ (the arg max of $z_i + s\,p_{id}$, ties to the
    lower index as `argmax` does) exactly when $lo_{id} < s < hi_{id}$: every other class $j$
    adds the half-line constraint $a_j + s\,b_j > 0$ with $a_j = z_y - z_j$ and
    $b_j = p_y - p_j$. When the image is clean-correct with every $a_j > 0$ (the common case),
    $lo = -\infty$ and $1/hi = \max_j (p_j - p_y) / a_j$, three passes over `noise`; the other
    images take the general rule in float64. With `draws` larger than the draws given, the missing
    ones are the antithetic partners of the first (`antithetic_normal`'s layout): $-p$ has
    $1/hi = -\min_j (p_j - p_y) / a_j$, so one pass gives both, bit for bit what the negated
    draws would give.

    Args:
        logits: `[m, K]` clean logits $z$.
        y: `[m]` int64 labels.
        noise: `[m, h, K]` noise directions $p$ in logit space; overwritten.
        draws: draws per image, `h` to `2h` (default `h`): draws `h ... draws-1` are
            $-p_0, -p_1, \ldots$.

    Returns:
        `(lo, hi)`: `[m · draws]` float64 ends, $\pm\infty$ where no constraint binds (an empty
        interval has $hi \le lo$).
    """
    m, half, k = noise.shape
    draws = half if draws is None else draws
    if not half <= draws <= 2 * half:
        raise ValueError(f"correct_intervals: draws={draws} with {half} given (need h..2h).")
    neg = draws - half
    idx = y.view(-1, 1)
    a = logits.gather(1, idx).double() - logits.double()  # [m, K] clean margins of y over j
    wins = (a > 0).sum(1) == k - 1  # strictly ahead of every other class
    lo = torch.full((m, draws), -torch.inf, dtype=torch.float64, device=noise.device)
    hi = torch.empty_like(lo)
    rest = (~wins).nonzero().squeeze(1)
    if rest.numel():  # few images: the general rule on a copy, before `noise` is overwritten
        part = noise[rest].double()
        if not bool(torch.isfinite(part).all()):
            raise NonFiniteLogits("the noise projected through the head is NaN/inf")
        part = torch.cat([part, part[:, :neg].neg()], 1)
        lo[rest], hi[rest] = _general_intervals(a[rest], y[rest], part)
    inv_a = torch.where(a > 0, 1.0 / a, 0.0).to(noise.dtype).unsqueeze(1)  # 0 at j = y
    p_y = noise.gather(2, idx.view(m, 1, 1).expand(m, half, 1))
    q = noise.sub_(p_y).mul_(inv_a)  # (p_j - p_y) / a_j; the j = y term is 0
    if neg:
        low, high = torch.aminmax(q, dim=2)
        inv_hi = torch.cat([high, low[:, :neg].neg()], 1).double()  # >= 0
    else:
        inv_hi = q.amax(2).double()  # >= 0
    if not bool(torch.isfinite(inv_hi[wins]).all()):  # NaN/inf in the noise reach the maximum
        raise NonFiniteLogits("the noise projected through the head is NaN/inf")
    hi_wins = torch.where(inv_hi > 0, 1.0 / inv_hi, torch.inf)
    hi[wins] = hi_wins[wins]
    return lo.flatten(), hi.flatten()


def _general_intervals(a: Tensor, y: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """`(lo, hi)` `[m, draws]` for margins `a: [m, K]` and directions `noise: [m, draws, K]`."""
    idx = y.view(-1, 1, 1).expand(-1, noise.shape[1], 1)
    b = noise.gather(2, idx) - noise  # [m, draws, K]
    a = a.unsqueeze(1)
    cls = torch.arange(a.shape[2], device=a.device).view(1, 1, -1)
    other = cls != idx
    t = -a / b  # where constraint j switches (b != 0): a lower bound if b > 0, an upper if b < 0
    lo = torch.where(other & (b > 0), t, -torch.inf).amax(2)
    hi = torch.where(other & (b < 0), t, torch.inf).amin(2)
    # b == 0: constraint j never changes; it holds when y wins outright or wins the tie by index
    holds = (a > 0) | ((a == 0) & (idx < cls))
    never = (other & (b == 0) & ~holds).any(2)
    return lo, torch.where(never, -torch.inf, hi)
