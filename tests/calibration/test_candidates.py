"""Tests of the three ways calibrate_nu evaluates a candidate ν: projected, cached head, full.

The projected path (a plain `nn.Linear` head whose output is the model's output) draws the noise
once, projects it to the logits and finds for each draw the interval of √ν on which it stays
correct. It must give what the cached-head path gives on the same draws (up to float rounding:
the same ν), and what full noisy forwards give on other draws (within Monte-Carlo error).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest
import timm
import torch
from torch import nn

import randfeat
from randfeat import Calibration, calibrate_nu
from randfeat.calibration.candidates import antithetic_normal, correct_intervals
from randfeat.eval.data.loaders import Digits
from randfeat.eval.models import DigitsCNN

NOISES = ["isotropic", "feature-variance"]


class HeadInSequential(nn.Module):
    """`base` with its classifier `base.<attr>` moved into `head = Sequential(classifier)`.

    Same function, two names for the same point: `"head.pre"` is the input of a Sequential (not
    an `nn.Linear`: the cached-head path) and `"head.0.pre"` the input of the `nn.Linear` itself
    (the projected path).
    """

    def __init__(self, base: nn.Module, attr: str) -> None:
        super().__init__()
        self.head = nn.Sequential(getattr(base, attr))  # registered first: named "head.0"
        self.base = base
        self.attr = attr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        setattr(self.base, self.attr, nn.Identity())
        try:
            features = self.base(x)
        finally:
            setattr(self.base, self.attr, self.head[0])
        return self.head(features)


class Doubled(nn.Module):
    """`2 · base(x)`: the same arg max, so the same accuracy under any noise, but no module's
    output is the model's output: every point falls back to full noisy forwards."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.base(x)


class TanhHead(nn.Module):
    """The digits CNN with a nonlinear head `Sequential(Linear, Tanh)` (same arg max)."""

    def __init__(self, base: DigitsCNN) -> None:
        super().__init__()
        self.head = nn.Sequential(base.head, nn.Tanh())
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        h = b.pool(b.relu2(b.conv2(b.relu1(b.conv1(x)))))
        return self.head(b.relu3(b.fc1(b.flatten(h))))


class ScaledLinear(nn.Linear):
    """An `nn.Linear` subclass whose forward is not torch's: not taken for a linear head."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).tanh()


def _resnet18(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=classes).eval()


def _own_labels(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)  # base accuracy 100%: every target drop is reachable


def _drop_at(
    model: nn.Module,
    layers: tuple[str, ...],
    nu: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    passes: int,
) -> float:
    """The drop at `nu` measured with fresh noise (seed 12345) over `passes` noisy passes."""
    defended = randfeat.wrap(model, layers=list(layers), nu=nu, seed=12345)
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).double().mean())
        hits = torch.stack([(defended(x).argmax(1) == y).double() for _ in range(passes)])
    defended.unwrap()
    return clean - float(hits.mean())


# ---------------------------------------------------------------------------- same draws
@pytest.mark.parametrize("noise", NOISES)
def test_projected_equals_cached_head_on_the_digits_cnn(
    digits: Digits, digits_model: DigitsCNN, noise: str
) -> None:
    """Both paths draw the same ε (same seed, same chunks), so every draw is judged the same up
    to float rounding, which flips a draw with probability ~1e-7: the histories are identical."""
    x, y = digits.x_test, digits.y_test
    model = HeadInSequential(digits_model, "head").eval()
    kw: dict[str, Any] = {"seed": 0, "noise": noise, "progress": False}
    head = calibrate_nu(model, (x, y), "head.pre", [0.01, 0.02, 0.04], **kw)
    proj = calibrate_nu(model, (x, y), "head.0.pre", [0.01, 0.02, 0.04], **kw)
    n, d = len(y), proj[0].draws
    assert [c.path for c in head] == ["head"] * 3 and [c.path for c in proj] == ["projected"] * 3
    assert all(c.fast_path for c in head + proj)
    assert proj[0].history == head[0].history
    assert [c.nu for c in proj] == [c.nu for c in head]
    assert [c.drop for c in proj] == [c.drop for c in head]
    # the head runs on N·draws noisy features per candidate; the projection runs once
    assert all(c.head_evals == n + len(c.history) * n * d for c in head)
    assert all(c.head_evals == n + n * d and c.model_evals == n for c in proj)


@pytest.mark.parametrize("noise", NOISES)
def test_projected_equals_cached_head_on_timm_resnet18(noise: str) -> None:
    base = _resnet18()
    model = HeadInSequential(base, "fc").eval()
    x = torch.rand(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = _own_labels(base, x)
    kw: dict[str, Any] = {"seed": 2, "noise": noise, "draws": 16, "progress": False}
    head = calibrate_nu(model, (x, y), "head.pre", [0.05, 0.2], **kw)
    proj = calibrate_nu(model, (x, y), "head.0.pre", [0.05, 0.2], **kw)
    assert head[0].path == "head" and proj[0].path == "projected"
    assert proj[0].history == head[0].history and [c.nu for c in proj] == [c.nu for c in head]
    # and "fc.pre" / "penultimate" on the plain timm model take the projected path
    for layer in ("fc.pre", "penultimate"):
        c = calibrate_nu(base, (x, y), layer, 0.2, **kw)
        assert isinstance(c, Calibration) and c.path == "projected" and c.layers == ("fc.pre",)


# ---------------------------------------------------------------------------- other draws
def _nu_at(c: Calibration, prefix: str) -> Any:
    """`c`'s covariance with `prefix` removed from its layer names (Σ of `Doubled` for `model`)."""
    if isinstance(c.covariance, float):
        return c.covariance
    return {k.removeprefix(prefix): v for k, v in c.covariance.items()}


