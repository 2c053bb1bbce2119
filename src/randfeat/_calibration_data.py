"""The passes over the calibration data behind :func:`randfeat.calibration.calibrate_nu`.

Nguyen et al., "Understanding the Robustness of Randomized Feature Defense Against Query-Based
Adversarial Attacks", ICLR 2024, §5: defenses are compared at noise scales ν with equal
clean-accuracy drops. The search over ν is in :mod:`randfeat.calibration`; this module holds what
it measures on ``data``:

* :class:`_Source`: ``data`` as batches on the model's device, checking that every pass yields the
  same labels in the same order (common random numbers need it);
* :func:`_clean_pass`: one pass with the noise off: clean accuracy, feature moments
  (:class:`_Moments`: the first guess of ν, and Var(feature) for ``"feature-variance"`` noise), and
  the fast-path detection (:class:`_HeadCheck`) with the verified cache of the head's inputs;
* :class:`_Evaluator`: the correct-draw count at a candidate ν under common random numbers, from
  the head alone on the cached features (fast path) or from full noisy forwards through a
  :class:`~randfeat.wrapper.RandomizedFeatureWrapper`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

import torch
from torch import Tensor, nn

from randfeat.hooks import Hooks
from randfeat.layers import HookPoint, resolve_layers
from randfeat.noise import add_noise, check_feature, sigma_for
from randfeat.outputs import logits_of
from randfeat.wrapper import RandomizedFeatureWrapper

Path = Literal["projected", "head", "full"]

HEAD_ELEMENTS = 1 << 24
"""Fast path: rows per head call are ``max(batch_size, HEAD_ELEMENTS // prod(F))`` (64 MB float32)."""


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    for t in (*model.parameters(), *model.buffers()):
        return t.device, (t.dtype if t.is_floating_point() else None)
    return torch.device("cpu"), None


# ---------------------------------------------------------------------------- data
class _Source:
    """``data`` as ``(x, y)`` batches of at most ``rows`` images on the model's device.

    A tensor pair is sliced; an iterable (a DataLoader) is iterated once per pass, and later passes
    must yield the same labels in the same order (checked: a shuffled loader would break common
    random numbers); a one-shot iterator is kept in memory on the first pass and replayed.
    """

    def __init__(self, data: object, rows: int, device: torch.device, dtype: torch.dtype | None):
        self.rows, self.device, self.dtype = rows, device, dtype
        self.pair: tuple[Tensor, Tensor] | None = None
        self.iterable: Iterable[Any] | None = None
        self.replay: list[Any] | None = None
        self.labels: list[Tensor] = []  # first-pass labels per batch, to check later passes
        self.passes = 0
        if (
            isinstance(data, (tuple, list))
            and len(data) == 2
            and all(isinstance(t, Tensor) for t in data)
        ):
            x, y = data
            _check_batch(x, y)
            self.pair = (x, y)
        elif isinstance(data, Tensor) or not isinstance(data, Iterable):
            raise TypeError(
                "Expected argument `data` to be an (x, y) pair of tensors or an iterable of (x, y) "
                f"batches (e.g. a DataLoader), but got {type(data).__name__}."
            )
        else:
            self.iterable = data
            if isinstance(data, Iterator):
                self.replay = []

    def _raw(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.pair is not None:
            x, y = self.pair
            yield from zip(x.split(self.rows), y.split(self.rows), strict=True)
            return
        if self.replay is not None and self.passes > 1:
            yield from self.replay
            return
        for item in self.iterable or ():
            if not (isinstance(item, (tuple, list)) and len(item) >= 2):
                raise TypeError(
                    "Expected argument `data` to yield (x, y) batches, but got an item of type "
                    f"{type(item).__name__}."
                )
            x, y = item[0], item[1]
            _check_batch(x, y)
            if self.replay is not None:
                self.replay.append((x, y))
            yield from zip(x.split(self.rows), y.split(self.rows), strict=True)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.passes += 1
        first = self.passes == 1
        check = self.iterable is not None and self.replay is None  # a re-iterated loader
        i = -1
        for i, (x, y) in enumerate(self._raw()):
            x = x.to(self.device, self.dtype if self.dtype and x.is_floating_point() else None)
            y = y.to(self.device)
            if check and first:
                self.labels.append(y)
            elif check and (i >= len(self.labels) or not torch.equal(y, self.labels[i])):
                raise ValueError(
                    "Expected argument `data` to yield the same batches in the same order on every "
                    "pass, but the labels changed between passes (a shuffled DataLoader?). Use "
                    "shuffle=False, or pass an (x, y) pair of tensors."
                )
            yield x, y
        if check and not first and i + 1 != len(self.labels):
            raise ValueError(
                "Expected argument `data` to yield the same batches on every pass, but it yielded "
                f"{i + 1} batches after {len(self.labels)} on the first pass."
            )


def _check_batch(x: object, y: object) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            "Expected argument `data` to hold tensors (x, y), but got "
            f"({type(x).__name__}, {type(y).__name__})."
        )
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(
            f"Expected the labels y in argument `data` to be an integer tensor, but got dtype {y.dtype}."
        )
    if y.ndim != 1 or x.ndim < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            "Expected argument `data` to pair x [N, ...] with labels y [N], but got x of shape "
            f"{tuple(x.shape)} and y of shape {tuple(y.shape)}."
        )


# ---------------------------------------------------------------------------- clean-pass capture
class _Moments:
    """Per-layer moments: pooled scalar ones, and per-feature mean/M2 (Chan's merge) on request."""

    def __init__(self, key: str, per_feature: bool) -> None:
        self.key, self.per_feature = key, per_feature
        self.s1: Tensor | float = 0.0
        self.s2: Tensor | float = 0.0
        self.count = 0
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.fired = False

    def add(self, feature: object) -> None:
        f = check_feature(feature, self.key).detach().float()
        self.fired = True
        if f.numel() == 0:
            return
        self.s1 = self.s1 + f.sum(dtype=torch.float64)
        self.s2 = self.s2 + f.square().sum(dtype=torch.float64)
        self.count += f.numel()
        if not self.per_feature:
            return
        b = f.shape[0]
        mean_b = f.mean(0)
        m2_b = (f - mean_b).square().sum(0).double()
        mean_b = mean_b.double()
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = b, mean_b, m2_b
            return
        if self.mean.shape != mean_b.shape:
            raise ValueError(
                f"Feature-variance noise needs a fixed feature shape at {self.key!r}, but it changed "
                f"from {list(self.mean.shape)} to {list(mean_b.shape)} between batches."
            )
        n = self.n + b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (self.n * b / n)
        self.n = n

    def pooled_variance(self) -> float:
        if self.count == 0:
            return 0.0
        mean = float(self.s1) / self.count
        return max(float(self.s2) / self.count - mean * mean, 0.0)

    def variance(self) -> Tensor:
        """Per-feature population variance ``[*F]`` (float32, CPU)."""
        if self.m2 is None or self.n == 0:
            raise ValueError(f"No features were captured at {self.key!r}.")
        return (self.m2 / self.n).clamp_min(0).float().cpu()


