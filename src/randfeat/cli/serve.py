"""`randfeat serve`: a (defended) model behind an HTTP API, until SIGTERM or Ctrl-C.

Builds the model ([build][randfeat.cli.served_model.build]: load, calibrate ν to `--target-drop` or take
`--nu`, wrap, with fresh or `--keyed-noise`), opens the query detector's store and calibrates its
threshold to `--detect-fpr` on benign images (`--detect`), logs what it serves, and runs
[run_server][randfeat.serve.run.run_server]. The API, the options and the deployment notes are
in `docs/serving.md`; `randfeat eval --target URL` attacks the result.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from randfeat.cli.command import Command, UsageError, logging_to_stderr
from randfeat.cli.served_model import (
    DEFENSES,
    ModelSpec,
    build,
    calibrate_detector,
    read_noise_key,
)
from randfeat.detect import DEFAULT, DETECTORS, Detector
from randfeat.eval.data.registry import DATA_SETS
from randfeat.eval.errors import ConfigError
from randfeat.eval.models.sources import MODEL_SOURCES
from randfeat.serve.config import ON_DETECT, DetectOptions, ServeOptions
from randfeat.serve.guard import DetectorSpec

__all__ = ["ADMIN_KEY_ENV", "COMMAND", "NOISE_KEY_ENV", "Detection", "detection", "options"]

T = TypeVar("T")

logger = logging.getLogger("randfeat.serve")

ADMIN_KEY_ENV = "RANDFEAT_ADMIN_KEY"
"""The environment variable `--admin-key` defaults to (keeps the key out of `ps` listings)."""
NOISE_KEY_ENV = "RANDFEAT_NOISE_KEY"
"""The environment variable `--keyed-noise` reads its key from without `--noise-key-file`
(64 hex digits)."""
DETECT_FPR = 0.001
"""`--detect-fpr`'s default: 0.1% of benign queries flagged."""
DETECT_IMAGES = 10_000
"""`--detect-images`' default: $10 / 0.001$ images (a flagged count of about 10 at the
default rate, so the rate is known within about a third)."""


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
    s.add_argument(
        "--reveal-config", action="store_true", help="tell ν and the detector in GET /v1/info"
    )
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    d = p.add_argument_group("query detection and keyed noise (docs/serving.md)")
    d.add_argument(
        "--detect",
        nargs="?",
        const=DEFAULT,
        metavar="NAME",
        help=f"observe every query with a stateful detector: {', '.join(DETECTORS)} "
        f"(default {DEFAULT})",
    )
    d.add_argument(
        "--detect-fpr",
        type=float,
        metavar="P",
        help=f"calibrate the threshold to flag this share of benign images (default {DETECT_FPR})",
    )
    d.add_argument(
        "--detect-images",
        type=int,
        metavar="N",
        help=f"benign images to calibrate on (default {DETECT_IMAGES}, or what --data has)",
    )
    d.add_argument(
        "--on-detect", choices=ON_DETECT, help="a flagged query: reject (default), ban or log"
    )
    d.add_argument(
        "--ban-after", type=int, metavar="N", help="ban a key after N flagged queries (10)"
    )
    d.add_argument(
        "--detect-store",
        metavar="SPEC",
        help="memory (default; a private SQLite file with --workers > 1), sqlite:PATH, "
        "redis://HOST:PORT/DB",
    )
    d.add_argument(
        "--detect-fail-open",
        action="store_true",
        help="answer unchecked when the store fails (default: 503, nothing unchecked)",
    )
    d.add_argument(
        "--keyed-noise",
        action="store_true",
        help="noise keyed by the image: the same image gets the same answer every time",
    )
    d.add_argument(
        "--noise-key-file",
        metavar="PATH",
        help=f"its key, 64 hex digits (default ${NOISE_KEY_ENV}, else one key for this run)",
    )


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


