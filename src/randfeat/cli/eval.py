"""`randfeat eval`: the evaluation grid of the paper on a model and a data set.

Runs [run_eval][randfeat.eval.grid.runner.run_eval] (alone, or under
`torchrun --nproc-per-node N -m randfeat eval ...`) and writes a resumable JSON Lines result file
([randfeat.eval.results.file][]). Settings come from, in increasing priority: the defaults,
`--preset`, `--config FILE.toml` (keys as the flags, `-` or `_`; lists as TOML arrays or comma
strings) and the flags. `--target URL` attacks a model served by `randfeat serve` over HTTP
([HTTPModel][randfeat.eval.remote.HTTPModel]) with the same grid, result file and report.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from randfeat.cli.command import Command, UsageError, logging_to_stderr
from randfeat.detect import DEFAULT, DETECTORS
from randfeat.eval.attacks.registry import ATTACKS
from randfeat.eval.data.registry import DATA_SETS, DataSpec
from randfeat.eval.errors import ConfigError
from randfeat.eval.forward import DTYPES
from randfeat.eval.grid.config import DEFENSE_KINDS, EvalConfig
from randfeat.eval.grid.presets import PAPER_ATTACKS, PRESETS
from randfeat.eval.grid.runner import run_eval
from randfeat.eval.guarded import ON_DETECT
from randfeat.eval.models.sources import MODEL_SOURCES

__all__ = ["API_KEY_ENV", "COMMAND", "settings"]

API_KEY_ENV = "RANDFEAT_API_KEY"
"""The environment variable `--api-key` defaults to (keeps the key out of `ps` listings)."""


def _add_arguments(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    data_usage = ", ".join(repr(d.usage) for d in DATA_SETS.values())
    model_usage = " or ".join(s.usage for s in MODEL_SOURCES)
    m = p.add_argument_group("model and data")
    m.add_argument("--model", metavar="NAME", help=f"{model_usage} (default digits-cnn)")
    m.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="load timm's pretrained weights (needs them cached or the network)",
    )
    m.add_argument("--checkpoint", metavar="PATH", help="a local state_dict for the model")
    m.add_argument(
        "--num-classes", type=int, metavar="N", help="classifier outputs (default: the model's)"
    )
    m.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help="image side for CIFAR-10 / ImageFolder data (default: 32 / the model's own)",
    )
    m.add_argument("--data", metavar="SPEC", help=f"{data_usage} (default digits)")
    m.add_argument(
        "--n-images",
        type=int,
        metavar="N",
        help="attacked images, class-balanced (default 100 for digits, else 1000)",
    )
    m.add_argument(
        "--calib-images",
        type=int,
        metavar="N",
        help="held-out calibration images (default: the rest of the pool, up to 1000)",
    )
    m.add_argument("--calib-draws", type=int, metavar="N", help="noise draws per calibration image")
    t = p.add_argument_group("a served model (randfeat serve) instead of a local one")
    t.add_argument(
        "--target",
        metavar="URL",
        help="attack the model served at URL, e.g. http://127.0.0.1:8000, over HTTP: no local "
        "model or calibration; the one defense 'served' is whatever the server runs",
    )
    t.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"the X-API-Key to send (default ${API_KEY_ENV}); never written to the result file",
    )
    g = p.add_argument_group("grid")
    g.add_argument(
        "--defenses",
        metavar="LIST",
        help=f"comma list of {','.join(DEFENSE_KINDS)} (default base,input,feature)",
    )
    g.add_argument(
        "--layers", metavar="LIST", help="layer specs of the feature defense (default penultimate)"
    )
    g.add_argument(
        "--target-drop",
        metavar="LIST",
        help="clean-accuracy drops to calibrate ν to, e.g. 0.01,0.02 (default)",
    )
    g.add_argument(
        "--attacks",
        metavar="LIST",
        help=f"comma list of {', '.join(a for a in ATTACKS if not a.startswith('eot-'))} and "
        f"eot-<attack> (default {','.join(PAPER_ATTACKS)})",
    )
    g.add_argument("--budgets", metavar="LIST", help="query budgets (default 1000,10000)")
    g.add_argument(
        "--eps",
        type=float,
        metavar="X",
        help="ℓ∞ radius (default 0.05; digits 0.2; fashion-mnist 0.1)",
    )
    g.add_argument(
        "--eps-l2",
        type=float,
        metavar="X",
        help="ℓ2 radius (default 5; digits and fashion-mnist 1.5)",
    )
    g.add_argument(
        "--votes",
        type=int,
        metavar="N",
        help="forwards judging a point: fooled when a strict majority misclassify (default 9)",
    )
    g.add_argument(
        "--eot-m", type=int, metavar="N", help="forwards averaged per EOT query (default 5)"
    )
    g.add_argument(
        "--fresh-forwards",
        type=int,
        metavar="N",
        help="forwards to re-judge each point (default 50)",
    )
    d = p.add_argument_group("query detection in front of the model (docs/detection.md)")
    d.add_argument(
        "--detect",
        nargs="?",
        const=DEFAULT,
        metavar="NAME",
        help=f"a stateful detector in front of every defense, in process: {', '.join(DETECTORS)} "
        f"(NAME omitted: {DEFAULT}); each image is attacked on its own behind it",
    )
    d.add_argument(
        "--detect-fpr",
        type=float,
        metavar="F",
        help="benign false-positive rate the threshold is calibrated to (default 0.001)",
    )
    d.add_argument(
        "--on-detect",
        choices=list(ON_DETECT),
        default=S,
        help="a flagged query: reject (default), ban the key after --ban-after flags, or log",
    )
    d.add_argument("--ban-after", type=int, metavar="N", help="flags before a ban (default 10)")
    d.add_argument(
        "--accounts",
        type=int,
        metavar="K",
        help="API keys the attacker spreads its queries over (sybil; default 1)",
    )
    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=int, metavar="N", help="images per chunk (default 100)")
    r.add_argument(
        "--forward-batch", type=int, metavar="N", help="most rows per model forward (default 1024)"
    )
    r.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=S,
        help="precision of the model's forward: autocast to bfloat16 / float16; attacks, "
        "projections, scores and calibration stay float32 (default float32)",
    )
    r.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="NHWC memory format for the model's weights and images (default off)",
    )
    r.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="torch.compile each defended model once; the first forwards compile (default off)",
    )
    r.add_argument("--seed", type=int, metavar="N", help="seed of everything random (default 0)")
    r.add_argument("--device", metavar="DEV", help="'auto' (default), 'cpu', 'cuda', 'cuda:1'")
    r.add_argument("--quiet", action="store_true", default=S, help="warnings only, no bars")
    r.add_argument("--out", metavar="FILE", help="result file (default results.jsonl)")
    r.add_argument("--config", metavar="FILE.toml", help="settings file (keys as the flags)")
    r.add_argument("--preset", choices=sorted(PRESETS), help="one of the paper's grids")


def _read_toml(path: str) -> dict[str, object]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise UsageError(
                "--config needs Python >= 3.11 (tomllib) or `pip install tomli`."
            ) from None
    try:
        with Path(path).expanduser().open("rb") as f:
            data = tomllib.load(f)
    except OSError as err:
        raise UsageError(f"Cannot read --config {path!r}: {err}.") from err
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"--config {path!r} is not valid TOML: {err}.") from err
    out = {k.replace("-", "_"): v for k, v in data.items()}
    if "config" in out:
        raise UsageError(f"--config {path!r} may not itself set `config`.")
    return out


def settings(args: argparse.Namespace) -> dict[str, object]:
    """The settings of `randfeat eval`: defaults < preset < `--config` < flags.

    Raises:
        UsageError: an unreadable `--config`, an unknown preset, or a preset without `--model`
            or without its data set.
    """
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config")}
    config = getattr(args, "config", None)
    from_file = _read_toml(str(config)) if config else {}
    name = flags.get("preset", from_file.get("preset"))
    merged: dict[str, object] = {}
    if name is not None:
        preset = PRESETS.get(str(name))
        if preset is None:
            raise UsageError(f"Unknown preset {name!r}. Valid presets: {', '.join(PRESETS)}.")
        given = {**from_file, **flags}
        if "model" not in given:
            raise UsageError(
                f"Preset {preset.name} covers models {', '.join(preset.models)}: choose one with "
                f"--model (one result file each, e.g. --out {preset.name}-MODEL.jsonl)."
            )
        data = str(given.get("data", ""))
        try:
            spec = DataSpec.parse(data) if data else None
        except ConfigError:
            spec = None
        if spec is None or spec.dataset.name != preset.data:
            raise UsageError(
                f"Preset {preset.name} needs --data {DATA_SETS[preset.data].usage} (a local "
                f"copy), got {data or 'none'!r}."
            )
        merged.update(preset.settings)
        merged["preset"] = preset.name
    merged.update(from_file)
    merged.update(flags)
    if "api_key" not in merged and os.environ.get(API_KEY_ENV):
        merged["api_key"] = os.environ[API_KEY_ENV]
    return merged


def _run(args: argparse.Namespace) -> int:
    values = settings(args)
    with logging_to_stderr(bool(values.get("quiet", False))):
        run_eval(EvalConfig.from_mapping(values))
    return 0


COMMAND = Command(
    name="eval",
    help="attack a model under the defenses and write a resumable JSONL result file",
    description=(
        "Run the evaluation grid (defenses × attacks × budgets) on a class-balanced subset of "
        "images. Rerun the same command to resume; run it under torchrun to shard it."
    ),
    add_arguments=_add_arguments,
    run=_run,
    suppress_defaults=True,
)
"""The `randfeat eval` subcommand."""
