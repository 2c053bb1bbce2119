"""The paper's grids by name: [PRESETS][randfeat.eval.grid.presets.PRESETS] (`--preset`).

A preset fills in the settings of one of the paper's tables (Nguyen et al., ICLR 2024, §5,
Tables 1–2) and leaves the model and the data path to the user: it names the models the table
covers and the data set it needs. Settings come from, in increasing priority: the defaults, the
preset, `--config FILE.toml` and the flags.

To add a preset, add one [Preset][randfeat.eval.grid.presets.Preset] to `_PRESETS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["PAPER_ATTACKS", "PRESETS", "Preset"]

PAPER_ATTACKS = ("square-linf", "nes-linf", "signhunter-linf", "rays", "signflip")
"""The paper's five attacks (§5): three score-based (ℓ∞), two decision-based."""


@dataclass(frozen=True)
class Preset:
    """One of the paper's grids.

    Attributes:
        name: the `--preset` name.
        models: the `--model` names the table covers (one result file each).
        data: the data set it needs (`--data <data>:PATH`).
        settings: the settings it sets (keys of [EvalConfig][randfeat.eval.grid.config.EvalConfig]).
    """

    name: str
    models: tuple[str, ...]
    data: str
    settings: Mapping[str, object]


_PAPER_MODELS = ("vgg19", "resnet50", "vit_base_patch16_224", "deit_base_patch16_224")

_PRESETS = (
    Preset(
        "paper-imagenet",
        _PAPER_MODELS,
        "imagenet",
        {
            "pretrained": True,
            "n_images": 1000,
            "budgets": "1000,10000",
            "defenses": "base,input,feature,aaa",
            "target_drop": "0.01,0.02",
            "attacks": ",".join(PAPER_ATTACKS),
            "eps": 0.05,
            "eps_l2": 5.0,
            "votes": 9,
        },
    ),
    Preset(
        # The paper fine-tunes these at 224×224 (§5 "Models"): give the weights with --checkpoint.
        "paper-cifar10",
        _PAPER_MODELS,
        "cifar10",
        {
            "image_size": 224,
            "num_classes": 10,
            "n_images": 1000,
            "budgets": "1000,10000",
            "defenses": "base,input,feature,aaa",
            # Table 2: CIFAR-10 defenses are compared at ≈2% and ≈4% drops (ImageNet: 1%, 2%).
            "target_drop": "0.02,0.04",
            "attacks": ",".join(PAPER_ATTACKS),
            "eps": 0.05,
            "eps_l2": 5.0,
            "votes": 9,
        },
    ),
    Preset(
        # The paper's protocol on 28×28 images: the radii of docs/evaluation.md ("Radii on
        # Fashion-MNIST"), a third, larger drop, and the adaptive EOT-Square beside the five.
        "paper-fashion",
        ("fashion-cnn", "resnet18"),
        "fashion-mnist",
        {
            "n_images": 1000,
            "budgets": "1000,10000",
            "defenses": "base,input,feature",
            "target_drop": "0.01,0.02,0.04",
            "attacks": ",".join((*PAPER_ATTACKS, "eot-square-linf")),
            "eps": 0.1,
            "eps_l2": 1.5,
            "votes": 9,
        },
    ),
)

PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in _PRESETS})
"""The paper's grids: `paper-imagenet` (Table 1), `paper-cifar10` (Table 2) and `paper-fashion`
(the same protocol on Fashion-MNIST: `fashion-cnn`, or `resnet18` with a `randfeat train`
checkpoint)."""