class _HeadCheck:
    """Forward hook on the candidate head: one call per forward, one positional input, its output."""

    def __init__(self) -> None:
        self.calls = 0
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}
        self.output: object = None

    def __call__(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        self.calls += 1
        self.args, self.kwargs, self.output = tuple(args), dict(kwargs), output

    def verdict(self, logits: Tensor) -> tuple[Tensor | None, str]:
        """The head's input if this batch allows the fast path, else the reason why not."""
        if self.calls != 1:
            return None, f"the head ran {self.calls} times in one forward"
        if len(self.args) != 1 or self.kwargs or not isinstance(self.args[0], Tensor):
            return None, "the head was not called with exactly one tensor argument"
        out = self.output
        if not isinstance(out, Tensor) or (out is not logits and not torch.equal(out, logits)):
            return None, "the head's output is not the model's output"
        return self.args[0], ""


class _NonFinite(ValueError):
    pass


@dataclass
class _Clean:
    """What the clean pass measured."""

    n: int
    k: int
    base_count: int
    moments: dict[str, _Moments]
    path: Path
    features: Tensor | None  # [N, *F] head inputs ("head" path only)
    logits: Tensor | None  # [N, K] clean logits ("projected" path only)
    labels: Tensor | None  # [N] (both fast paths)
    linear: nn.Linear | None  # the verified linear head ("projected" path only)
    fast_reason: str  # "" when a fast path is valid
    head_evals: int
    seconds: float


def _clean_pass(
    model: nn.Module, source: _Source, points: list[HookPoint], per_feature: bool, bar: Any
) -> _Clean:
    """One pass with noise off: accuracy, feature moments, and the verified head-input cache."""
    t0 = time.perf_counter()
    keys = [p.key for p in points]
    moments = {k: _Moments(k, per_feature) for k in keys}
    only = points[0] if len(points) == 1 else None
    head = (
        only.module if only is not None and only.where == "input" and only.key != "input" else None
    )
    reason = "" if head is not None else "the noise is not at the input of the output module"
    check = _HeadCheck()
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    outs: list[Tensor] = []
    n, k, correct = 0, 0, torch.zeros((), dtype=torch.int64, device=source.device)
    with Hooks() as hooks:
        for p in points:
            if p.key != "input":
                hooks.attach(p.module, moments[p.key].add, pre=p.where == "input")
        if head is not None:
            hooks.add(head.register_forward_hook(check, with_kwargs=True))
        for x, y in source:
            check.calls = 0
            for mo in moments.values():
                mo.fired = False
            if "input" in moments:
                moments["input"].add(x)
            logits = logits_of(model(x))
            k = _check_logits(logits, x, y, n)
            missing = [key for key, mo in moments.items() if not mo.fired]
            if missing:
                raise ValueError(
                    f"Layer(s) {missing} were never reached in the model's forward; choose layers "
                    "that the forward pass actually calls."
                )
            correct += (logits.argmax(1) == y).sum()
            n += x.shape[0]
            if head is not None and not reason:
                feature, reason = check.verdict(logits)
                if feature is not None:
                    feats.append(feature)
                    labels.append(y)
                    outs.append(logits)
                else:
                    feats, labels, outs = [], [], []
            bar.update()
    base_count = int(correct)
    seconds = time.perf_counter() - t0
    head_evals = 0
    if head is not None and not reason:  # the head must be a pure function of its input
        for f, out in zip(feats, outs, strict=True):
            head_evals += f.shape[0]
            if not torch.equal(head(f), out):
                reason = "re-running the head on its input does not reproduce the output"
                break
    fast = head is not None and not reason and n > 0
    linear = head if fast and _plain_linear(head) and all(f.ndim == 2 for f in feats) else None
    path: Path = "projected" if linear is not None else "head" if fast else "full"
    return _Clean(
        n=n,
        k=k,
        base_count=base_count,
        moments=moments,
        path=path,
        features=torch.cat(feats) if path == "head" else None,
        logits=torch.cat(outs) if path == "projected" else None,
        labels=torch.cat(labels) if fast else None,
        linear=linear,
        fast_reason=reason,
        head_evals=head_evals,
        seconds=seconds,
    )


def _plain_linear(head: nn.Module | None) -> TypeGuard[nn.Linear]:
    """An ``nn.Linear`` whose forward is torch's own (a subclass may compute something else)."""
    return isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward


def _check_logits(logits: object, x: Tensor, y: Tensor, start: int) -> int:
    """Validate one batch of clean logits ``[B, K]`` and its labels; return K."""
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"Expected argument `model` to return logits [N, K], but got {shape} for a batch of "
            f"{x.shape[0]}."
        )
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(
            "Expected argument `model` to return finite logits, but got NaN/inf on clean data "
            f"(images {start}..{start + x.shape[0] - 1})."
        )
    k = logits.shape[1]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(
            f"Expected the labels in argument `data` to lie in [0, {k}) (the model has K={k} "
            f"classes), but got values in [{int(y.min())}, {int(y.max())}]."
        )
    return k


