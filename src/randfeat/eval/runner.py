"""The evaluation grid of the paper (§5, appendix D): calibrate, attack, append JSONL, resume, shard.

Protocol (Nguyen et al., "Understanding the Robustness of Randomized Feature Defense Against
Query-Based Adversarial Attacks", ICLR 2024, §5): a class-balanced random subset of test images is
attacked under every (defense, attack, budget). The randomized defenses (``input`` = RND,
``feature`` = noise at ``layers``, default the penultimate features) are compared at equal cost:
their ν is calibrated by :func:`randfeat.calibration.calibrate_nu` to each target drop in clean
accuracy, on held-out images disjoint from the attacked ones. Success is decided by the oracle
(a majority of ``votes`` uncharged forwards, appendix D.4), and every returned point is judged
afresh with :func:`randfeat.eval.oracle.rejudge`.

Result file (JSON Lines, UTF-8, one object per line, ``FORMAT_VERSION`` 1)
-------------------------------------------------------------------------
* Line 1: the **header** (``"type": "header"``): the fully resolved configuration (``config``:
  every setting of :class:`EvalConfig`, defaults filled in), package versions, device, world size,
  the ε actually used and where it came from, the data pool, the attacked and calibration image
  indices (dataset indices, disjoint), and for every calibrated defense its ν with the base and
  defended accuracy and the achieved drop on the calibration images. See ``RESULT_SCHEMA["header"]``.
* Then **clean** rows (``"type": "clean"``), one per (attacked image, defense): the defense's
  prediction on the clean image (for a randomized defense, the majority of ``votes`` noisy forwards,
  :meth:`~randfeat.wrapper.RandomizedFeatureWrapper.predict`) and whether it is correct.
* And **attack** rows (``"type": "attack"``), one per (attacked image, defense, attack, budget):
  verified success, queries, the query of the first success, the uncharged verification forwards,
  the distance of the returned point and ``fresh``, the probability that a fresh majority of
  ``votes`` forwards is fooled at the returned point (exactly 0 or 1 for ``base`` and ``aaa``).

Every field is listed with its meaning in :data:`RESULT_SCHEMA`. Rows are written one *unit* at a
time: a unit is one chunk of ``batch_size`` attacked images (chunk ``c`` holds
``attacked_indices[c * batch_size:(c + 1) * batch_size]``) under one (defense, attack, budget), or
under one defense for clean rows. Only the fields in :data:`TIMING_FIELDS` vary between two runs of
the same configuration on the same device; the order of rows may differ after a resume (compare
rows as sets). Every attacked image is attacked, also one the defense misclassifies when clean
(the oracle then usually succeeds at the first query), so robust accuracy at budget ``B`` is
``1 - mean(success)`` over the rows of (defense, attack, ``B``).

Resuming: rerunning the same command on an existing file keeps every complete unit, drops rows of
incomplete units and a line cut off by a crash (rewriting the file atomically), and computes only
the missing units, so nothing is duplicated or lost. A file written with a different configuration
is refused, naming the settings that differ (:data:`NON_RESULT_SETTINGS` are not compared).

Randomness: every unit draws its attack seed and its defense-noise seed
(:meth:`~randfeat.wrapper.RandomizedFeatureWrapper.manual_seed`) from ``seed`` and the unit's
(chunk, defense, attack, budget) with :func:`derive_seed`, so results do not depend on which rank
runs a unit, on how many ranks there are, or on what ran before. The attacked subset, its order
and the calibration subset are drawn the same way.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) rank 0 prepares (reads the file, calibrates),
broadcasts the plan, and units are dealt round-robin; after each round rank 0 gathers the rows
(``gather_object``) and writes them. Backends: NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from randfeat.eval.attacks.base import Attack
from randfeat.eval.oracle import distance, rejudge
from randfeat.wrapper import RandomizedFeatureWrapper

__all__ = [
    "ATTACKS",
    "DATA_KINDS",
    "DEFENSE_KINDS",
    "FORMAT_VERSION",
    "NON_RESULT_SETTINGS",
    "RESULT_SCHEMA",
    "TIMING_FIELDS",
    "ConfigError",
    "EvalConfig",
    "config_differences",
    "derive_seed",
    "load_results",
    "make_attack",
    "run_eval",
]

logger = logging.getLogger(__name__)

FORMAT = "randfeat-eval"
FORMAT_VERSION = 1

PAPER_EPS = {"linf": 0.05, "l2": 5.0}
"""The paper's radii for 224×224 images in ``[0, 1]`` (§5, Tables 1–2)."""
DIGITS_EPS = {"linf": 0.2, "l2": 1.5}
"""Radii for the 8×8 digits: the paper's 0.05 / 5 are meaningless at 64 pixels (ℓ2 5 exceeds the
whole image's range, ℓ∞ 0.05 is under one grey level of 16)."""

DEFENSE_KINDS = ("base", "input", "feature", "aaa")
DATA_KINDS = ("digits", "cifar10", "imagenet")
_BASE_ATTACKS = (
    "square-linf",
    "square-l2",
    "nes-linf",
    "nes-l2",
    "signhunter-linf",
    "signhunter-l2",
    "rays",
    "signflip",
)
ATTACKS = (*_BASE_ATTACKS, *(f"eot-{a}" for a in _BASE_ATTACKS))
"""Every attack name ``--attacks`` accepts; ``eot-<name>`` averages ``eot_m`` forwards a query."""

TIMING_FIELDS = frozenset({"seconds"})
"""Row fields that vary between identical runs (wall-clock time); exclude them when comparing."""
NON_RESULT_SETTINGS = frozenset({"quiet", "out", "device", "preset"})
"""Config settings that do not change results; not compared when resuming."""