def _noise_key(args: argparse.Namespace) -> bytes | None:
    """The key of `--keyed-noise`: the file's, else `$RANDFEAT_NOISE_KEY`, else `None` (drawn
    from OS entropy once, in this process, and handed to every worker with the model)."""
    if not args.keyed_noise:
        if args.noise_key_file is not None:
            raise UsageError("--noise-key-file needs --keyed-noise (it is the key of that noise).")
        return None
    try:
        return read_noise_key(args.noise_key_file, os.environ.get(NOISE_KEY_ENV, ""))
    except ConfigError as err:
        raise UsageError(str(err)) from err


@dataclass(frozen=True)
class Detection:
    """The query detection `randfeat serve` was asked for.

    Attributes:
        spec: the detector, its store as given (no threshold yet).
        options: what a flagged query gets.
        fpr: the benign false-positive rate its threshold is calibrated to.
        images: the most benign images to calibrate on.
    """

    spec: DetectorSpec
    options: DetectOptions
    fpr: float
    images: int


def detection(args: argparse.Namespace) -> Detection | None:
    """The detection flags of `randfeat serve`, checked (no store is opened).

    Raises:
        UsageError: a detection flag without `--detect`, an unknown detector or store scheme,
            `--ban-after` below 1 or without `--on-detect ban`, a bad `--detect-fpr`.
    """
    given = {
        "--detect-fpr": args.detect_fpr,
        "--detect-images": args.detect_images,
        "--on-detect": args.on_detect,
        "--ban-after": args.ban_after,
        "--detect-store": args.detect_store,
        "--detect-fail-open": args.detect_fail_open or None,
    }
    if args.detect is None:
        stray = [flag for flag, value in given.items() if value is not None]
        if stray:
            raise UsageError(
                f"{', '.join(stray)} {'needs' if len(stray) == 1 else 'need'} --detect: "
                "add --detect (the default detector) or --detect NAME."
            )
        return None
    if args.ban_after is not None:
        if args.ban_after < 1:
            raise UsageError(f"Expected --ban-after to be an int >= 1, but got {args.ban_after}.")
        if args.on_detect != "ban":
            raise UsageError("--ban-after needs --on-detect ban (it is when a key is banned).")
    fpr = DETECT_FPR if args.detect_fpr is None else args.detect_fpr
    if not (0 < fpr <= 0.5):
        raise UsageError(f"Expected --detect-fpr to be a fraction in (0, 0.5], but got {fpr}.")
    images = DETECT_IMAGES if args.detect_images is None else args.detect_images
    need = math.ceil(1 / fpr - 1e-9)
    if images < need:
        raise UsageError(
            f"Expected --detect-images to be at least 1 / --detect-fpr = {need}, but got "
            f"{images}: fewer images cannot tell a rate of {fpr:g}."
        )
    try:
        spec = DetectorSpec(args.detect, args.detect_store or "memory")
        opts = DetectOptions(
            on_detect=args.on_detect or "reject",
            ban_after=10 if args.ban_after is None else args.ban_after,
            fail_open=bool(args.detect_fail_open),
        )
    except (TypeError, ValueError) as err:
        msg = str(err).replace("argument `detector`", "--detect")
        raise UsageError(msg.replace("argument `store`", "--detect-store")) from err
    return Detection(spec, opts, fpr, images)


