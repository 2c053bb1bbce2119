"""The clean pass: one pass over the data with the noise off, before any candidate ν.

It measures the clean accuracy, the moments of the features at the perturbed points (the first
guess of ν, and Var(feature) for feature-variance noise), and verifies which path the candidates
can take (see [clean_pass][randfeat.calibration.clean_pass.clean_pass]).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
from torch import Tensor, nn

from randfeat.calibration.data import Batches, check_logits
from randfeat.calibration.result import CalibrationPath
from randfeat.hooks import Hooks
from randfeat.layers import HookPoint
from randfeat.noise import check_feature
from randfeat.outputs import logits_of

__all__ = ["CleanPass", "HeadCheck", "Moments", "clean_pass", "plain_linear"]


class Moments:
    """The moments of the feature at one layer over the clean pass.

    Pooled over every element (the first guess of ν for isotropic noise), and per feature (mean and
    sum of squared deviations, merged batch by batch with Chan's formula) for feature-variance
    noise. `add` is the capture hook; `fired` says whether it ran during the current forward.
    """

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
        """Add one batch of features `[B, *F]`."""
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
        """The variance of every element seen, pooled (0 when nothing was seen)."""
        if self.count == 0:
            return 0.0
        mean = float(self.s1) / self.count
        return max(float(self.s2) / self.count - mean * mean, 0.0)

    def variance(self) -> Tensor:
        """Per-feature population variance `[*F]` (float32, CPU)."""
        if self.m2 is None or self.n == 0:
            raise ValueError(f"No features were captured at {self.key!r}.")
        return (self.m2 / self.n).clamp_min(0).float().cpu()


class HeadCheck:
    """Forward hook on the candidate head: how often it ran in one forward, its input and output."""

    def __init__(self) -> None:
        self.calls = 0
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}
        self.output: object = None

    def __call__(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """Record one call (registered with `with_kwargs=True`)."""
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


@dataclass(frozen=True)
class CleanPass:
    """What the clean pass measured.

    Attributes:
        n: images.
        k: classes.
        base_count: clean-correct images.
        moments: layer key → its feature moments.
        path: which path the candidates take.
        features: `[N, D...]` the head's inputs (`"head"` path only).
        logits: `[N, K]` the clean logits (`"projected"` path only).
        labels: `[N]` (both fast paths).
        linear: the verified linear head (`"projected"` path only).
        fast_reason: why no fast path was taken (`""` when one was).
        head_evals: images the head was re-run on to verify it.
        seconds: wall time of the pass.
    """

    n: int
    k: int
    base_count: int
    moments: dict[str, Moments]
    path: CalibrationPath
    features: Tensor | None
    logits: Tensor | None
    labels: Tensor | None
    linear: nn.Linear | None
    fast_reason: str
    head_evals: int
    seconds: float


def clean_pass(
    model: nn.Module, source: Batches, points: list[HookPoint], per_feature: bool, bar: Any
) -> CleanPass:
    """One pass with the noise off: accuracy, feature moments, and which path the candidates take.

    The fast paths need the single perturbed point to be the input of a module whose output is the
    model's output, verified on every batch (one call per forward with one tensor argument, its
    output the model's logits) and, after the pass, by re-running the module on its captured
    inputs (it must reproduce its outputs exactly: no dropout, no in-place edits). A verified
    plain `nn.Linear` fed `[B, D]` features takes the projected path; another verified module the
    cached-head path; anything else full forwards.

    Args:
        model: the classifier.
        source: the data.
        points: the resolved perturbed points.
        per_feature: also measure per-feature variances (feature-variance noise).
        bar: a progress bar (`update()` once per batch).

    Raises:
        ValueError: logits that are not `[B, K]` or not finite, labels out of range, a layer the
            forward never reaches.
    """
    t0 = time.perf_counter()
    keys = [p.key for p in points]
    moments = {k: Moments(k, per_feature) for k in keys}
    only = points[0] if len(points) == 1 else None
    head = (
        only.module if only is not None and only.where == "input" and only.key != "input" else None
    )
    reason = "" if head is not None else "the noise is not at the input of the output module"
    check = HeadCheck()
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
            k = check_logits(logits, x, y, n)
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
    linear = head if fast and plain_linear(head) and all(f.ndim == 2 for f in feats) else None
    path: CalibrationPath = "projected" if linear is not None else "head" if fast else "full"
    return CleanPass(
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


def plain_linear(head: nn.Module | None) -> TypeGuard[nn.Linear]:
    """An `nn.Linear` whose forward is torch's own (a subclass may compute something else)."""
    return isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward
