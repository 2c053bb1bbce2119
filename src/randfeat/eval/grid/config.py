"""Settings of one evaluation: [EvalConfig][randfeat.eval.grid.config.EvalConfig] and seeds.

The grid of Nguyen et al., "Understanding the Robustness of Randomized Feature Defense Against
Query-Based Adversarial Attacks", ICLR 2024 (§5, appendix D), as settings: `EvalConfig` holds
every setting of a `randfeat eval` run, and `EvalConfig.from_mapping` validates them against the
registries (attacks: `randfeat.eval.ATTACKS`; data sets: `randfeat.eval.data.registry.DATA_SETS`;
models: `randfeat.eval.models.sources.MODEL_SOURCES`), naming the closest valid name for an
unknown one. [derive_seed][randfeat.eval.grid.config.derive_seed] gives every unit of work its
own seed. The paper's grids (`--preset`) are in [randfeat.eval.grid.presets][].
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import typing
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from randfeat.checks import check_positive_float, check_positive_int
from randfeat.eval.attacks.registry import ATTACKS
from randfeat.eval.data.registry import DataSpec
from randfeat.eval.errors import ConfigError
from randfeat.eval.forward import DTYPES, DTypeName, ForwardOptions
from randfeat.eval.models.sources import ModelSource, model_source

__all__ = ["DEFENSE_KINDS", "SERVED", "EvalConfig", "derive_seed"]

T = TypeVar("T")

DEFENSE_KINDS = ("base", "input", "feature", "keyed", "aaa")
"""The defenses `--defenses` accepts: none, RND, randomized features (fresh noise each forward),
keyed feature noise (`wrap(..., noise="keyed")`: a function of a secret key and the input), AAA."""
_DETECT_SETTINGS = ("detect_fpr", "on_detect", "ban_after", "accounts")
"""Settings of `--detect`, which mean nothing without it."""
SERVED = "served"
"""The one defense of a run against a URL (`--target`): whatever the server runs."""
_LOCAL_ONLY: tuple[str, ...] = ("model", "pretrained", "checkpoint", "num_classes", "defenses")
_LOCAL_ONLY += ("layers", "target_drop", "calib_images", "calib_draws")
"""Settings of a local model and its defenses, which a run against `--target` cannot have."""
_FORWARD_SETTINGS = ("dtype", "channels_last", "compile")
"""How a local model's forward runs; a run against `--target` can only keep their defaults."""


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class EvalConfig:
    """Every setting of one evaluation (the keys of `--config` TOML files and of the header).

    Build it with `from_mapping`, which validates and fills in data-dependent defaults
    (`n_images`: 100 for digits, else 1000 as in the paper; `eps` / `eps_l2`: the paper's
    0.05 / 5, or 0.2 / 1.5 on the 8×8 digits).

    Attributes:
        model, pretrained, checkpoint, num_classes: `"digits-cnn"` or a timm name, and how to
            get its weights and classifier size.
        image_size, data: `"digits"`, `"cifar10:PATH"` or `"imagenet:PATH"` (ImageFolder),
            resized to `image_size` (ImageFolder default: the model's native size).
        n_images, calib_images, calib_draws: attacked images (class-balanced), held-out
            calibration images (default: the rest of the pool, at most 1000) and noise draws per
            calibration image (default: `calibrate_nu`'s).
        defenses, layers, target_drop: defense kinds (`DEFENSE_KINDS`), the feature
            defense's layer specs, and the clean-accuracy drops ν is calibrated to.
        attacks, budgets, eps, eps_l2, votes, eot_m: the attack grid (`ATTACKS`), query
            budgets, radii, success votes (D.4) and forwards per EOT query.
        fresh_forwards: forwards per image for `fresh` (`rejudge`).
        batch_size, forward_batch: images per unit (chunk), most rows per model forward.
        dtype, channels_last, compile: how the defended model's forward runs
            ([ForwardOptions][randfeat.eval.forward.ForwardOptions]): autocast to `"bfloat16"`
            or `"float16"` (default `"float32"`: none), NHWC memory format, `torch.compile`.
            Calibration always runs in float32.
        detect, detect_fpr, on_detect, ban_after, accounts: a stateful query detector in front
            of every defense (a name of `randfeat.detect.DETECTORS`, `None`: none), the benign
            false-positive rate its threshold is calibrated to, what a flag does (`"reject"`,
            `"ban"`, `"log"`: the server's semantics), the flags a key may have before `ban`
            refuses it, and the API keys the attacker spreads its queries over (sybil).
        seed, device, quiet, out, preset: see `randfeat eval --help`.
        target: the URL of a served model (`randfeat serve`) to attack instead of a local model:
            no local calibration, the one defense `served` is whatever the server runs.
        api_key: the `X-API-Key` sent to `target` (a secret: not written to the result file).
        eps_source: where `eps` / `eps_l2` came from (derived; not a setting).
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
    detect: str | None = None
    detect_fpr: float = 0.001
    on_detect: str = "reject"
    ban_after: int = 10
    accounts: int = 1
    batch_size: int = 100
    forward_batch: int = 1024
    dtype: str = "float32"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    quiet: bool = False
    out: str = "results.jsonl"
    preset: str | None = None
    target: str | None = None
    api_key: str | None = field(default=None, compare=False, repr=False)
    eps_source: str = field(default="", compare=False)

    @classmethod
    def keys(cls) -> list[str]:
        """The setting names written to the header (not `eps_source`, derived, nor `api_key`)."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("eps_source", "api_key")]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> EvalConfig:
        """Validate `values` (strings or lists for list settings) and fill in the defaults.

        Raises:
            ConfigError: an unknown key, an unknown name (with close matches) or a bad value.
        """
        v = {k.replace("-", "_"): x for k, x in values.items()}
        unknown = sorted(set(v) - {*cls.keys(), "api_key"})
        if unknown:
            raise ConfigError(_unknown("setting", unknown[0], cls.keys()))
        d = cls()
        target = _target(v)
        dataset = DataSpec.parse(str(v.get("data", d.data))).dataset
        source = "user"
        eps = _opt_float(v, "eps")
        eps_l2 = _opt_float(v, "eps_l2")
        if eps is None or eps_l2 is None:
            source = dataset.eps_source
            if eps is not None or eps_l2 is not None:
                source += " (partly user)"
        cfg = cls(
            model=str(v.get("model", d.model)),
            pretrained=_bool(v, "pretrained", d.pretrained),
            checkpoint=None if v.get("checkpoint") is None else str(v["checkpoint"]),
            num_classes=_opt_int(v, "num_classes"),
            image_size=_opt_int(v, "image_size"),
            data=str(v.get("data", d.data)),
            n_images=_opt_int(v, "n_images") or dataset.n_images,
            calib_images=_opt_int(v, "calib_images"),
            calib_draws=_opt_int(v, "calib_draws"),
            defenses=(
                (SERVED,)
                if target
                else _names(v.get("defenses", d.defenses), DEFENSE_KINDS, "defense")
            ),
            layers=_strings(v.get("layers", d.layers), "layers"),
            target_drop=_drops(v.get("target_drop", d.target_drop)),
            attacks=_names(v.get("attacks", d.attacks), ATTACKS, "attack"),
            budgets=_ints(v.get("budgets", d.budgets), "budgets"),
            eps=dataset.eps_linf if eps is None else eps,
            eps_l2=dataset.eps_l2 if eps_l2 is None else eps_l2,
            votes=_opt_int(v, "votes") or d.votes,
            eot_m=_opt_int(v, "eot_m") or d.eot_m,
            fresh_forwards=_opt_int(v, "fresh_forwards") or d.fresh_forwards,
            **_detection(v, target),
            batch_size=_opt_int(v, "batch_size") or d.batch_size,
            forward_batch=_opt_int(v, "forward_batch") or d.forward_batch,
            dtype=_choice(v.get("dtype", d.dtype), DTYPES, "dtype"),
            channels_last=_bool(v, "channels_last", d.channels_last),
            compile=_bool(v, "compile", d.compile),
            seed=_seed(v.get("seed", d.seed)),
            device=str(v.get("device", d.device)),
            quiet=_bool(v, "quiet", d.quiet),
            out=str(v.get("out", d.out)),
            preset=None if v.get("preset") is None else str(v["preset"]),
            target=target,
            api_key=None if v.get("api_key") is None else str(v["api_key"]),
            eps_source=source,
        )
        names = cfg.defense_names()
        if len(set(names)) != len(names):
            raise ConfigError(
                f"Expected distinct `target_drop` values, but {cfg.target_drop} give the "
                f"defense names {names}."
            )
        if target is None:
            _check_model(cfg, model_source(cfg.model))
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (tuples become lists)."""
        return {k: (list(x) if isinstance(x, tuple) else x) for k, x in self._items()}

    def _items(self) -> Iterator[tuple[str, Any]]:
        for k in self.keys():
            yield k, getattr(self, k)

    @property
    def data_spec(self) -> DataSpec:
        """The parsed `data` setting."""
        return DataSpec.parse(self.data)

    @property
    def forward_options(self) -> ForwardOptions:
        """How the defended models' forwards run: `dtype`, `channels_last`, `compile`."""
        return ForwardOptions(
            dtype=typing.cast(DTypeName, self.dtype),
            channels_last=self.channels_last,
            compile=self.compile,
        )

    def radius(self, norm: Literal["linf", "l2"]) -> float:
        """The radius of the `norm` ball: `eps` (ℓ∞) or `eps_l2`."""
        return float((self.eps_l2 if norm == "l2" else self.eps) or 0.0)

    def defense_names(self) -> list[str]:
        """`base`, `aaa`, and `input@<drop>` / `feature@<drop>` for every target drop."""
        out: list[str] = []
        for kind in self.defenses:
            if kind in ("input", "feature", "keyed"):
                out += [f"{kind}@{t:g}" for t in self.target_drop]
            else:
                out.append(kind)
        return out


