"""`hf:PATH` models: a saved transformers image classifier on images in [0, 1], offline.

The classifiers are tiny random ViTs built and saved in the test (nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from randfeat.eval.errors import ConfigError
from randfeat.eval.models.hf_models import HFClassifier, load_hf
from randfeat.eval.models.sources import ModelRequest, model_source

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ViT for 32×32 images, 10 classes, saved with its image processor."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=10,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("vit")
    transformers.ViTForImageClassification(config).eval().save_pretrained(path)
    processor = transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3]
    )
    processor.save_pretrained(path)
    return path


def test_the_processor_normalisation_is_folded_in_and_logits_come_out(vit_dir: Path) -> None:
    model = load_hf(vit_dir)
    assert isinstance(model, HFClassifier) and not model.training and model.image_size == 32
    x = torch.rand(3, 3, 32, 32)
    mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model.model(pixel_values=(x - mean) / std).logits
        got = model(x)
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, want)
    assert model.get_classifier() is model.model.classifier


def test_the_hf_source_claims_hf_names_and_checks_them(vit_dir: Path, tmp_path: Path) -> None:
    source = model_source(f"hf:{vit_dir}")
    assert source.name == "hf" and model_source("resnet18").name == "timm"
    source.check(f"hf:{vit_dir}")
    with pytest.raises(ConfigError, match=r"holds no config\.json"):
        source.check(f"hf:{tmp_path}")
    with pytest.raises(ConfigError, match="has 10 classes, not --num-classes 5"):
        source.load(ModelRequest(f"hf:{vit_dir}", num_classes=5))
    with pytest.raises(ConfigError, match="drop --pretrained"):
        source.load(ModelRequest(f"hf:{vit_dir}", pretrained=True))
    assert source.native_size(source.load(ModelRequest(f"hf:{vit_dir}"))) == 32


def test_randfeat_serve_serves_an_hf_model_with_feature_noise(vit_dir: Path, serve: Any) -> None:
    from randfeat.cli.served_model import ModelSpec, build

    model, card = build(ModelSpec(model=f"hf:{vit_dir}", nu=0.5))
    assert card.input_shape == (3, 32, 32) and card.classes == 10
    assert card.layers == ("model.classifier.pre",)
    url = serve(model, card)
    x = np.full((2, 3, 32, 32), 0.5, np.float32)
    scores = [np.asarray(httpx.post(url + "/v1/predict", json={"inputs": x.tolist()}).json()["scores"])
              for _ in range(2)]  # fmt: skip
    assert scores[0].shape == (2, 10) and not np.allclose(scores[0], scores[1])
