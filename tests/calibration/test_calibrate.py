"""Tests of randfeat.calibrate_nu: ν chosen by its clean-accuracy cost (paper §5, Tables 1-3)."""

from __future__ import annotations

import itertools
import math
import pickle
import sys
from typing import Any

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import randfeat
from randfeat import Calibration, calibrate_nu
from randfeat.eval.data.loaders import Digits
from randfeat.eval.models import DigitsCNN


def _features(model: DigitsCNN, x: torch.Tensor) -> torch.Tensor:
    """The digits CNN's penultimate features (the input of ``head``)."""
    h = model.relu1(model.conv1(x))
    h = model.pool(model.relu2(model.conv2(h)))
    return model.relu3(model.fc1(model.flatten(h)))


class PostProcessed(nn.Module):
    """The digits CNN with its head output doubled: same argmax, but ``head``'s output is not the
    model's output, so the fast path must be refused."""

    def __init__(self, base: DigitsCNN) -> None:
        super().__init__()
        self.head = base.head  # registered first, so named_modules() lists it as "head"
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_features(self.base, x)) * 2


class Constant(nn.Module):
    """Always the same logits (class 0): accuracy = share of class 0, i.e. chance."""

    def __init__(self, fill: float = 0.0) -> None:
        super().__init__()
        self.head = nn.Linear(4, 10)
        self.fill = fill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 10)
        logits[:, 0] = 1.0
        return logits + self.fill + 0 * self.head(torch.zeros(x.shape[0], 4))