def _agree_with_full_forwards(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    y: torch.Tensor,
    targets: list[float],
    noise: str,
    draws: int,
    passes: int,
) -> None:
    """Calibrate `model` at `layer` (projected) and `Doubled(model)` at the same point (full
    forwards, other draws), then measure the drop at both ν with the same fresh noise.

    Each search stops within `step = max(tol, resolution)` of its target on its own draws, so the
    two ν agree within the search's resolution when their drops on the same fresh draws differ
    by at most 2·step plus Monte-Carlo error. With labels = the model's predictions, an
    estimate over N images and D draws each has variance Σ p_i(1 - p_i) / (N² D) <= drop / (N D)
    (p_i(1 - p_i) <= 1 - p_i, Σ (1 - p_i) = N·drop); the difference of the two calibrations
    (D = draws) and of the two fresh measurements (D = passes, independent at worst) has
    SE <= sqrt(2·drop/N · (1/draws + 1/passes)); 4 SE is a 1-in-15,000 false alarm.
    """
    kw: dict[str, Any] = {"seed": 0, "noise": noise, "draws": draws, "progress": False}
    proj = calibrate_nu(model, (x, y), layer, targets, **kw)
    full = calibrate_nu(Doubled(model).eval(), (x, y), f"base.{layer}", targets, **kw)
    assert all(c.path == "projected" for c in proj) and all(c.path == "full" for c in full)
    for p, f in zip(proj, full, strict=True):
        step = max(p.tol, p.resolution)
        se = math.sqrt(2 * p.target_drop / len(y) * (1 / draws + 1 / passes))
        d_p = _drop_at(model, p.layers, _nu_at(p, ""), x, y, passes)
        d_f = _drop_at(model, p.layers, _nu_at(f, "base."), x, y, passes)
        assert abs(d_p - d_f) <= 2 * step + 4 * se, (p.nu, f.nu, d_p, d_f, 2 * step + 4 * se)


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.slow
def test_projected_agrees_with_full_forwards_on_the_digits_cnn(
    digits: Digits, digits_model: DigitsCNN, noise: str
) -> None:
    x, y = digits.x_test, digits.y_test
    _agree_with_full_forwards(digits_model, "head.pre", x, y, [0.02, 0.04], noise, 16, 30)