def _check_model(cfg: EvalConfig, source: ModelSource) -> None:
    """The model's name, its data set and `--pretrained` agree with each other, else ConfigError."""
    source.check(cfg.model)
    dataset = cfg.data_spec.dataset
    if source.data is not None and dataset.name not in source.data:
        raise ConfigError(
            f"--model {cfg.model} takes --data {', '.join(source.data)} only, but --data is "
            f"{cfg.data!r}. Use --data {source.data[0]}, or another model for {dataset.name}."
        )
    if dataset.models is not None and cfg.model not in dataset.models:
        raise ConfigError(
            f"--data {dataset.name} needs --model {' or '.join(dataset.models)}, but got "
            f"{cfg.model!r}."
        )
    if cfg.pretrained and not source.pretrained:
        raise ConfigError(f"--pretrained does not apply to {cfg.model}: its weights are its own.")


def _target(v: Mapping[str, Any]) -> str | None:
    """The `target` URL, checked, and refused alongside settings of a local model."""
    url = v.get("target")
    if url is None:
        return None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(
            f"Expected `target` to be the URL of a served model, e.g. http://127.0.0.1:8000, "
            f"but got {url!r}."
        )
    fast = [k for k in _FORWARD_SETTINGS if k in v and v[k] != getattr(EvalConfig, k)]
    if fast:
        flag = "--" + fast[0].replace("_", "-")
        raise ConfigError(
            f"--target attacks a model over HTTP: {flag} sets how a local model's forward runs, "
            f"and the server runs its own. Drop {flag}."
        )
    clash = [k for k in _LOCAL_ONLY if k in v]
    if clash:
        flag = "--" + clash[0].replace("_", "-")
        raise ConfigError(
            f"--target attacks the served model as it is (the server chose its model and "
            f"defense, and calibrated it): {flag} does not apply. Drop {flag}."
        )
    return url