class SqrtNet(nn.Module):
    """Finite clean logits; noise at ``feat`` makes the square root NaN."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.feat = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.feat(x.flatten(1) + 1.0)  # >= 1 clean
        return self.base(f.sqrt().view_as(x) - 1.0)


def _independent_drop(
    model: nn.Module, c: Calibration, x: torch.Tensor, y: torch.Tensor, passes: int
) -> tuple[float, float]:
    """Drop measured with a fresh wrapper (seed 12345 ≠ the calibration's) over ``passes`` noisy
    passes, and its Monte-Carlo standard error sqrt(Σ p_i(1-p_i) / passes) / N."""
    defended = randfeat.wrap(model, **c.wrap_kwargs(), seed=12345)
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).double().mean())
        hits = torch.stack([(defended(x).argmax(1) == y).double() for _ in range(passes)])
    defended.unwrap()
    p = hits.mean(0)
    se = float((p * (1 - p)).sum().sqrt()) / (len(y) * math.sqrt(passes))
    return clean - float(p.mean()), se


# ---------------------------------------------------------------------------- the key test
@pytest.mark.parametrize(("layer", "draws"), [("head.pre", None), ("input", 8)])
@pytest.mark.slow
def test_calibrated_nu_gives_the_target_drop_on_fresh_noise(
    digits: Digits, digits_model: DigitsCNN, layer: str, draws: int | None
) -> None:
    """Calibrate on the digits test set (540 images, seed 0), then re-measure the drop on the SAME
    images with a fresh ``randfeat.wrap(..., seed=12345)`` over 30 noisy passes (16,200 draws).

    Tolerance: the brief's one point (0.01). Arithmetic: both estimates are Monte-Carlo means over
    the same images, SE = sqrt(Σ p_i(1-p_i)/draws)/N. Measured: head.pre (38 draws) SE_cal ≈ 0.0011,
    SE_check ≈ 0.0012 → |difference| has SE ≈ 0.0016; add tol = 0.001: one point is ≈ 5.6 SE.
    input (8 draws) SE_cal ≈ 0.0027, SE_check ≈ 0.0014 → SE ≈ 0.003; one point ≈ 3 SE. We also
    check the calibration's own estimate against the independent one at 4 SE of the difference.
    """
    x, y = digits.x_test, digits.y_test
    results = calibrate_nu(
        digits_model, (x, y), layer, [0.02, 0.04], seed=0, draws=draws, progress=False
    )
    assert isinstance(results, list) and len(results) == 2
    assert results[0].nu < results[1].nu
    for c in results:
        assert c.fast_path is (layer == "head.pre")
        drop, se_check = _independent_drop(digits_model, c, x, y, passes=30)
        assert abs(drop - c.target_drop) <= 0.01, (layer, c.target_drop, drop, c.nu)
        se_cal = se_check * math.sqrt(30 / c.draws)  # same p_i, c.draws draws instead of 30
        assert abs(drop - c.drop) <= 4 * math.hypot(se_cal, se_check) + c.tol


# ---------------------------------------------------------------------------- search properties
def test_history_is_monotone_under_common_random_numbers(
    digits: Digits, digits_model: DigitsCNN
) -> None:
    """Labels = the model's own predictions, so every image is clean-correct and, for the linear
    head, each draw stays correct on an interval [0, s*) of √ν (convexity): the estimated accuracy
    is exactly non-increasing in ν. Without common random numbers it would jitter by ~SE."""
    x = digits.x_test
    with torch.no_grad():
        y = digits_model(x).argmax(1)
    # tol below the resolution: bisect until neighbouring candidates differ by a few draws, where
    # independent noise per candidate (no CRN) would make the estimate jitter up and down.
    # 540 images × 38 draws = 20,520 draws: no target is a whole number of draws (205.2, 615.6,
    # 2,257.2), so none can be hit exactly and every search must end at the resolution.
    c = calibrate_nu(
        digits_model, (x, y), "head.pre", [0.01, 0.03, 0.11], seed=1, tol=1e-9, progress=False
    )
    assert all(r.stopped == "resolution" for r in c)
    history = sorted(c[0].history)
    assert len(history) >= 20
    accs = [a for _, a in history]
    assert all(a1 >= a2 for a1, a2 in itertools.pairwise(accs)), history
    assert c[0].base_accuracy == 1.0


@settings(max_examples=5, deadline=None)
@given(target=st.floats(0.005, 0.08))
def test_search_returns_the_best_candidate_and_stops_honestly(
    digits: Digits, digits_model: DigitsCNN, target: float
) -> None:
    x, y = digits.x_test[:300], digits.y_test[:300]
    c = calibrate_nu(digits_model, (x, y), "head.pre", target, seed=3, progress=False)
    assert isinstance(c, Calibration)
    assert c.draws == min(64, math.ceil(20000 / 300)) and c.resolution == 1 / (300 * c.draws)
    assert c.tol == 0.001
    need = c.base_accuracy - target
    assert dict(c.history)[c.nu] == c.accuracy
    assert abs(c.accuracy - need) == min(abs(a - need) for _, a in c.history)
    assert math.isclose(c.drop, c.base_accuracy - c.accuracy)
    if c.stopped == "tol":
        assert abs(c.drop - target) <= c.tol
    else:
        assert c.stopped == "resolution"
    assert 0 < c.nu < math.inf


# ---------------------------------------------------------------------------- fast path / fallback
def test_fast_path_cost_is_one_clean_pass_plus_one_projection(
    digits: Digits, digits_model: DigitsCNN
) -> None:
    x, y = digits.x_test, digits.y_test
    cs = calibrate_nu(digits_model, (x, y), "penultimate", [0.01, 0.02, 0.04], progress=False)
    n, d = len(y), cs[0].draws
    assert all(c.path == "projected" and c.layers == ("head.pre",) for c in cs)
    assert all(c.model_evals == n for c in cs)  # exactly one clean pass for three targets
    # the verification re-runs the head once per image, then N·draws noise vectors are projected
    # through it once: no candidate runs the head
    assert all(c.head_evals == n + n * d for c in cs)
    assert cs[0].history == cs[2].history  # one search, shared by every target
    assert len({c.nu for c in cs}) == 3


def test_post_processed_head_output_refuses_the_fast_path(
    digits: Digits, digits_model: DigitsCNN
) -> None:
    """``forward`` returns ``head(h) * 2``: same predictions, but not the head's output."""
    x, y = digits.x_test[:200], digits.y_test[:200]
    model = PostProcessed(digits_model).eval()
    c = calibrate_nu(model, (x, y), "head.pre", 0.03, seed=0, draws=2, progress=False)
    assert isinstance(c, Calibration)
    assert not c.fast_path and c.head_evals == 0
    assert c.model_evals == 200 + len(c.history) * 200 * 2
    assert c.stopped == "resolution" or abs(c.drop - 0.03) <= c.tol


@pytest.mark.parametrize(
    ("name", "layer"), [("resnet18", "fc.pre"), ("vit_tiny_patch16_224", "head.pre")]
)
def test_timm_classifier_inputs_take_the_verified_fast_path(name: str, layer: str) -> None:
    kw: dict[str, Any] = {"pretrained": False, "num_classes": 5}
    if "vit" in name:
        kw["img_size"] = 32
    torch.manual_seed(0)
    model = timm.create_model(name, **kw).eval()
    x = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)  # labels = clean predictions: base accuracy 100%
    c = calibrate_nu(model, (x, y), layer, 0.1, seed=0, progress=False)
    assert isinstance(c, Calibration)
    assert c.fast_path and c.model_evals == 40 and c.base_accuracy == 1.0