RESULT_SCHEMA: dict[str, dict[str, str]] = {
    "header": {
        "type": '"header"',
        "format": f'"{FORMAT}"',
        "format_version": f"int, {FORMAT_VERSION}",
        "config": "object: every EvalConfig setting, resolved (lists for tuples)",
        "settings_not_compared": "list of config keys ignored when resuming",
        "versions": "object: randfeat, torch, timm, python versions",
        "device": "str: the device of rank 0 (e.g. 'cpu', 'cuda:0 (NVIDIA H100)')",
        "world_size": "int: ranks that wrote the file first",
        "created": "str: UTC time the header was written, ISO 8601",
        "eps": "object: linf, l2 (floats used) and source ('user', 'paper default', 'digits default')",
        "data": "object: name, path, pool_size, classes, image_shape [C, H, W]",
        "model": "object: name, parameters (count), image_size",
        "defenses": "list of defense names: base, aaa, input@<drop>, feature@<drop>",
        "attacks": "object: attack name -> {norm, eps, repr}",
        "calibration": (
            "object: defense name -> {kind, layers, target_drop, nu (variance), base_accuracy, "
            "accuracy, drop, n_images, draws, stopped, fast_path, seed, wall_time_s}"
        ),
        "attacked_indices": "list of int: dataset indices attacked, in chunk order",
        "calibration_indices": "list of int: dataset indices used for calibration (disjoint)",
        "n_attacked": "int",
        "n_calibration": "int",
        "n_chunks": "int: chunks of batch_size attacked images",
        "rows_expected": "int: clean + attack rows in a complete file",
    },
    "clean": {
        "type": '"clean"',
        "image": "int: dataset index",
        "label": "int: true label",
        "defense": "str",
        "pred": "int: predicted label (majority of `votes` forwards for randomized defenses)",
        "correct": "bool: pred == label",
        "chunk": "int",
        "seconds": "float: wall time of the whole unit (timing field)",
    },
    "attack": {
        "type": '"attack"',
        "image": "int: dataset index",
        "label": "int: true label",
        "defense": "str",
        "attack": "str: attack name",
        "budget": "int: queries allowed",
        "eps": "float: radius",
        "norm": '"linf" or "l2"',
        "success": "bool: verified by a majority of `votes` forwards (D.4)",
        "queries": "int: queries spent (until success, or all)",
        "success_query": "int: query count at the first verified success, -1 if none",
        "verify_forwards": "int: uncharged verification forwards",
        "fresh": "float: P(fresh majority of `votes` forwards fooled at the returned point)",
        "dist": "float: distance of the returned point from the clean image in `norm`",
        "chunk": "int",
        "seconds": "float: wall time of the whole unit (timing field)",
    },
}
"""Every record type of the result file and what each field means."""


class ConfigError(ValueError):
    """A bad setting, name, path or file: the CLI prints the message and exits with code 2."""


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class EvalConfig:
    """Every setting of one evaluation (the keys of ``--config`` TOML files and of the header).

    Build it with :meth:`from_mapping`, which validates and fills in data-dependent defaults
    (``n_images``: 100 for digits, else 1000 as in the paper; ``eps`` / ``eps_l2``: the paper's
    0.05 / 5, or 0.2 / 1.5 on the 8×8 digits).

    Attributes:
        model, pretrained, checkpoint, num_classes: ``"digits-cnn"`` or a timm name, and how to
            get its weights and classifier size.
        image_size, data: ``"digits"``, ``"cifar10:PATH"`` or ``"imagenet:PATH"`` (ImageFolder),
            resized to ``image_size`` (ImageFolder default: the model's native size).
        n_images, calib_images, calib_draws: attacked images (class-balanced), held-out
            calibration images (default: the rest of the pool, at most 1000) and noise draws per
            calibration image (default: :func:`~randfeat.calibration.calibrate_nu`'s).
        defenses, layers, target_drop: defense kinds (:data:`DEFENSE_KINDS`), the feature
            defense's layer specs, and the clean-accuracy drops ν is calibrated to.
        attacks, budgets, eps, eps_l2, votes, eot_m: the attack grid (:data:`ATTACKS`), query
            budgets, radii, success votes (D.4) and forwards per EOT query.
        fresh_forwards: forwards per image for ``fresh`` (:func:`~randfeat.eval.oracle.rejudge`).
        batch_size, forward_batch: images per unit (chunk), most rows per model forward.
        seed, device, quiet, out, preset: see ``randfeat eval --help``.
        eps_source: where ``eps`` / ``eps_l2`` came from (derived; not a setting).
    """

    model: str = "digits-cnn"
    pretrained: bool = False
    checkpoint: str | None = None
    num_classes: int | None = None
    image_size: int | None = None
    data: str = "digits"
    n_images: int | None = None
    calib_images: int | None = None
    calib_draws: int | None = None
    defenses: tuple[str, ...] = ("base", "input", "feature")
    layers: tuple[str, ...] = ("penultimate",)
    target_drop: tuple[float, ...] = (0.01, 0.02)
    attacks: tuple[str, ...] = ("square-linf", "nes-linf", "signhunter-linf", "rays", "signflip")
    budgets: tuple[int, ...] = (1000, 10000)
    eps: float | None = None
    eps_l2: float | None = None
    votes: int = 9
    eot_m: int = 5
    fresh_forwards: int = 50
    batch_size: int = 100
    forward_batch: int = 1024
    seed: int = 0
    device: str = "auto"
    quiet: bool = False
    out: str = "results.jsonl"
    preset: str | None = None
    eps_source: str = field(default="", compare=False)

    @classmethod
    def keys(cls) -> list[str]:
        """The setting names (``eps_source`` is derived, not a setting)."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "eps_source"]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> EvalConfig:
        """Validate ``values`` (strings or lists for list settings) and fill in the defaults.

        Raises:
            ConfigError: an unknown key, an unknown name (with close matches) or a bad value.
        """
        v = {k.replace("-", "_"): x for k, x in values.items()}
        unknown = sorted(set(v) - set(cls.keys()))
        if unknown:
            raise ConfigError(_unknown("setting", unknown[0], cls.keys()))
        d = cls()
        kind, _ = _split_data(str(v.get("data", d.data)))
        defaults = DIGITS_EPS if kind == "digits" else PAPER_EPS
        source = "user"
        eps = _opt_float(v, "eps", positive=True)
        eps_l2 = _opt_float(v, "eps_l2", positive=True)
        if eps is None or eps_l2 is None:
            source = f"{'digits' if kind == 'digits' else 'paper'} default"
            if eps is not None or eps_l2 is not None:
                source += " (partly user)"
        cfg = cls(
            model=str(v.get("model", d.model)),
            pretrained=_bool(v, "pretrained", d.pretrained),
            checkpoint=None if v.get("checkpoint") is None else str(v["checkpoint"]),
            num_classes=_opt_int(v, "num_classes"),
            image_size=_opt_int(v, "image_size"),
            data=str(v.get("data", d.data)),
            n_images=_opt_int(v, "n_images") or (100 if kind == "digits" else 1000),
            calib_images=_opt_int(v, "calib_images"),
            calib_draws=_opt_int(v, "calib_draws"),
            defenses=_names(v.get("defenses", d.defenses), DEFENSE_KINDS, "defense"),
            layers=_strings(v.get("layers", d.layers), "layers"),
            target_drop=_drops(v.get("target_drop", d.target_drop)),
            attacks=_names(v.get("attacks", d.attacks), ATTACKS, "attack"),
            budgets=_ints(v.get("budgets", d.budgets), "budgets"),
            eps=defaults["linf"] if eps is None else eps,
            eps_l2=defaults["l2"] if eps_l2 is None else eps_l2,
            votes=_opt_int(v, "votes") or d.votes,
            eot_m=_opt_int(v, "eot_m") or d.eot_m,
            fresh_forwards=_opt_int(v, "fresh_forwards") or d.fresh_forwards,
            batch_size=_opt_int(v, "batch_size") or d.batch_size,
            forward_batch=_opt_int(v, "forward_batch") or d.forward_batch,
            seed=_seed(v.get("seed", d.seed)),
            device=str(v.get("device", d.device)),
            quiet=_bool(v, "quiet", d.quiet),
            out=str(v.get("out", d.out)),
            preset=None if v.get("preset") is None else str(v["preset"]),
            eps_source=source,
        )
        names = cfg.defense_names()
        if len(set(names)) != len(names):
            raise ConfigError(
                f"Expected distinct `target_drop` values, but {cfg.target_drop} give the "
                f"defense names {names}."
            )
        _check_model_name(cfg.model)
        if cfg.model == "digits-cnn" and kind != "digits":
            raise ConfigError(
                f"--model digits-cnn takes 8×8 digits only, but --data is {cfg.data!r}. "
                "Use --data digits, or a timm model name for CIFAR-10 / ImageNet."
            )
        if cfg.model != "digits-cnn" and kind == "digits":
            raise ConfigError(
                f"--data digits (1×8×8 images) needs --model digits-cnn, but got {cfg.model!r}."
            )
        if cfg.model == "digits-cnn" and cfg.pretrained:
            raise ConfigError("--pretrained is for timm models; digits-cnn is always trained.")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (tuples become lists)."""
        return {k: (list(x) if isinstance(x, tuple) else x) for k, x in self._items()}

    def _items(self) -> Iterator[tuple[str, Any]]:
        for k in self.keys():
            yield k, getattr(self, k)

    def defense_names(self) -> list[str]:
        """``base``, ``aaa``, and ``input@<drop>`` / ``feature@<drop>`` for every target drop."""
        out: list[str] = []
        for kind in self.defenses:
            if kind in ("input", "feature"):
                out += [f"{kind}@{t:g}" for t in self.target_drop]
            else:
                out.append(kind)
        return out