def _from_args(cls: type[T], args: argparse.Namespace, **given: object) -> T:
    """`cls` built from the flags named like its fields (the flags' names are the fields')."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    return cls(**{n: given[n] if n in given else getattr(args, n) for n in names})


def options(args: argparse.Namespace) -> tuple[ModelSpec, ServeOptions]:
    """The model and server settings of `randfeat serve`'s arguments.

    Raises:
        UsageError: a bad value (the message names the flag) or an unreadable `--api-keys`.
    """
    found = detection(args)
    key = _noise_key(args)
    try:
        spec = _from_args(
            ModelSpec,
            args,
            layers=tuple(s.strip() for s in args.layers.split(",") if s.strip()),
            noise="keyed" if args.keyed_noise else "fresh",
            noise_key=key,
        )
        opts = _from_args(
            ServeOptions,
            args,
            api_keys=_api_keys(args.api_keys),
            admin_key=args.admin_key or os.environ.get(ADMIN_KEY_ENV) or None,
            detect=None if found is None else found.options,
        )
    except (TypeError, ValueError) as err:  # name the flag, not the Python argument
        flag = re.sub(r"argument `(\w+)`", lambda m: "--" + m[1].replace("_", "-"), str(err))
        raise UsageError(flag) from err
    if args.workers < 1:
        raise UsageError(f"Expected --workers to be an int >= 1, but got {args.workers}.")
    return spec, opts


def _redacted(store: str) -> str:
    """A store spec without a password (`redis://:secret@host` → `redis://***@host`)."""
    return re.sub(r"//[^/@]*@", "//***@", store)


def _open_detector(spec: DetectorSpec) -> Detector:
    """The detector with its store opened now (Redis reached), before any model work.

    Raises:
        UsageError: the store cannot be opened or reached; the message names it and the fix.
    """
    store = _redacted(spec.store)
    try:
        detector = spec.build()
        detector.accounts()  # a round trip to the store
    except ImportError as err:
        raise UsageError(
            f"--detect-store {store} needs the redis client: pip install redis ({err})."
        ) from err
    except Exception as err:  # OSError, ConnectionError, the clients' own errors
        raise UsageError(
            f"Cannot reach the detector's store {store} ({type(err).__name__}: "
            f"{_redacted(str(err))}). Start it (e.g. redis-server --port PORT), or fix the "
            "URL or path; or serve with --detect-store memory."
        ) from err
    return detector


def _run(args: argparse.Namespace) -> int:
    from randfeat.serve.run import run_server  # uvicorn and FastAPI: the serve extra

    spec, opts = options(args)
    found = detection(args)
    with contextlib.ExitStack() as stack:
        served: Detector | DetectorSpec | None = None
        if found is not None:
            store = found.spec.store
            if store == "memory" and args.workers > 1:  # the workers must share one store
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="randfeat-detect-"))
                store = f"sqlite:{Path(tmp) / 'detect.sqlite'}"
            elif store.startswith("sqlite:"):
                store = "sqlite:" + str(Path(store.removeprefix("sqlite:")).expanduser())
            found = replace(found, spec=replace(found.spec, store=store))
            detector = _open_detector(found.spec)  # before the model: a bad store fails first
            stack.callback(detector.close)
        with logging_to_stderr(args.log_level in ("warning", "error")):
            model, card = build(spec)
            if found is not None:
                threshold = calibrate_detector(
                    detector, spec, card.input_shape, fpr=found.fpr, images=found.images
                )
                if args.workers == 1:
                    served = detector
                    stack.pop_all()  # the server closes it
                else:  # each worker builds its own, adopting the key the store now holds
                    served = replace(found.spec, threshold=threshold)
            if spec.noise == "keyed":
                logger.info(
                    "keyed noise: key from %s",
                    "--noise-key-file"
                    if args.noise_key_file
                    else f"${NOISE_KEY_ENV}"
                    if spec.noise_key is not None
                    else "OS entropy, for this run (answers change at a restart)",
                )
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
            detector=served,
        )
    return 0


COMMAND = Command(
    name="serve",
    help="serve a (defended) model over HTTP for attacks to query (randfeat eval --target)",
    description=(
        "Load a model, calibrate the defense's ν to --target-drop on --data (or take --nu), "
        "and answer POST /v1/predict (JSON or .npy images in [0, 1]) with scores or labels, "
        "each image with its own noise (or keyed noise), optionally behind a stateful query "
        "detector (--detect), until SIGTERM. See docs/serving.md."
    ),
    add_arguments=_add_arguments,
    run=_run,
)
"""The `randfeat serve` subcommand."""
