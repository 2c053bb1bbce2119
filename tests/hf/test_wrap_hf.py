"""Hugging Face transformers image classifiers, wrapped as they are (tiny random configs, no download).

`penultimate` resolves to the input of the model's `classifier`, the wrapper returns the model's own
output object with logits computed from the noisy features, and calibration, Theorem 1 and the
attacks read the logits through `randfeat.outputs.logits_of`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import randfeat
from randfeat.eval.attacks import RayS, Square
from randfeat.layers import find_classifier
from randfeat.outputs import logits_of

transformers = pytest.importorskip("transformers")

CLASSES = 5


def vit() -> nn.Module:
    return transformers.ViTForImageClassification(
        transformers.ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=CLASSES,
        )
    )


def convnext() -> nn.Module:
    return transformers.ConvNextForImageClassification(
        transformers.ConvNextConfig(
            num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=CLASSES
        )
    )


def resnet() -> nn.Module:
    return transformers.ResNetForImageClassification(
        transformers.ResNetConfig(
            embedding_size=8,
            hidden_sizes=[8, 16],
            depths=[1, 1],
            layer_type="basic",
            num_labels=CLASSES,
        )
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "vit": (vit, "classifier.pre"),
    "convnext": (convnext, "classifier.pre"),
    "resnet": (resnet, "classifier.1.pre"),  # classifier = Sequential(Flatten, Linear)
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]().eval()


def images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_penultimate_is_the_classifier_input_and_the_output_object_is_kept(name: str) -> None:
    model = build(name)
    w = randfeat.wrap(model, nu=0.1)
    assert w.layers == [MODELS[name][1]]
    x = images(4)
    with torch.no_grad():
        clean = model(x)
        out = w(x)
        assert type(out) is type(clean)  # e.g. ImageClassifierOutput
        assert out.logits.shape == clean.logits.shape == (4, CLASSES)
        assert not torch.allclose(out.logits, clean.logits)
        assert torch.equal(model(x).logits, clean.logits)  # the bare model stays clean
        with w.noise_disabled():
            assert torch.equal(w(x).logits, clean.logits)
        assert w.predict(x, votes=3).shape == (4,)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_noisy_logits_have_the_calibrated_variance(name: str) -> None:
    """Noise δ ~ N(0, ν I) at the classifier's input W changes the logits by Wδ:
    E‖Wδ‖² = ν‖W‖²_F, SE of the mean of n rows = ν·sqrt(2‖W Wᵀ‖²_F / n); accept 5 SE."""
    model = build(name)
    nu = 0.05
    w = randfeat.wrap(model, nu=nu)
    x = images(1).expand(600, -1, -1, -1)
    with torch.no_grad():
        sq = (logits_of(w(x)) - logits_of(model(x))).double().pow(2).sum(dim=1)
    weight = find_classifier(model)[1].weight.detach().double()
    expected = nu * weight.pow(2).sum().item()
    se = nu * math.sqrt(2 * (weight @ weight.T).pow(2).sum().item() / sq.numel())
    assert abs(sq.mean().item() - expected) < 5 * se


@pytest.mark.parametrize("name", sorted(MODELS))
def test_calibration_theorem1_and_attacks_accept_output_objects(name: str) -> None:
    model = build(name)
    x = images(200)
    with torch.no_grad():
        y = model(x).logits.argmax(1)  # the model's own labels: clean accuracy 1
    cal = randfeat.calibrate_nu(model, (x, y), target_drop=0.1, seed=0, progress=False)
    assert cal.layers == (MODELS[name][1],)
    assert cal.fast_path  # the classifier's output is the output object's .logits
    assert abs(cal.drop - 0.1) <= cal.tol + cal.resolution
    p = randfeat.theorem1_fooling_probability(model, x[:6], y[:6], nu=cal.nu, mu=1e-3)
    assert p.shape == (6,) and bool(((p >= 0) & (p <= 0.5)).all())
    defended = randfeat.wrap(model, **cal.wrap_kwargs())
    for attack in (Square(eps=0.05), RayS(eps=0.05)):
        result = attack.run(defended, x[:3], y[:3], budget=10, votes=3, seed=0)
        assert result.queries.shape == (3,) and bool((result.queries <= 10).all())
