"""`randfeat serve`: a (defended) model behind an HTTP API, until SIGTERM or Ctrl-C.

Builds the model ([build][randfeat.cli.served_model.build]: load, calibrate ν to `--target-drop` or take
`--nu`, wrap), logs what it serves, and runs [run_server][randfeat.serve.run.run_server]. The API,
the options and the deployment notes are in `docs/serving.md`; `randfeat eval --target URL`
attacks the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from randfeat.cli.command import Command, UsageError, logging_to_stderr
from randfeat.cli.served_model import DEFENSES, ModelSpec, build
from randfeat.eval.data.registry import DATA_SETS
from randfeat.eval.models.sources import MODEL_SOURCES
from randfeat.serve.config import ServeOptions

__all__ = ["ADMIN_KEY_ENV", "COMMAND"]

T = TypeVar("T")

ADMIN_KEY_ENV = "RANDFEAT_ADMIN_KEY"
"""The environment variable `--admin-key` defaults to (keeps the key out of `ps` listings)."""


def _add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("the model and its defense")
    model_usage = " or ".join(s.usage for s in MODEL_SOURCES)
    m.add_argument("--model", default="digits-cnn", metavar="NAME", help=model_usage)
    m.add_argument(
        "--pretrained", action="store_true", help="load timm's pretrained weights (cached)"
    )
    m.add_argument("--checkpoint", metavar="PATH", help="a local state_dict for the model")
    m.add_argument("--num-classes", type=int, metavar="N", help="classifier outputs")
    m.add_argument("--image-size", type=int, metavar="N", help="image side (default: the data's)")
    m.add_argument(
        "--data",
        metavar="SPEC",
        help=f"images for the input shape and calibration: "
        f"{', '.join(repr(d.usage) for d in DATA_SETS.values())} (default digits for digits-cnn)",
    )
    m.add_argument("--defense", choices=DEFENSES, default="feature", help="default feature")
    m.add_argument(
        "--layers", default="penultimate", metavar="LIST", help="feature layers (penultimate)"
    )
    nu = m.add_mutually_exclusive_group()
    nu.add_argument("--nu", type=float, metavar="V", help="the noise variance ν (no calibration)")
    nu.add_argument(
        "--target-drop",
        type=float,
        default=0.02,
        metavar="D",
        help="calibrate ν to this clean-accuracy drop on --data (default 0.02)",
    )
    m.add_argument("--calib-images", type=int, default=1000, metavar="N", help="(default 1000)")
    m.add_argument("--seed", type=int, default=0, help="seed of the calibration (not the noise)")
    m.add_argument("--device", default="cpu", metavar="DEV", help="'cpu' (default), 'cuda:0'")
    s = p.add_argument_group("the server")
    s.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    s.add_argument("--workers", type=int, default=1, help="processes, each with its own noise")
    s.add_argument("--output", choices=("scores", "labels"), default="scores")
    s.add_argument("--max-batch", type=int, default=64, metavar="N", help="images per forward")
    s.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS", help="batching wait")
    s.add_argument("--max-images", type=int, default=256, metavar="N", help="images per request")
    s.add_argument("--max-body-mb", type=float, default=100.0, metavar="MB", help="body limit")
    s.add_argument("--max-queries-per-key", type=int, metavar="N", help="429 after N images")
    s.add_argument("--api-keys", metavar="FILE", help="the allowed keys, one a line (else any)")
    s.add_argument(
        "--admin-key", metavar="KEY", help=f"may read GET /v1/usage (default ${ADMIN_KEY_ENV})"
    )
    s.add_argument("--usage-db", metavar="PATH", help="SQLite file of the per-key counts")
    s.add_argument("--reveal-config", action="store_true", help="tell ν in GET /v1/info")
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")


def _api_keys(path: str | None) -> frozenset[str] | None:
    if path is None:
        return None
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except OSError as err:
        raise UsageError(f"Cannot read --api-keys {path!r}: {err}.") from err
    keys = frozenset(k.strip() for k in lines if k.strip() and not k.startswith("#"))
    if not keys:
        raise UsageError(f"--api-keys {path!r} holds no key (one a line).")
    return keys


def _from_args(cls: type[T], args: argparse.Namespace, **given: object) -> T:
    """`cls` built from the flags named like its fields (the flags' names are the fields')."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    return cls(**{n: given[n] if n in given else getattr(args, n) for n in names})


def options(args: argparse.Namespace) -> tuple[ModelSpec, ServeOptions]:
    """The model and server settings of `randfeat serve`'s arguments.

    Raises:
        UsageError: a bad value (the message names the flag) or an unreadable `--api-keys`.
    """
    try:
        spec = _from_args(
            ModelSpec, args, layers=tuple(s.strip() for s in args.layers.split(",") if s.strip())
        )
        opts = _from_args(
            ServeOptions,
            args,
            api_keys=_api_keys(args.api_keys),
            admin_key=args.admin_key or os.environ.get(ADMIN_KEY_ENV) or None,
        )
    except (TypeError, ValueError) as err:  # name the flag, not the Python argument
        flag = re.sub(r"argument `(\w+)`", lambda m: "--" + m[1].replace("_", "-"), str(err))
        raise UsageError(flag) from err
    if args.workers < 1:
        raise UsageError(f"Expected --workers to be an int >= 1, but got {args.workers}.")
    return spec, opts


def _run(args: argparse.Namespace) -> int:
    from randfeat.serve.run import run_server  # uvicorn and FastAPI: the serve extra

    spec, opts = options(args)
    with logging_to_stderr(args.log_level in ("warning", "error")):
        model, card = build(spec)
    if opts.usage_db is not None:
        opts = replace(opts, usage_db=str(Path(opts.usage_db).expanduser()))
    run_server(
        model,
        card,
        opts,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
    )
    return 0


COMMAND = Command(
    name="serve",
    help="serve a (defended) model over HTTP for attacks to query (randfeat eval --target)",
    description=(
        "Load a model, calibrate the defense's ν to --target-drop on --data (or take --nu), "
        "and answer POST /v1/predict (JSON or .npy images in [0, 1]) with scores or labels, "
        "each image with its own noise, until SIGTERM. See docs/serving.md."
    ),
    add_arguments=_add_arguments,
    run=_run,
)
"""The `randfeat serve` subcommand."""