def test_input_and_several_layers_fall_back_to_full_forwards(
    digits: Digits, digits_model: DigitsCNN
) -> None:
    x, y = digits.x_test[:200], digits.y_test[:200]
    for layers in (["input"], ["fc1", "head.pre"]):
        c = calibrate_nu(digits_model, (x, y), layers, 0.04, seed=0, draws=2, progress=False)
        assert isinstance(c, Calibration)
        assert not c.fast_path and c.layers == tuple(layers)
        assert (
            isinstance(c.covariance, float) and c.covariance == c.nu
        )  # one shared ν for every layer
        assert c.model_evals == 200 + len(c.history) * 200 * 2
        defended = randfeat.wrap(digits_model, layers=c.layers, nu=c.nu_for_wrap, seed=0)
        assert defended.nu == c.nu
        defended.unwrap()


def test_feature_variance_covariance_is_nu_times_the_per_feature_variance(
    digits: Digits, digits_model: DigitsCNN
) -> None:
    x, y = digits.x_test, digits.y_test
    c = calibrate_nu(
        digits_model, (x, y), "head.pre", 0.02, seed=0, noise="feature-variance", progress=False
    )
    assert isinstance(c, Calibration) and c.fast_path and c.noise == "feature-variance"
    assert isinstance(c.covariance, type(c.nu_for_wrap)) and not isinstance(c.covariance, float)
    sigma = c.covariance["head.pre"]
    with torch.no_grad():
        var = _features(digits_model, x).var(0, unbiased=False)
    assert sigma.shape == (128,)
    torch.testing.assert_close(sigma, c.nu * var, rtol=1e-4, atol=1e-6)
    with pytest.raises(TypeError):
        c.covariance["head.pre"] = sigma  # type: ignore[index]  # read-only
    copy = pickle.loads(pickle.dumps(c))  # results can be saved
    assert copy.nu == c.nu and torch.equal(copy.covariance["head.pre"], sigma)
    defended = randfeat.wrap(digits_model, **c.wrap_kwargs())
    assert defended(x).shape == (540, 10)
    defended.unwrap()
    # a conv layer's Σ has the feature's shape without the batch dimension
    c2 = calibrate_nu(
        digits_model, (x[:100], y[:100]), ["conv2"], 0.05, seed=0, draws=1,
        noise="feature-variance", progress=False,
    )  # fmt: skip
    assert isinstance(c2, Calibration) and c2.covariance["conv2"].shape == (64, 8, 8)  # type: ignore[index]
    # the old name still answers, with a DeprecationWarning that names the new one
    with pytest.warns(DeprecationWarning, match=r"Calibration\.covariance"):
        old = c2.sigma
    assert old is c2.covariance


# ---------------------------------------------------------------------------- data and seeds
def test_dataloader_equals_tensor_pair(digits: Digits, digits_model: DigitsCNN) -> None:
    x, y = digits.x_test[:256], digits.y_test[:256]
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)
    for layer, draws in (("head.pre", None), ("input", 2)):
        a = calibrate_nu(digits_model, (x, y), layer, 0.03, seed=5, draws=draws, batch_size=64,
                         progress=False)  # fmt: skip
        b = calibrate_nu(digits_model, loader, layer, 0.03, seed=5, draws=draws, batch_size=64,
                         progress=False)  # fmt: skip
        gen = calibrate_nu(digits_model, iter(loader), layer, 0.03, seed=5, draws=draws,
                           batch_size=64, progress=False)  # fmt: skip
        assert isinstance(a, Calibration) and isinstance(b, Calibration)
        assert isinstance(gen, Calibration)
        assert a.nu == b.nu == gen.nu and a.history == b.history == gen.history