class _Evaluator:
    """Correct-draw count at ν under common random numbers (the stream restarts at ``seed``)."""

    def __init__(
        self,
        model: nn.Module,
        source: _Source,
        clean: _Clean,
        keys: list[str],
        spec: Callable[[float], float | dict[str, Tensor]],
        draws: int,
        rows: int,
        seed: int,
        bar: Any,
    ) -> None:
        self.source, self.clean, self.keys, self.spec = source, clean, keys, spec
        self.draws, self.seed, self.bar = draws, seed, bar
        self.model_evals, self.head_evals = clean.n, clean.head_evals
        self.wrapper: RandomizedFeatureWrapper | None = None
        self.head: nn.Module | None = None
        self.bounds: tuple[Tensor, Tensor] | None = None  # projected path: (lo, hi) [N·draws]
        if clean.path == "full":
            self.wrapper = RandomizedFeatureWrapper(model, keys, nu=0.0, seed=seed)
            self.images = max(1, rows // draws)
        else:
            width = clean.linear.in_features if clean.linear is not None else 0
            if clean.features is not None:
                self.head = resolve_layers(model, keys)[0].module
                width = clean.features[0].numel()
            # the projected path draws ε in the head path's chunks, so both see the same noise
            self.images = max(1, max(rows, HEAD_ELEMENTS // max(1, width)) // draws)

    def close(self) -> None:
        if self.wrapper is not None:
            self.wrapper.unwrap()

    def _batches(self) -> Iterator[tuple[Callable[[Tensor], Any], Tensor, Tensor]]:
        if self.head is not None and self.clean.features is not None:
            head, feats, labels = self.head, self.clean.features, self.clean.labels
            if labels is None:
                raise RuntimeError("calibrate_nu: fast path without labels (please report this).")
            for f, y in zip(feats.split(self.images), labels.split(self.images), strict=True):
                yield head, f, y
            self.head_evals += self.clean.n * self.draws
        elif self.wrapper is not None:
            for x, y in self.source:
                for xc, yc in zip(x.split(self.images), y.split(self.images), strict=True):
                    yield self.wrapper, xc, yc
                self.bar.update()
            self.model_evals += self.clean.n * self.draws

    def __call__(self, nu: float) -> int:
        self.bar.set_description(f"calibrate ν={nu:.3g}")
        if self.clean.path == "projected":
            lo, hi = self.bounds if self.bounds is not None else self._project()
            root = math.sqrt(nu)
            return int(((lo < root) & (root < hi)).sum())
        s = self.spec(nu)
        sigma: float | Tensor = 0.0
        gen: torch.Generator | None = None
        if self.wrapper is not None:
            self.wrapper.nu = s
            self.wrapper.manual_seed(self.seed)
        elif self.clean.features is not None:
            gen = torch.Generator(device=self.clean.features.device).manual_seed(self.seed)
            one = s[self.keys[0]] if isinstance(s, dict) else s
            sigma = sigma_for(one, self.clean.features, self.keys[0])
        device = self.source.device
        hits = torch.zeros((), dtype=torch.int64, device=device)
        bad = torch.zeros((), dtype=torch.bool, device=device)
        for fn, z, y in self._batches():
            z = z.repeat_interleave(self.draws, 0)
            out = logits_of(fn(z) if gen is None else fn(add_noise(z, sigma, gen)))
            bad |= ~torch.isfinite(out).all()
            hits += (out.argmax(1) == y.repeat_interleave(self.draws)).sum()
        if self.wrapper is None:
            self.bar.update()
        if bool(bad):
            raise _NonFinite(f"the model returned NaN/inf logits under noise ν={nu:.3g}")
        return int(hits)

    def _project(self) -> tuple[Tensor, Tensor]:
        r"""Draw ε once, project it through the head and find each draw's interval of √ν.

        With a linear head $g(h) = W h + b$, the noisy logits of a draw are $z + \sqrt{\nu}\,p$
        with $z$ the clean logits and $p = W(\sigma \odot \varepsilon)$ ($\sigma = 1$, or
        $\sqrt{\mathrm{Var}(h)}$ for feature-variance noise). The draw is classified $y$ exactly
        when $\sqrt{\nu}$ lies in an interval $(lo, hi)$ (every other class $j$ adds one
        half-line constraint $z_y - z_j + \sqrt{\nu}\,(p_y - p_j) > 0$), found once here; a
        candidate then costs one comparison per draw.
        """
        head, logits, labels = self.clean.linear, self.clean.logits, self.clean.labels
        if head is None or logits is None or labels is None:
            raise RuntimeError(
                "calibrate_nu: projected path without its data (please report this)."
            )
        weight = head.weight.detach()
        width = head.in_features
        compute = torch.promote_types(weight.dtype, torch.float32)
        unit = self.spec(1.0)
        one = unit[self.keys[0]] if isinstance(unit, dict) else unit
        scale = sigma_for(one, weight.new_empty(0, width), self.keys[0])
        gen = torch.Generator(device=weight.device).manual_seed(self.seed)
        step = max(1, HEAD_ELEMENTS // max(1, logits.shape[1]) // self.draws)  # images per matmul
        lo_parts, hi_parts = [], []
        for z, y in zip(logits.split(self.images), labels.split(self.images), strict=True):
            eps = weight.new_empty(z.shape[0] * self.draws, width).normal_(generator=gen)
            for zc, yc, ec in zip(
                z.split(step), y.split(step), eps.split(step * self.draws), strict=True
            ):
                p = nn.functional.linear((ec * scale).to(compute), weight.to(compute))
                lo, hi = correct_intervals(zc, yc, p.view(zc.shape[0], self.draws, -1))
                lo_parts.append(lo)
                hi_parts.append(hi)
        self.head_evals += self.clean.n * self.draws
        self.bounds = torch.cat(lo_parts), torch.cat(hi_parts)
        return self.bounds


def correct_intervals(logits: Tensor, y: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    r"""Where along the ray $z + s\,p$ ($s \ge 0$) each draw is classified as its image's label.

    Draw $d$ of image $i$ is classified $y_i$ (the arg max of $z_i + s\,p_{id}$, ties to the
    lower index as `argmax` does) exactly when $lo_{id} < s < hi_{id}$: every other class $j$
    adds the half-line constraint $a_j + s\,b_j > 0$ with $a_j = z_y - z_j$ and
    $b_j = p_y - p_j$. When the image is clean-correct with every $a_j > 0$ (the common case),
    $lo = -\infty$ and $1/hi = \max_j (p_j - p_y) / a_j$, three passes over `noise`; the other
    images take the general rule in float64.

    Args:
        logits: `[m, K]` clean logits $z$.
        y: `[m]` int64 labels.
        noise: `[m, draws, K]` noise directions $p$ in logit space; overwritten.

    Returns:
        `(lo, hi)`: `[m · draws]` float64 ends, $\pm\infty$ where no constraint binds (an empty
        interval has $hi \le lo$).
    """
    m, draws, k = noise.shape
    idx = y.view(-1, 1)
    a = logits.gather(1, idx).double() - logits.double()  # [m, K] clean margins of y over j
    wins = (a > 0).sum(1) == k - 1  # strictly ahead of every other class
    lo = torch.full((m, draws), -torch.inf, dtype=torch.float64, device=noise.device)
    hi = torch.empty_like(lo)
    rest = (~wins).nonzero().squeeze(1)
    if rest.numel():  # few images: the general rule on a copy, before `noise` is overwritten
        part = noise[rest].double()
        if not bool(torch.isfinite(part).all()):
            raise _NonFinite("the noise projected through the head is NaN/inf")
        lo[rest], hi[rest] = _general_intervals(a[rest], y[rest], part)
    inv_a = torch.where(a > 0, 1.0 / a, 0.0).to(noise.dtype).unsqueeze(1)  # 0 at j = y
    p_y = noise.gather(2, idx.view(m, 1, 1).expand(m, draws, 1))
    inv_hi = noise.sub_(p_y).mul_(inv_a).amax(2).double()  # >= 0 (the j = y term is 0)
    if not bool(torch.isfinite(inv_hi[wins]).all()):  # NaN/inf in the noise reach the maximum
        raise _NonFinite("the noise projected through the head is NaN/inf")
    hi_wins = torch.where(inv_hi > 0, 1.0 / inv_hi, torch.inf)
    hi[wins] = hi_wins[wins]
    return lo.flatten(), hi.flatten()


def _general_intervals(a: Tensor, y: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """``(lo, hi)`` `[m, draws]` for margins ``a: [m, K]`` and directions ``noise: [m, draws, K]``."""
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
