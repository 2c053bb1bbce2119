"""Where `randfeat eval --model NAME` gets its model: [MODEL_SOURCES][randfeat.eval.models.sources.MODEL_SOURCES].

A [ModelSource][randfeat.eval.models.sources.ModelSource] claims the names it can load, checks a
name before any work is spent, and loads the model as a callable from images in $[0, 1]$ to
logits. [model_source][randfeat.eval.models.sources.model_source] picks the first source that
claims a name: `digits-cnn` and `fashion-cnn` (embedded, trained on first use), `hf:PATH` (a
saved `transformers` image classifier), else timm.

To add a model source, write its loader and add one `ModelSource` to `_SOURCES` (before timm,
which claims every other name).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from randfeat.eval.errors import ConfigError
from randfeat.eval.models.digits import DigitsCNN, digits_cnn
from randfeat.eval.models.fashion import FashionCNN, fashion_cnn
from randfeat.eval.models.hf_models import load_hf
from randfeat.eval.models.timm_models import load_timm

__all__ = ["MODEL_SOURCES", "ModelRequest", "ModelSource", "model_source"]


@dataclass(frozen=True)
class ModelRequest:
    """What the configuration asks of a model.

    Attributes:
        name: the `--model` name.
        pretrained: load the source's pretrained weights.
        checkpoint: a local `state_dict` file.
        num_classes: classifier outputs (None: the model's own).
        data_path: the local path of `--data` (models trained on first use read their
            training images there; None: the data set's default place).
    """

    name: str
    pretrained: bool = False
    checkpoint: str | None = None
    num_classes: int | None = None
    data_path: str | None = None


@dataclass(frozen=True)
class ModelSource:
    """One place models come from.

    Attributes:
        name: the source's name (`digits-cnn`, `timm`).
        usage: what `--model` takes from it, for messages.
        claims: whether a `--model` name is this source's.
        check: raise [ConfigError][randfeat.eval.errors.ConfigError] on a name it cannot load
            (listing close matches), before any work is spent.
        load: the model, in eval mode, taking images in $[0, 1]$.
        data: the only data sets it takes (None: any).
        pretrained: whether `--pretrained` means anything for it.
        native_size: its own input side, for data sets that default to it (None: unknown).
    """

    name: str
    usage: str
    claims: Callable[[str], bool]
    check: Callable[[str], None]
    load: Callable[[ModelRequest], nn.Module]
    data: tuple[str, ...] | None = None
    pretrained: bool = True
    native_size: Callable[[nn.Module], int | None] = lambda model: None


def _load_digits(req: ModelRequest) -> nn.Module:
    if req.checkpoint is None:
        return digits_cnn()
    return _load_state(DigitsCNN(req.num_classes or 10, generator=torch.Generator()), req)


def _load_fashion(req: ModelRequest) -> nn.Module:
    if req.checkpoint is None:
        try:
            return fashion_cnn(root=req.data_path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"Cannot train fashion-cnn: {err}") from err
    return _load_state(FashionCNN(req.num_classes or 10, generator=torch.Generator()), req)


def _load_state(model: nn.Module, req: ModelRequest) -> nn.Module:
    """`model` with the weights of `req.checkpoint` (a plain state_dict), in eval mode."""
    try:
        model.load_state_dict(
            torch.load(str(req.checkpoint), map_location="cpu", weights_only=True)
        )
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        raise ConfigError(f"Cannot load --checkpoint {req.checkpoint!r}: {err}") from err
    return model.eval()


def _check_timm(name: str) -> None:
    import timm

    known = timm.list_models()
    if name.split(".")[0] in known:  # timm also takes "arch.tag"
        return
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ConfigError(
        f"Unknown model {name!r}.{hint} Valid models: 'digits-cnn', 'fashion-cnn', 'hf:PATH' or any of the {len(known)} "
        "names in timm.list_models() (e.g. resnet50, vgg19, vit_base_patch16_224, "
        "deit_base_patch16_224)."
    )


def _load_timm(req: ModelRequest) -> nn.Module:
    try:
        return load_timm(
            req.name,
            pretrained=req.pretrained,
            checkpoint=req.checkpoint,
            num_classes=req.num_classes,
        )
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        raise ConfigError(f"Cannot load model {req.name!r}: {err}") from err
    except Exception as err:  # e.g. no network for pretrained weights: say what to do
        raise ConfigError(
            f"Cannot create timm model {req.name!r} (pretrained={req.pretrained}): "
            f"{type(err).__name__}: {err}. Offline, pass --checkpoint PATH instead."
        ) from err


def _hf_path(name: str) -> Path:
    return Path(name.removeprefix("hf:")).expanduser()


def _check_hf(name: str) -> None:
    path = _hf_path(name)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"--model {name}: {str(path)!r} holds no config.json. Give the directory a "
            "transformers image classifier was saved to (save_pretrained); nothing is downloaded."
        )


def _load_hf(req: ModelRequest) -> nn.Module:
    if req.pretrained or req.checkpoint:
        raise ConfigError(
            f"--model {req.name} loads its own weights: drop --pretrained/--checkpoint."
        )
    try:
        return load_hf(_hf_path(req.name), num_classes=req.num_classes)
    except (ImportError, ValueError) as err:
        raise ConfigError(f"Cannot load --model {req.name}: {err}") from err


def _timm_native_size(model: nn.Module) -> int | None:
    inner = getattr(model, "model", model)
    size = getattr(inner, "pretrained_cfg", {}).get("input_size")
    return int(size[-1]) if size else None


_SOURCES = (
    ModelSource(
        "digits-cnn",
        "'digits-cnn' (embedded, trained on first use)",
        claims=lambda name: name == "digits-cnn",
        check=lambda name: None,
        load=_load_digits,
        data=("digits",),
        pretrained=False,
    ),
    ModelSource(
        "fashion-cnn",
        "'fashion-cnn' (embedded, trained on first use on Fashion-MNIST)",
        claims=lambda name: name == "fashion-cnn",
        check=lambda name: None,
        load=_load_fashion,
        data=("fashion-mnist",),
        pretrained=False,
    ),
    ModelSource(
        "hf",
        "'hf:PATH' (a saved transformers image classifier)",
        claims=lambda name: name.startswith("hf:"),
        check=_check_hf,
        load=_load_hf,
        pretrained=False,
        native_size=lambda model: getattr(model, "image_size", None),
    ),
    ModelSource(
        "timm",
        "a timm model name, e.g. resnet50",
        claims=lambda name: True,
        check=_check_timm,
        load=_load_timm,
        native_size=_timm_native_size,
    ),
)

MODEL_SOURCES: tuple[ModelSource, ...] = _SOURCES
"""The model sources, in the order they are asked to claim a `--model` name."""


def model_source(name: str) -> ModelSource:
    """The first source in [MODEL_SOURCES][randfeat.eval.models.sources.MODEL_SOURCES] that
    claims `name` (timm claims every name no other source does)."""
    return next(s for s in MODEL_SOURCES if s.claims(name))