def test_shuffled_dataloader_is_refused_on_the_fallback(
    digits: Digits, digits_model: DigitsCNN
) -> None:
    x, y = digits.x_test[:128], digits.y_test[:128]
    loader = DataLoader(
        TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    with pytest.raises(ValueError, match="same batches"):
        calibrate_nu(digits_model, loader, "input", 0.03, seed=0, draws=1, progress=False)


def test_seed_reproducibility_and_os_entropy(digits: Digits, digits_model: DigitsCNN) -> None:
    x, y = digits.x_test[:300], digits.y_test[:300]
    a, b = (calibrate_nu(digits_model, (x, y), seed=7, progress=False) for _ in range(2))
    assert isinstance(a, Calibration) and isinstance(b, Calibration)
    assert a.nu == b.nu and a.history == b.history and a.seed == 7
    u, v = (calibrate_nu(digits_model, (x, y), progress=False) for _ in range(2))
    assert isinstance(u, Calibration) and isinstance(v, Calibration)
    assert u.seed is None and u.history != v.history


def test_progress_bar_and_missing_tqdm(
    digits: Digits, digits_model: DigitsCNN, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = digits.x_test[:100], digits.y_test[:100]
    c1 = calibrate_nu(digits_model, (x, y), "head.pre", 0.05, seed=0, progress=True)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails: degrade to no bar
    c2 = calibrate_nu(digits_model, (x, y), "head.pre", 0.05, seed=0, progress=True)
    assert isinstance(c1, Calibration) and isinstance(c2, Calibration) and c1.nu == c2.nu


def test_no_hooks_are_left_behind(digits: Digits, digits_model: DigitsCNN) -> None:
    """Capture hooks and the fallback's wrapper are removed after success and after errors."""

    def hooks(model: nn.Module) -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    x, y = digits.x_test[:100], digits.y_test[:100]
    before = hooks(digits_model)
    calibrate_nu(digits_model, (x, y), ["fc1", "head.pre"], 0.05, seed=0, draws=1, progress=False)
    assert hooks(digits_model) == before
    bad_labels = y.clone()
    bad_labels[-1] = 10  # raises in the clean pass, after the first batches ran
    with pytest.raises(ValueError):
        calibrate_nu(digits_model, (x, bad_labels), "head.pre", batch_size=32, progress=False)
    assert hooks(digits_model) == before
    sqrt_net = SqrtNet(digits_model).eval()
    with pytest.raises(ValueError):  # raises during the noisy passes
        calibrate_nu(sqrt_net, (x, y), "feat", 0.5, seed=0, draws=1, progress=False)
    assert hooks(sqrt_net) == before


def test_default_layer_is_penultimate_as_in_wrap() -> None:
    """An nn.Sequential has no `head`: `calibrate_nu(model, data)` must work like `wrap(model)`."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=gen)
    y = (x[:, 1] > x[:, 0]).long()  # the identity "logits" classify perfectly
    seq = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)).eval()
    with torch.no_grad():
        for lin in seq:
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
    c = calibrate_nu(seq, (x, y), target_drop=0.05, seed=0, progress=False)
    assert isinstance(c, Calibration) and c.layers == ("1.pre",)
    explicit = calibrate_nu(seq, (x, y), "1.pre", 0.05, seed=0, progress=False)
    assert isinstance(explicit, Calibration) and c.nu == explicit.nu
    assert randfeat.wrap(seq, **c.wrap_kwargs()).layers == ["1.pre"]


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("bad", "error"),
    [(0.0, ValueError), (-0.01, ValueError), (1.0, ValueError), (1.5, ValueError),
     (math.nan, ValueError), ([], ValueError), (True, TypeError), ("0.02", TypeError)],
)  # fmt: skip
def test_bad_target_drop(
    digits: Digits, digits_model: DigitsCNN, bad: object, error: type[Exception]
) -> None:
    x, y = digits.x_test[:50], digits.y_test[:50]
    with pytest.raises(error, match="`target_drop`"):
        calibrate_nu(digits_model, (x, y), target_drop=bad, progress=False)  # type: ignore[call-overload]


def test_target_at_or_above_base_accuracy(digits: Digits, digits_model: DigitsCNN) -> None:
    x, y = digits.x_test, digits.y_test
    with pytest.raises(ValueError, match=r"target_drop.*base accuracy"):
        calibrate_nu(digits_model, (x, y), target_drop=[0.02, 0.99], progress=False)


def test_unreachable_target_is_an_error_not_a_silent_nu(
    digits: Digits, digits_model: DigitsCNN
) -> None:
    """Huge noise leaves ~chance accuracy (> 0.05 here), so a 93-point drop is unreachable."""
    x, y = digits.x_test[:200], digits.y_test[:200]
    with pytest.raises(ValueError, match="Cannot reach"):
        calibrate_nu(digits_model, (x, y), target_drop=0.93, seed=0, progress=False)


def test_bad_data(digits: Digits, digits_model: DigitsCNN) -> None:
    x, y = digits.x_test[:50], digits.y_test[:50]
    with pytest.raises(ValueError, match="empty"):
        calibrate_nu(digits_model, (x[:0], y[:0]), progress=False)
    with pytest.raises(ValueError, match="empty"):
        calibrate_nu(digits_model, [], progress=False)
    with pytest.raises(ValueError, match=r"lie in \[0, 10\)"):
        calibrate_nu(digits_model, (x, y + 10), progress=False)
    with pytest.raises(ValueError, match=r"lie in \[0, 10\)"):
        calibrate_nu(digits_model, (x, y - 1), progress=False)
    with pytest.raises(TypeError, match="integer tensor"):
        calibrate_nu(digits_model, (x, y.float()), progress=False)
    with pytest.raises(ValueError, match="x of shape"):
        calibrate_nu(digits_model, (x, y[:-1]), progress=False)
    with pytest.raises(TypeError, match="`data`"):
        calibrate_nu(digits_model, x, progress=False)
    with pytest.raises(TypeError, match="`data`"):
        calibrate_nu(digits_model, [x], progress=False)  # type: ignore[list-item]


def test_model_at_chance_and_nan_logits(digits: Digits, digits_model: DigitsCNN) -> None:
    x, y = digits.x_test, digits.y_test
    with pytest.raises(ValueError, match="better than chance"):  # accuracy ≈ 0.1 = 1/K
        calibrate_nu(Constant(), (x, y), "head.pre", progress=False)
    with pytest.raises(ValueError, match="finite logits"):
        calibrate_nu(Constant(fill=math.nan), (x, y), "head.pre", progress=False)
    with pytest.raises(ValueError, match="NaN"):  # finite clean, NaN under noise
        calibrate_nu(
            SqrtNet(digits_model).eval(), (x, y), "feat", 0.5, seed=0, draws=1, progress=False
        )


def test_bad_arguments(digits: Digits, digits_model: DigitsCNN) -> None:
    x, y = digits.x_test[:50], digits.y_test[:50]
    data = (x, y)
    with pytest.raises(ValueError, match="Unknown layer spec"):
        calibrate_nu(digits_model, data, "hed.pre", progress=False)
    with pytest.raises(ValueError, match="`noise`"):
        calibrate_nu(digits_model, data, noise="gaussian", progress=False)  # type: ignore[call-overload]
    for name, value in (("draws", 0), ("batch_size", 0), ("tol", 0.0), ("tol", 2.0)):
        with pytest.raises(ValueError, match=f"`{name}`"):
            calibrate_nu(digits_model, data, progress=False, **{name: value})  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="`seed`"):
        calibrate_nu(digits_model, data, seed="0", progress=False)  # type: ignore[call-overload]
    wrapped = randfeat.wrap(digits_model, ["head.pre"], nu=0.1, seed=0)
    with pytest.raises(TypeError, match="RandomizedFeatureWrapper"):
        calibrate_nu(wrapped, data, progress=False)
    wrapped.unwrap()
    with pytest.raises(ValueError, match="constant"):
        calibrate_nu(Constant(), (x, torch.zeros_like(y)), "head.pre", noise="feature-variance",
                     progress=False)  # fmt: skip


def test_public_api() -> None:
    assert {"calibrate_nu", "Calibration"} <= set(randfeat.__all__)