@pytest.mark.slow
@pytest.mark.parametrize("noise", NOISES)
def test_projected_agrees_with_full_forwards_on_timm_resnet18(noise: str) -> None:
    model = _resnet18()
    x = torch.rand(512, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    y = _own_labels(model, x)
    _agree_with_full_forwards(model, "fc.pre", x, y, [0.1], noise, draws=8, passes=8)


# ---------------------------------------------------------------------------- which path runs
def test_nonlinear_heads_fall_back(digits: Digits, digits_model: DigitsCNN) -> None:
    x, y = digits.x_test[:200], digits.y_test[:200]
    tanh = TanhHead(digits_model).eval()
    kw: dict[str, Any] = {"seed": 0, "draws": 2, "progress": False}
    c = calibrate_nu(tanh, (x, y), "head.pre", 0.04, **kw)  # a nonlinear head: cached head
    assert isinstance(c, Calibration) and c.path == "head" and c.fast_path
    # the Linear inside it does not produce the model's output: full forwards
    c = calibrate_nu(tanh, (x, y), "head.0.pre", 0.04, **kw)
    assert isinstance(c, Calibration) and c.path == "full" and not c.fast_path
    assert c.model_evals == 200 + len(c.history) * 200 * 2 and c.head_evals == 0
    # an nn.Linear subclass with its own forward is not trusted to be linear
    odd = ScaledLinear(4, 3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.ReLU(), odd).eval()
    xs = digits.x_test[:200]
    c = calibrate_nu(model, (xs, _own_labels(model, xs)), "3.pre", 0.1, **kw)
    assert isinstance(c, Calibration) and c.path == "head"


def test_hugging_face_classifiers_take_the_projected_path() -> None:
    """Hugging Face models return an output object; its `.logits` is the classifier's output."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vit = transformers.ViTForImageClassification(
        transformers.ViTConfig(
            image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=64, num_labels=5,
        )
    )  # fmt: skip
    resnet = transformers.ResNetForImageClassification(
        transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5
        )
    )
    x = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for model, key in ((vit.eval(), "classifier.pre"), (resnet.eval(), "classifier.1.pre")):
        with torch.no_grad():
            y = model(x).logits.argmax(1)
        c = calibrate_nu(model, (x, y), "penultimate", 0.1, seed=0, draws=4, progress=False)
        assert isinstance(c, Calibration) and c.layers == (key,) and c.path == "projected"


def test_the_input_and_several_layers_take_full_forwards(
    digits: Digits, digits_model: DigitsCNN
) -> None:
    x, y = digits.x_test[:100], digits.y_test[:100]
    for layers in (["input"], ["fc1", "head.pre"], ["fc1"]):
        c = calibrate_nu(digits_model, (x, y), layers, 0.05, seed=0, draws=1, progress=False)
        assert isinstance(c, Calibration) and c.path == "full"


# ---------------------------------------------------------------------------- the intervals
def test_correct_intervals_match_argmax_along_the_ray() -> None:
    """For random logits, labels and directions (ties included: small integers), the draw is
    classified as its label exactly on (lo, hi), at every s tried."""
    gen = torch.Generator().manual_seed(0)
    m, draws, k = 200, 6, 5
    z = torch.randint(-2, 3, (m, k), generator=gen).double()
    y = torch.randint(0, k, (m,), generator=gen)
    p = torch.randint(-3, 4, (m, draws, k), generator=gen).double()
    lo, hi = correct_intervals(z, y, p.clone())
    for s in (1e-3, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 10.0, 1e3):
        noisy = z.unsqueeze(1) + s * p
        want = (noisy.argmax(2) == y.view(-1, 1)).flatten()
        got = (lo < s) & (s < hi)
        at_boundary = (lo == s) | (hi == s)  # exact ties of two logits: argmax picks by index
        assert torch.equal(got[~at_boundary], want[~at_boundary]), s
    assert bool((hi > 0).any() & (hi <= lo).any() & torch.isinf(lo).any() & torch.isinf(hi).any())


# ---------------------------------------------------------------------------- antithetic draws
@pytest.mark.parametrize("draws", [3, 4, 6])
def test_correct_intervals_of_antithetic_partners_equal_the_negated_draws(draws: int) -> None:
    """Given h draws and `draws` > h, the partners' intervals come from the same pass (−min for
    −p): bit for bit those of the draws written out with their negations, ties included."""
    gen = torch.Generator().manual_seed(1)
    m, k, half = 300, 5, (draws + 1) // 2
    z = torch.randint(-2, 3, (m, k), generator=gen).double()
    y = torch.randint(0, k, (m,), generator=gen)
    p = torch.randint(-3, 4, (m, half, k), generator=gen).double()
    full = torch.cat([p, -p[:, : draws - half]], 1)
    lo, hi = correct_intervals(z, y, p.clone(), draws)
    want_lo, want_hi = correct_intervals(z, y, full.clone())
    assert torch.equal(lo, want_lo) and torch.equal(hi, want_hi)
    assert bool(torch.isfinite(hi).any() & torch.isinf(lo).any())
    with pytest.raises(ValueError, match="draws"):
        correct_intervals(z, y, p.clone(), 2 * half + 1)


@pytest.mark.parametrize("draws", [1, 2, 5, 20])
def test_antithetic_normal_pairs_each_draw_with_its_negation(draws: int) -> None:
    """Draws h..draws-1 of every image are the negations of draws 0..; the first h are the
    generator's next normals, in order (so two paths that share a seed share the draws)."""
    like = torch.empty(0, dtype=torch.float64)
    eps = antithetic_normal(7, draws, (3, 2), like, torch.Generator().manual_seed(5))
    half = (draws + 1) // 2
    assert eps.shape == (7, draws, 3, 2) and eps.dtype == torch.float64
    want = torch.empty(7, half, 3, 2, dtype=torch.float64).normal_(
        generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(eps[:, :half], want)
    assert torch.equal(eps[:, half:], -want[:, : draws - half])


@pytest.mark.slow
def test_antithetic_draws_make_the_accuracy_estimate_no_noisier(
    digits: Digits, digits_model: DigitsCNN
) -> None:
    """The digits CNN's clean logits and head, at the ν of a 4-point drop: the accuracy estimated
    from N·20 draws, over 256 seeds, spreads no more with antithetic pairs than with independent
    draws. The standard deviation of 256 values has a relative standard error of 1/√(2·255) ≈
    0.044, so the ratio of two independent ones has ≈ 0.063 on the log scale: 1.13 is two
    standard errors above equality. Antithetic pairs measure 0.85 here; duplicated pairs (ε, ε),
    which halve the independent draws, should give √2 ≈ 1.41 and fail."""
    x, y = digits.x_test, digits.y_test
    feats: list[torch.Tensor] = []
    handle = digits_model.head.register_forward_pre_hook(lambda m, a: feats.append(a[0]))
    with torch.no_grad():
        z = digits_model(x)
    handle.remove()
    h = feats[0]
    nu = calibrate_nu(digits_model, (x, y), "head.pre", 0.04, seed=0, progress=False)
    assert isinstance(nu, Calibration)
    s = math.sqrt(nu.nu)
    w = digits_model.head.weight.detach()
    m, draws, width = h.shape[0], 20, h.shape[1]

    def accuracy(eps: torch.Tensor) -> float:
        lo, hi = correct_intervals(z, y, eps @ w.T)
        return float(((lo < s) & (s < hi)).double().mean())

    anti, indep = [], []
    for seed in range(256):
        gen = torch.Generator().manual_seed(seed)
        anti.append(accuracy(antithetic_normal(m, draws, (width,), z, gen)))
        indep.append(accuracy(torch.empty(m, draws, width, dtype=z.dtype).normal_(generator=gen)))
    ratio = statistics.stdev(anti) / statistics.stdev(indep)
    assert ratio <= 1.13, ratio
    # both are unbiased: their means agree within 3 standard errors of the difference
    se = math.sqrt((statistics.variance(anti) + statistics.variance(indep)) / 256)
    assert abs(statistics.mean(anti) - statistics.mean(indep)) <= 3 * se
