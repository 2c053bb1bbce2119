"""Settings of one evaluation: :class:`EvalConfig`, the names it accepts, default radii, seeds.

The grid of Nguyen et al., "Understanding the Robustness of Randomized Feature Defense Against
Query-Based Adversarial Attacks", ICLR 2024 (§5, appendix D), as settings: :class:`EvalConfig`
holds every setting of a ``randfeat eval`` run and :meth:`EvalConfig.from_mapping` validates them
(unknown names get the closest valid ones). :data:`ATTACKS`, :data:`DEFENSE_KINDS` and
:data:`DATA_KINDS` are the names it accepts, :data:`PAPER_EPS` / :data:`DIGITS_EPS` the default
radii; :func:`make_attack` builds an attack from its name and :func:`derive_seed` gives every unit
of work its own seed. The paper's grids (``--preset``) are in :mod:`randfeat.cli`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from randfeat.eval.attacks.base import Attack

__all__ = [
    "ATTACKS",
    "DATA_KINDS",
    "DEFENSE_KINDS",
    "DIGITS_EPS",
    "PAPER_EPS",
    "ConfigError",
    "EvalConfig",
    "derive_seed",
    "make_attack",
]

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