def _detection(v: Mapping[str, Any], target: str | None) -> dict[str, Any]:
    """`detect` and its settings, checked: a known detector, not with `--target`."""
    from randfeat.detect import DETECTORS
    from randfeat.eval.guarded import ON_DETECT

    d = EvalConfig()
    name = v.get("detect")
    if name is None:
        given = [k for k in _DETECT_SETTINGS if v.get(k) not in (None, getattr(d, k))]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise ConfigError(f"{flag} sets the query detector: add --detect, or drop {flag}.")
        return {}
    if target is not None:
        raise ConfigError(
            "--detect puts a detector in front of a local model; with --target the server "
            "detects, not the client. Start the server with `randfeat serve --detect` and drop "
            "--detect here (its refusals reach the attacks as QueryRejected)."
        )
    fpr = _checked(check_positive_float, v, "detect_fpr")
    if fpr is not None and not fpr <= 0.5:
        raise ConfigError(f"Expected `detect_fpr` in (0, 0.5] (0.001 = 0.1%), but got {fpr!r}.")
    action = _choice(v.get("on_detect", d.on_detect), ON_DETECT, "on_detect action")
    ban_after = _opt_int(v, "ban_after")
    if ban_after not in (None, d.ban_after) and action != "ban":
        raise ConfigError(f"--ban-after applies to --on-detect ban only, not {action}: drop it.")
    return {
        "detect": _choice(name, DETECTORS, "detector"),
        "detect_fpr": d.detect_fpr if fpr is None else fpr,
        "on_detect": action,
        "ban_after": ban_after or d.ban_after,
        "accounts": _opt_int(v, "accounts") or d.accounts,
    }


def _unknown(what: str, name: str, valid: Collection[str]) -> str:
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


def _names(value: object, valid: Collection[str], what: str) -> tuple[str, ...]:
    items = _split(value, f"{what}s")
    for s in items:
        if s not in valid:
            raise ConfigError(_unknown(what, s, valid))
    return tuple(items)


def _choice(value: object, valid: Collection[str], what: str) -> str:
    if not isinstance(value, str) or value not in valid:
        raise ConfigError(_unknown(what, str(value), valid))
    return value


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
    """`x` as an int if it is an int or a string of one (not a bool or a float), else None."""
    if isinstance(x, bool) or not isinstance(x, (int, str)):
        return None
    try:
        return int(x)
    except ValueError:
        return None


def _parsed(x: object) -> object:
    """A string from a flag or a file as the number it spells (else unchanged)."""
    if not isinstance(x, str):
        return x
    for kind in (int, float):
        try:
            return kind(x)
        except ValueError:
            pass
    return x


def _checked(check: Callable[[object, str], T], v: Mapping[str, Any], name: str) -> T | None:
    """`v[name]` passed through one of `randfeat.checks`' validators (None when absent)."""
    x = v.get(name)
    if x is None:
        return None
    try:
        return check(_parsed(x), name)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None


def _opt_int(v: Mapping[str, Any], name: str) -> int | None:
    return _checked(check_positive_int, v, name)


def _opt_float(v: Mapping[str, Any], name: str) -> float | None:
    return _checked(check_positive_float, v, name)


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


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from `seed` and `parts` (stable across runs, ranks and platforms)."""
    blob = json.dumps([seed, *parts], separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 1