def _check_model_name(name: str) -> None:
    """``digits-cnn`` or a timm model name (``arch`` or ``arch.tag``), else a ConfigError."""
    if name == "digits-cnn":
        return
    import timm

    known = timm.list_models()
    if name.split(".")[0] in known:
        return
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ConfigError(
        f"Unknown model {name!r}.{hint} Valid models: 'digits-cnn' or any of the {len(known)} "
        "names in timm.list_models() (e.g. resnet50, vgg19, vit_base_patch16_224, "
        "deit_base_patch16_224)."
    )


def _unknown(what: str, name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"Unknown {what} {name!r}.{hint} Valid {what}s: {', '.join(valid)}."


def _split(value: object, name: str) -> list[str]:
    if isinstance(value, str):
        items = [s.strip() for s in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [str(s).strip() for s in value]
    else:
        raise ConfigError(f"Expected `{name}` to be a comma list or a list, but got {value!r}.")
    items = [s for s in items if s]
    if not items:
        raise ConfigError(f"Expected `{name}` to name at least one value, but got {value!r}.")
    if len(set(items)) != len(items):
        raise ConfigError(f"Expected `{name}` without duplicates, but got {items}.")
    return items


def _names(value: object, valid: Sequence[str], what: str) -> tuple[str, ...]:
    items = _split(value, f"{what}s")
    for s in items:
        if s not in valid:
            raise ConfigError(_unknown(what, s, valid))
    return tuple(items)


def _strings(value: object, name: str) -> tuple[str, ...]:
    return tuple(_split(value, name))


def _ints(value: object, name: str) -> tuple[int, ...]:
    out = []
    for s in _split(value, name):
        try:
            n = int(s)
        except ValueError:
            raise ConfigError(f"Expected `{name}` to hold ints >= 1, but got {s!r}.") from None
        if n < 1:
            raise ConfigError(f"Expected `{name}` to hold ints >= 1, but got {n}.")
        out.append(n)
    return tuple(out)


def _drops(value: object) -> tuple[float, ...]:
    out = []
    for s in _split(value, "target_drop"):
        try:
            t = float(s)
        except ValueError:
            t = math.nan
        if not 0 < t < 1:
            raise ConfigError(
                f"Expected `target_drop` to hold accuracy drops in (0, 1) (0.02 = two points), "
                f"but got {s!r}."
            )
        out.append(t)
    return tuple(out)


def _as_int(x: object) -> int | None:
    """``x`` as an int if it is an int or a string of one (not a bool or a float), else None."""
    if isinstance(x, bool) or not isinstance(x, (int, str)):
        return None
    try:
        return int(x)
    except ValueError:
        return None


def _opt_int(v: Mapping[str, Any], name: str) -> int | None:
    x = v.get(name)
    if x is None:
        return None
    n = _as_int(x)
    if n is None or n < 1:
        raise ConfigError(f"Expected `{name}` to be an int >= 1, but got {x!r}.")
    return n


def _opt_float(v: Mapping[str, Any], name: str, *, positive: bool) -> float | None:
    x = v.get(name)
    if x is None:
        return None
    try:
        f = float(x) if not isinstance(x, bool) else math.nan
    except (TypeError, ValueError):
        f = math.nan
    if not math.isfinite(f) or (positive and f <= 0):
        raise ConfigError(f"Expected `{name}` to be a finite float > 0, but got {x!r}.")
    return f


def _bool(v: Mapping[str, Any], name: str, default: bool) -> bool:
    x = v.get(name, default)
    if not isinstance(x, bool):
        raise ConfigError(f"Expected `{name}` to be true or false, but got {x!r}.")
    return x


def _seed(x: object) -> int:
    n = _as_int(x)
    if n is None or n < 0:
        raise ConfigError(f"Expected `seed` to be an int >= 0, but got {x!r}.")
    return n


def _split_data(spec: str) -> tuple[str, str | None]:
    kind, sep, path = spec.partition(":")
    if kind not in DATA_KINDS:
        raise ConfigError(
            _unknown("data set", kind, DATA_KINDS)
            + " Use 'digits', 'cifar10:PATH' or 'imagenet:PATH' (an ImageFolder directory)."
        )
    if kind == "digits":
        if sep:
            raise ConfigError("--data digits takes no path (the digits are embedded).")
        return kind, None
    if not path:
        raise ConfigError(f"--data {kind} needs a local path: --data {kind}:PATH.")
    return kind, path


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"key: file has A, this run has B"`` for every result-affecting setting that differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        if k in NON_RESULT_SETTINGS:
            continue
        a, b = old.get(k, "<missing>"), new.get(k, "<missing>")
        if a != b:
            out.append(f"{k}: file has {json.dumps(a)}, this run has {json.dumps(b)}")
    return out


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and ``parts`` (stable across runs, ranks and platforms)."""
    blob = json.dumps([seed, *parts], separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 1


# ---------------------------------------------------------------------------- attacks
def make_attack(name: str, eps: float, eps_l2: float, eot_m: int) -> Attack:
    """The attack called ``name`` (see :data:`ATTACKS`), at radius ``eps`` (ℓ∞) or ``eps_l2``.

    Raises:
        ConfigError: unknown name.
    """
    if name not in ATTACKS:
        raise ConfigError(_unknown("attack", name, ATTACKS))
    if name.startswith("eot-"):
        from randfeat.eval.attacks.eot import EOT

        return EOT(make_attack(name[4:], eps, eps_l2, eot_m), eot_m)
    family, _, norm = name.partition("-")
    r = eps_l2 if norm == "l2" else eps
    p: Literal["linf", "l2"] = "l2" if norm == "l2" else "linf"
    if family == "square":
        from randfeat.eval.attacks.square import Square

        return Square(r, p)
    if family == "nes":
        from randfeat.eval.attacks.nes import NES

        return NES(r, p)
    if family == "signhunter":
        from randfeat.eval.attacks.signhunter import SignHunter

        return SignHunter(r, p)
    if family == "rays":
        from randfeat.eval.attacks.rays import RayS

        return RayS(r)
    from randfeat.eval.attacks.signflip import SignFlip

    return SignFlip(r)


# ---------------------------------------------------------------------------- data and model
@dataclass
class _Pool:
    """The images to draw from: the digits test split, a CIFAR-10 test set or an ImageFolder."""

    name: str
    path: str | None
    labels: Tensor
    x: Tensor | None = None
    dataset: Any = None

    def images(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        if self.x is not None:
            return self.x[idx], self.labels[idx]
        from randfeat.eval.data import materialize

        try:
            return materialize(self.dataset, idx)
        except (OSError, ValueError) as err:
            raise ConfigError(f"Could not read images from {self.path!r}: {err}") from err


class _Batches:
    """Re-iterable ``(x, y)`` batches of a pool subset (calibration data without holding it all)."""

    def __init__(self, pool: _Pool, idx: Tensor, size: int) -> None:
        self.pool, self.idx, self.size = pool, idx, size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for part in self.idx.split(self.size):
            yield self.pool.images(part)


def _load_pool(cfg: EvalConfig, image_size: int | None) -> _Pool:
    from randfeat.eval import data as rf_data

    kind, path = _split_data(cfg.data)
    if kind == "digits":
        d = rf_data.digits()
        return _Pool("digits", None, d.y_test, x=d.x_test)
    root = str(path)
    ds: Any
    try:
        if kind == "cifar10":
            ds = rf_data.load_cifar10(root, train=False, image_size=image_size)
        else:
            ds = rf_data.load_image_folder(root, image_size=image_size or 224)
    except (OSError, ValueError) as err:
        raise ConfigError(f"Cannot load --data {cfg.data!r}: {err}") from err
    labels = torch.as_tensor(list(ds.targets), dtype=torch.int64)
    if labels.numel() == 0:
        raise ConfigError(f"--data {cfg.data!r} holds no images.")
    return _Pool(kind, root, labels, dataset=ds)


def _check_data_path(cfg: EvalConfig) -> None:
    """Fail fast (before loading a model) on a data path that is not a readable directory."""
    _, path = _split_data(cfg.data)
    if path is None:
        return
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(
            f"--data {cfg.data!r}: {str(p)!r} does not exist or is not a directory. randfeat "
            "never downloads data: point it at a local copy."
        )
    if not os.access(p, os.R_OK | os.X_OK):
        raise ConfigError(f"--data {cfg.data!r}: {str(p)!r} is not readable.")


def _load_model(cfg: EvalConfig) -> nn.Module:
    """The model, taking ``[0, 1]`` images (timm models get their normalisation folded in)."""
    from randfeat.eval import models as rf_models

    if cfg.model == "digits-cnn":
        if cfg.checkpoint is None:
            return rf_models.digits_cnn()
        model = rf_models.DigitsCNN(cfg.num_classes or 10, generator=torch.Generator())
        try:
            model.load_state_dict(torch.load(cfg.checkpoint, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError, KeyError, ValueError) as err:
            raise ConfigError(f"Cannot load --checkpoint {cfg.checkpoint!r}: {err}") from err
        return model.eval()
    num_classes = cfg.num_classes or (10 if cfg.data.startswith("cifar10:") else None)
    try:
        return rf_models.load_timm(
            cfg.model,
            pretrained=cfg.pretrained,
            checkpoint=cfg.checkpoint,
            num_classes=num_classes,
        )
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        raise ConfigError(f"Cannot load model {cfg.model!r}: {err}") from err
    except Exception as err:  # e.g. no network for pretrained weights: say what to do
        raise ConfigError(
            f"Cannot create timm model {cfg.model!r} (pretrained={cfg.pretrained}): "
            f"{type(err).__name__}: {err}. Offline, pass --checkpoint PATH instead."
        ) from err


def _image_size(cfg: EvalConfig, model: nn.Module) -> int | None:
    """``--image-size``, else the timm model's native size for ImageFolder data (CIFAR-10: 32)."""
    if cfg.image_size is not None or not cfg.data.startswith("imagenet:"):
        return cfg.image_size
    inner = getattr(model, "model", model)
    size = getattr(inner, "pretrained_cfg", {}).get("input_size")
    return int(size[-1]) if size else 224


def _load(cfg: EvalConfig) -> tuple[nn.Module, _Pool, int | None]:
    model = _load_model(cfg)
    size = _image_size(cfg, model)
    return model, _load_pool(cfg, size), size


# ---------------------------------------------------------------------------- result file
def _read_records(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """Parse the JSONL file; a cut-off or corrupt *last* line is dropped (second value True)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"Cannot read --out {str(path)!r}: {err}") from err
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    dirty = bool(tail.strip())
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            dirty = True
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError as err:
            if i == len(lines) - 1 and not tail.strip():
                dirty = True  # the last line is garbage: a crash mid-write
                break
            raise ConfigError(
                f"{str(path)!r} line {i + 1} is not valid JSON ({err}); only a damaged last line "
                "can be repaired. Move the file away or fix that line."
            ) from None
        records.append(rec)
    return records, dirty


def load_results(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a result file: ``(header, rows)``; a damaged last line is ignored.

    Raises:
        ConfigError: the file is missing, unreadable, has no header, or is damaged elsewhere.
    """
    records, _ = _read_records(Path(path))
    if not records or records[0].get("type") != "header":
        raise ConfigError(f"{str(path)!r} is not a randfeat result file (no header line).")
    return records[0], records[1:]


def _unit_key(row: Mapping[str, Any]) -> tuple[Any, ...]:
    if row.get("type") == "clean":
        return ("clean", row["defense"], None, None, row["chunk"])
    return ("attack", row["defense"], row["attack"], row["budget"], row["chunk"])


def _fsync_write(f: Any, text: str) -> None:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def _dumps(records: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in records)


def _rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace ``path`` atomically by ``records`` (a crash leaves the old or the new file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # open(): the umask's permissions
    try:
        with tmp.open("w", encoding="utf-8") as f:
            _fsync_write(f, _dumps(records))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_out(path: Path) -> None:
    """Create the output directory and make sure the file can be written (a new file is removed
    again: it is created atomically with its header once the run is ready)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"Cannot create the output directory {str(path.parent)!r} for --out: {err}."
        ) from err
    existed = path.exists()
    try:
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as err:
        raise ConfigError(f"Cannot write --out {str(path)!r}: {err}.") from err
    if not existed:
        path.unlink()


# ---------------------------------------------------------------------------- units
@dataclass(frozen=True)
class _Unit:
    kind: Literal["clean", "attack"]
    defense: str
    attack: str | None
    budget: int | None
    chunk: int

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.kind, self.defense, self.attack, self.budget, self.chunk)

    @property
    def group(self) -> tuple[Any, ...]:
        return (self.kind, self.defense, self.attack, self.budget)


def _units(cfg: EvalConfig, n_chunks: int) -> list[_Unit]:
    out: list[_Unit] = []
    for d in cfg.defense_names():
        out += [_Unit("clean", d, None, None, c) for c in range(n_chunks)]
        for a in cfg.attacks:
            for b in cfg.budgets:
                out += [_Unit("attack", d, a, b, c) for c in range(n_chunks)]
    return out


# ---------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False

    def broadcast(self, obj: Any) -> Any:
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out or []


def _init_dist(device: str) -> tuple[_Dist, torch.device]:
    """Join torchrun's process group (env:// init) when ``WORLD_SIZE`` > 1; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"Unknown --device {device!r}: {err}") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda, but CUDA is not available; use --device cpu.")
        if world > 1 or dev.index is None:
            dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if world <= 1:
        return _Dist(), dev
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local, True), dev


# ---------------------------------------------------------------------------- the run
@dataclass
class _Context:
    cfg: EvalConfig
    device: torch.device
    header: dict[str, Any]
    x: Tensor  # [n_attacked, C, H, W] on the CPU
    y: Tensor
    defended: dict[str, nn.Module] = field(default_factory=dict)
    attacks: dict[str, Attack] = field(default_factory=dict)

    def chunk(self, c: int) -> tuple[Tensor, Tensor, list[int]]:
        bs = self.cfg.batch_size
        sl = slice(c * bs, (c + 1) * bs)
        images = self.header["attacked_indices"][sl]
        return self.x[sl].to(self.device), self.y[sl].to(self.device), images


def _reseed(model: nn.Module, seed: int) -> None:
    """Restart a randomized defense's noise stream (base and AAA are deterministic)."""
    if isinstance(model, RandomizedFeatureWrapper):
        model.manual_seed(seed)


def _run_unit(ctx: _Context, unit: _Unit) -> list[dict[str, Any]]:
    """One unit: the clean predictions or one attack on one chunk; its rows in chunk order.

    The defense's noise stream and the attack's generator restart from seeds of the unit alone.
    """
    cfg = ctx.cfg
    t0 = time.perf_counter()
    x, y, images = ctx.chunk(unit.chunk)
    model = ctx.defended[unit.defense]
    randomized = isinstance(model, RandomizedFeatureWrapper)
    parts = (unit.kind, unit.defense, unit.attack, unit.budget, unit.chunk)
    _reseed(model, derive_seed(cfg.seed, "noise", *parts))
    labels = y.tolist()
    if unit.kind == "clean":
        with torch.no_grad():
            if isinstance(model, RandomizedFeatureWrapper):
                pred = model.predict(x, votes=cfg.votes, batch_size=cfg.forward_batch)
            else:
                pred = torch.cat([model(c).argmax(dim=1) for c in x.split(cfg.forward_batch)])
        seconds = time.perf_counter() - t0
        return [
            {
                "type": "clean",
                "image": img,
                "label": lab,
                "defense": unit.defense,
                "pred": p,
                "correct": p == lab,
                "chunk": unit.chunk,
                "seconds": seconds,
            }
            for img, lab, p in zip(images, labels, pred.tolist(), strict=True)
        ]
    attack = ctx.attacks[str(unit.attack)]
    res = attack.run(
        model,
        x,
        y,
        budget=int(unit.budget or 0),
        votes=cfg.votes,
        seed=derive_seed(cfg.seed, "attack", *parts),
        batch_size=cfg.forward_batch,
    )
    # Deterministic defenses (base, AAA) need one forward: the fooling probability is 0 or 1.
    # rejudge repeats each image `forwards` times at once: pass it at most forward_batch rows.
    forwards = cfg.fresh_forwards if randomized else 1
    step = max(1, cfg.forward_batch // forwards)
    fresh = torch.cat(
        [
            rejudge(model, xa, ya, votes=cfg.votes, forwards=forwards, batch_size=cfg.forward_batch)
            for xa, ya in zip(res.x_adv.split(step), y.split(step), strict=True)
        ]
    )
    dist = distance(res.x_adv, x, attack.norm)
    seconds = time.perf_counter() - t0
    cols = zip(
        images,
        labels,
        res.success.tolist(),
        res.queries.tolist(),
        res.success_query.tolist(),
        res.verify_forwards.tolist(),
        fresh.tolist(),
        dist.tolist(),
        strict=True,
    )
    return [
        {
            "type": "attack",
            "image": img,
            "label": lab,
            "defense": unit.defense,
            "attack": unit.attack,
            "budget": unit.budget,
            "eps": attack.eps,
            "norm": attack.norm,
            "success": s,
            "queries": q,
            "success_query": sq,
            "verify_forwards": vf,
            "fresh": fr,
            "dist": di,
            "chunk": unit.chunk,
            "seconds": seconds,
        }
        for img, lab, s, q, sq, vf, fr, di in cols
    ]


def _calibrate(
    cfg: EvalConfig, model: nn.Module, pool: _Pool, idx: Tensor
) -> dict[str, dict[str, Any]]:
    """ν for every ``input@drop`` / ``feature@drop`` defense (one search per kind, all drops)."""
    from randfeat.calibration import calibrate_nu

    out: dict[str, dict[str, Any]] = {}
    kinds = [k for k in cfg.defenses if k in ("input", "feature")]
    if not kinds:
        return out
    # digits: one small tensor pair; image files: streamed in batches, never all in memory
    data: Any = pool.images(idx) if pool.x is not None else _Batches(pool, idx, 256)
    for kind in kinds:
        layers = ["input"] if kind == "input" else list(cfg.layers)
        seed = derive_seed(cfg.seed, "calibrate", kind)
        logger.info(
            "Calibrating ν of %s (layers %s) to drops %s on %d held-out images.",
            kind,
            layers,
            ", ".join(f"{t:g}" for t in cfg.target_drop),
            idx.numel(),
        )
        try:
            results = calibrate_nu(
                model,
                data,
                layers,
                list(cfg.target_drop),
                seed=seed,
                progress=not cfg.quiet,
                draws=cfg.calib_draws,
                batch_size=cfg.forward_batch,
            )
        except ValueError as err:
            raise ConfigError(f"Calibration of {kind} failed: {err}") from err
        if not isinstance(results, list):
            results = [results]
        for t, r in zip(cfg.target_drop, results, strict=True):
            name = f"{kind}@{t:g}"
            out[name] = {
                "kind": kind,
                "layers": list(r.layers),
                "target_drop": t,
                "nu": r.nu,
                "base_accuracy": r.base_accuracy,
                "accuracy": r.accuracy,
                "drop": r.drop,
                "n_images": r.n_images,
                "draws": r.draws,
                "stopped": r.stopped,
                "fast_path": r.fast_path,
                "seed": seed,
                "wall_time_s": r.wall_time_s,
            }
            logger.info(
                "  %s: ν = %.4g, accuracy %.4f -> %.4f (drop %.4f, target %g)",
                name,
                r.nu,
                r.base_accuracy,
                r.accuracy,
                r.drop,
                t,
            )
    return out


def _versions() -> dict[str, str]:
    """Installed versions, from package metadata (importing timm just for this costs seconds)."""
    from importlib import metadata

    import randfeat

    out = {"randfeat": randfeat.__version__, "torch": torch.__version__}
    try:
        out["timm"] = metadata.version("timm")
    except metadata.PackageNotFoundError:  # pragma: no cover - timm is a core dependency
        out["timm"] = "not installed"
    out["python"] = platform.python_version()
    return out


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


def _indices(cfg: EvalConfig, pool: _Pool) -> tuple[Tensor, Tensor]:
    """Attacked indices (class-balanced, in a seeded random order) and disjoint calibration ones."""
    from randfeat.eval.data import balanced_subset

    n = int(cfg.n_images or 0)
    try:
        attacked = balanced_subset(pool.labels, n, seed=derive_seed(cfg.seed, "attacked"))
    except ValueError as err:
        raise ConfigError(f"Cannot draw --n-images {n} balanced images: {err}") from err
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "attacked-order"))
    attacked = attacked[torch.randperm(attacked.numel(), generator=g)]
    rest = torch.ones(pool.labels.numel(), dtype=torch.bool)
    rest[attacked] = False
    remaining = rest.nonzero().squeeze(1)
    want = cfg.calib_images or min(1000, remaining.numel())
    needs_cal = any(k in ("input", "feature") for k in cfg.defenses)
    if needs_cal and want > remaining.numel():
        raise ConfigError(
            f"--calib-images {want} exceeds the {remaining.numel()} images left after the "
            f"{n} attacked ones; lower --calib-images or --n-images."
        )
    g.manual_seed(derive_seed(cfg.seed, "calibration"))
    cal = remaining[torch.randperm(remaining.numel(), generator=g)[:want]].sort().values
    return attacked, cal if needs_cal else cal[:0]


def _check_existing(path: Path, new_cfg: Mapping[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """Records of an existing result file (``[]`` if new/empty), refusing a foreign or mismatched one."""
    if not path.exists():
        return [], False
    records, damaged = _read_records(path)
    if not records:
        return [], damaged
    old = records[0]
    if old.get("type") != "header":
        raise ConfigError(
            f"{str(path)!r} exists and is not a randfeat result file (its first line is no "
            "header). Choose another --out."
        )
    if old.get("format") != FORMAT or old.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{str(path)!r} has format {old.get('format')!r} v{old.get('format_version')}; "
            f"this randfeat writes {FORMAT!r} v{FORMAT_VERSION}. Choose another --out."
        )
    diff = config_differences(old.get("config", {}), new_cfg)
    if diff:
        raise ConfigError(
            f"{str(path)!r} holds results of a different configuration; refusing to mix them. "
            "Settings that differ:\n  "
            + "\n  ".join(diff)
            + "\nRerun with the file's settings to resume, or choose another --out."
        )
    return records, damaged


def _prepare(
    cfg: EvalConfig, dist: _Dist, dev: torch.device
) -> tuple[dict[str, Any], nn.Module, _Pool]:
    """Rank 0: check the file, load, calibrate (or reuse the header's ν), write the header.

    Returns the plan broadcast to every rank (header, finished units), the model and the pool.
    """
    path = Path(cfg.out).expanduser()
    _check_out(path)
    new_cfg = json.loads(json.dumps(cfg.to_dict()))
    records, damaged = _check_existing(path, new_cfg)
    _check_data_path(cfg)
    model, pool, image_size = _load(cfg)
    attacked, cal = _indices(cfg, pool)
    if records:
        header = records[0]
        if header.get("attacked_indices") != attacked.tolist():
            raise ConfigError(
                f"{str(path)!r} attacked other images than this run would (the data set "
                "changed?); choose another --out."
            )
        if header.get("device") != _device_name(dev):
            logger.warning(
                "Resuming results written on %s on %s: rows stay valid measurements, but are not "
                "bit-identical to a run on one device.",
                header.get("device"),
                _device_name(dev),
            )
    else:
        header = _new_header(cfg, new_cfg, dist, dev, model, pool, image_size, attacked, cal)
    rows = records[1:]
    done, kept = _complete_units(header, cfg.batch_size, rows)
    if not records or damaged or len(kept) != len(rows):
        if damaged:
            logger.warning("%s: ignoring a damaged last line (a crash mid-write).", path)
        if len(kept) != len(rows):
            logger.warning(
                "%s: dropping %d row(s) of unfinished or duplicated chunks.",
                path,
                len(rows) - len(kept),
            )
        _rewrite(path, [header, *kept])
    if kept:
        logger.info("Resuming %s: %d row(s) already done.", path, len(kept))
    plan = {"header": header, "done": [list(k) for k in done], "image_size": image_size}
    return plan, model, pool


def _new_header(
    cfg: EvalConfig,
    new_cfg: dict[str, Any],
    dist: _Dist,
    dev: torch.device,
    model: nn.Module,
    pool: _Pool,
    image_size: int | None,
    attacked: Tensor,
    cal: Tensor,
) -> dict[str, Any]:
    """Check the model against the data, calibrate, and describe the run."""
    model.to(dev)
    x0, _ = pool.images(attacked[:1])
    with torch.no_grad():
        classes = int(model(x0.to(dev)).shape[-1])
    if int(pool.labels.max()) >= classes:
        raise ConfigError(
            f"--data {cfg.data!r} has labels up to {int(pool.labels.max())}, but model "
            f"{cfg.model!r} has {classes} outputs; pass --num-classes or a matching --checkpoint."
        )
    if "feature" in cfg.defenses:
        from randfeat.layers import resolve_layers

        try:
            resolve_layers(model, list(cfg.layers))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"Bad --layers {','.join(cfg.layers)!r}: {err}") from err
    calibration = _calibrate(cfg, model, pool, cal)
    n_chunks = math.ceil(attacked.numel() / cfg.batch_size)
    n_rows = attacked.numel() * len(cfg.defense_names()) * (1 + len(cfg.attacks) * len(cfg.budgets))
    return {
        "type": "header",
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": new_cfg,
        "settings_not_compared": sorted(NON_RESULT_SETTINGS),
        "versions": _versions(),
        "device": _device_name(dev),
        "world_size": dist.world,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "eps": {"linf": cfg.eps, "l2": cfg.eps_l2, "source": cfg.eps_source},
        "data": {
            "name": pool.name,
            "path": pool.path,
            "pool_size": int(pool.labels.numel()),
            "classes": int(pool.labels.unique().numel()),
            "image_shape": list(x0.shape[1:]),
        },
        "model": {
            "name": cfg.model,
            "parameters": sum(p.numel() for p in model.parameters()),
            "outputs": classes,
            "image_size": image_size,
        },
        "defenses": cfg.defense_names(),
        "attacks": {
            a: {"norm": atk.norm, "eps": atk.eps, "repr": repr(atk)}
            for a, atk in _attacks(cfg).items()
        },
        "calibration": calibration,
        "attacked_indices": attacked.tolist(),
        "calibration_indices": cal.tolist(),
        "n_attacked": int(attacked.numel()),
        "n_calibration": int(cal.numel()),
        "n_chunks": n_chunks,
        "rows_expected": n_rows,
    }


def _complete_units(
    header: Mapping[str, Any], batch_size: int, rows: list[dict[str, Any]]
) -> tuple[set[tuple[Any, ...]], list[dict[str, Any]]]:
    """The units whose rows are all in the file, and the rows to keep (first copy, file order).

    A unit is complete when its rows, in file order, start with the chunk's images in chunk order
    (units are written with one ``write``; a crash can leave a prefix of one).
    """
    attacked = header["attacked_indices"]
    by_unit: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        key = _safe_key(r)
        if key is not None:
            by_unit.setdefault(key, []).append(r)
    keep: dict[tuple[Any, ...], int] = {}
    for key, rs in by_unit.items():
        c = key[4]
        want = attacked[c * batch_size : (c + 1) * batch_size] if isinstance(c, int) else []
        if want and [r.get("image") for r in rs[: len(want)]] == want:
            keep[key] = len(want)
    out = []
    for r in rows:
        key = _safe_key(r)
        if key is not None and keep.get(key, 0) > 0:
            out.append(r)
            keep[key] -= 1
    done = {k for k in by_unit if k in keep}
    return done, out


def _safe_key(row: Mapping[str, Any]) -> tuple[Any, ...] | None:
    try:
        return _unit_key(row)
    except (KeyError, TypeError):
        return None


def _attacks(cfg: EvalConfig) -> dict[str, Attack]:
    return {
        a: make_attack(a, float(cfg.eps or 0), float(cfg.eps_l2 or 0), cfg.eot_m)
        for a in cfg.attacks
    }


def _build_defenses(
    cfg: EvalConfig, model: nn.Module, calibration: Mapping[str, Mapping[str, Any]]
) -> dict[str, nn.Module]:
    from randfeat import wrap
    from randfeat.eval.defenses import AAA

    out: dict[str, nn.Module] = {}
    for name in cfg.defense_names():
        if name == "base":
            out[name] = model
        elif name == "aaa":
            out[name] = AAA(model)
        else:
            cal = calibration[name]
            # Several wrappers may hook the same model: each hook acts only in its own forward.
            out[name] = wrap(model, layers=cal["layers"], nu=float(cal["nu"]), seed=0)
    return out


@dataclass
class _Tally:
    images: int = 0
    queries: int = 0
    wrong: int = 0  # fooled (attack units) or misclassified (clean units)
    skipped: int = 0
    t0: float = field(default_factory=time.perf_counter)


class _Progress:
    """One tqdm bar per (defense, attack, budget) on rank 0 (images, queries/s, ETA) + a log line.

    The bars are off unless asked for and stderr is a terminal; the summary lines are logged.
    """

    def __init__(self, n_images: int, enabled: bool) -> None:
        self.n, self.enabled = n_images, enabled
        self.tally: dict[tuple[Any, ...], _Tally] = {}
        self.bars: dict[tuple[Any, ...], Any] = {}
        self.started: set[tuple[Any, ...]] = set()

    def skip(self, unit: _Unit, images: int) -> None:
        t = self.tally.setdefault(unit.group, _Tally())
        t.images += images
        t.skipped += images

    def begin(self, units: list[_Unit]) -> None:
        """Start the clocks (and bars) of the groups a round of units is about to run."""
        for u in units:
            t = self.tally.setdefault(u.group, _Tally())
            if u.group not in self.started:
                self.started.add(u.group)
                t.t0 = time.perf_counter()
                self._bar(u, t)

    def update(self, unit: _Unit, rows: list[dict[str, Any]]) -> None:
        t = self.tally.setdefault(unit.group, _Tally())
        t.images += len(rows)
        if unit.kind == "attack":
            t.queries += sum(int(r["queries"]) for r in rows)
            t.wrong += sum(bool(r["success"]) for r in rows)
        else:
            t.wrong += sum(not r["correct"] for r in rows)
        bar = self._bar(unit, t)
        if bar is not None:
            bar.update(len(rows))
            if unit.kind == "attack":
                rate = t.queries / max(time.perf_counter() - t.t0, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} queries/s")
        if t.images >= self.n:
            self._finish(unit, t)

    def _bar(self, unit: _Unit, t: _Tally) -> Any:
        if not self.enabled:
            return None
        if unit.group not in self.bars:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # optional (the eval extra): no bars, the log lines remain
                self.enabled = False
                return None

            desc = f"{unit.defense} " + (
                "clean" if unit.kind == "clean" else f"{unit.attack} B={unit.budget}"
            )
            self.bars[unit.group] = tqdm(
                total=self.n, initial=t.skipped, desc=desc, unit="img", leave=False
            )
        return self.bars[unit.group]

    def _finish(self, unit: _Unit, t: _Tally) -> None:
        bar = self.bars.pop(unit.group, None)
        if bar is not None:
            bar.close()
        done = t.images - t.skipped
        if unit.kind == "clean":
            logger.info(
                "%s: clean accuracy (this run's images) %d/%d", unit.defense, done - t.wrong, done
            )
        else:
            logger.info(
                "%s %s budget %d: fooled %d/%d of this run's images, %.1f queries per image",
                unit.defense,
                unit.attack,
                unit.budget,
                t.wrong,
                done,
                t.queries / max(done, 1),
            )

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def run_eval(cfg: EvalConfig) -> Path:
    """Run (or resume) the evaluation ``cfg`` and return the result file's path.

    Works alone or under ``torchrun`` (one process per rank, the same arguments everywhere).

    Raises:
        ConfigError: bad names, paths, data, a mismatching result file, or a failed calibration.
    """
    dist, dev = _init_dist(cfg.device)
    try:
        return _run(cfg, dist, dev)
    finally:
        if dist.active:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def _run(cfg: EvalConfig, dist: _Dist, dev: torch.device) -> Path:
    t_start = time.perf_counter()
    path = Path(cfg.out).expanduser()
    model: nn.Module | None = None
    pool: _Pool | None = None
    plan: dict[str, Any] = {}
    if dist.rank == 0:
        note = "; the paper's 0.05 / 5 are for 224×224 images" if "digits" in cfg.eps_source else ""
        logger.info("ε: ℓ∞ %g, ℓ2 %g (%s%s).", cfg.eps, cfg.eps_l2, cfg.eps_source, note)
        try:
            plan, model, pool = _prepare(cfg, dist, dev)
        except ConfigError as err:
            dist.broadcast({"error": str(err)})  # release the other ranks before failing
            raise
    plan = dist.broadcast(plan)
    if "error" in plan:
        raise ConfigError(plan["error"])
    header = plan["header"]
    if model is None or pool is None:
        model = _load_model(cfg)
        pool = _load_pool(cfg, plan["image_size"])
    model.to(dev)
    attacked = torch.tensor(header["attacked_indices"], dtype=torch.long)
    x, y = pool.images(attacked)
    ctx = _Context(cfg, dev, header, x, y)
    ctx.defended = _build_defenses(cfg, model, header["calibration"])
    ctx.attacks = _attacks(cfg)
    done = {tuple(k) for k in plan["done"]}
    units = _units(cfg, header["n_chunks"])
    todo = [u for u in units if u.key not in done]
    if dist.rank == 0:
        logger.info(
            "%d unit(s) of up to %d image(s) to run, %d done; %d rank(s), device %s.",
            len(todo),
            cfg.batch_size,
            len(units) - len(todo),
            dist.world,
            _device_name(dev),
        )
    show = dist.rank == 0 and not cfg.quiet and sys.stderr.isatty()
    progress = _Progress(len(attacked), show)
    for u in units:
        if u.key in done:  # bars and summaries count what is already in the file
            progress.skip(u, len(ctx.chunk(u.chunk)[2]))
    f = path.open("a", encoding="utf-8") if dist.rank == 0 else None
    try:
        for start in range(0, len(todo), dist.world):
            round_units = todo[start : start + dist.world]
            progress.begin(round_units)
            mine = round_units[dist.rank] if dist.rank < len(round_units) else None
            rows = _run_unit(ctx, mine) if mine is not None else []
            gathered = dist.gather(rows)
            if f is not None:
                for unit, unit_rows in zip(round_units, gathered, strict=False):
                    _fsync_write(f, _dumps(unit_rows))
                    progress.update(unit, unit_rows)
    finally:
        progress.close()
        if f is not None:
            f.close()
        for m in ctx.defended.values():
            if isinstance(m, RandomizedFeatureWrapper):
                m.unwrap()
    if dist.rank == 0:
        logger.info("Wrote %s in %.1f s.", path, time.perf_counter() - t_start)
    return path
