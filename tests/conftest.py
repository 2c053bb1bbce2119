"""Shared fixtures: the embedded digits data set and a trained digits CNN (once per session).

The CNN is trained into a cache directory under pytest's ``tmp_path_factory`` so the tests never
read or write the user's cache (``$RANDFEAT_CACHE`` / ``~/.cache/randfeat``); training takes a few
seconds on one CPU core and happens once per session (once per worker under pytest-xdist).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from randfeat.eval import models as rf_models
from randfeat.eval.data import loaders as rf_data


@pytest.fixture(scope="session")
def digits_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-private cache directory holding the trained digits CNN."""
    return tmp_path_factory.mktemp("randfeat_cache")


@pytest.fixture(scope="session")
def digits() -> rf_data.Digits:
    """The fixed digits split: ``x_*: [N, 1, 8, 8]`` float32 in [0, 1], ``y_*: [N]`` int64.

    Session-scoped and shared: tests must not modify the tensors in place.
    """
    return rf_data.digits()


@pytest.fixture(scope="session")
def digits_model(digits_cache_dir: Path) -> rf_models.DigitsCNN:
    """The trained digits CNN (eval mode, >= 97% test accuracy, classifier ``head``).

    Session-scoped and shared: tests must not modify its parameters (wrap it, don't train it).
    """
    return rf_models.digits_cnn(cache_dir=digits_cache_dir)


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """Start real uvicorn servers on free 127.0.0.1 ports; all are stopped at teardown.

    `serve(model, card=None, **options) -> base URL`: `card` defaults to the digits CNN's
    (`(1, 8, 8)`, 10 classes, defended iff `model` is a wrapper); `options` are
    [ServeOptions][randfeat.serve.config.ServeOptions] fields.
    """
    from randfeat import RandomizedFeatureWrapper
    from randfeat.serve.app import create_app
    from randfeat.serve.config import ModelCard, ServeOptions
    from randfeat.serve.run import serve_in_thread

    with contextlib.ExitStack() as stack:

        def start(model: Callable[..., Any], card: ModelCard | None = None, **options: Any) -> str:
            if card is None:
                defended = isinstance(model, RandomizedFeatureWrapper)
                card = ModelCard(
                    "digits-cnn",
                    (1, 8, 8),
                    10,
                    defended=defended,
                    defense="feature" if defended else "base",
                )
            app = create_app(model, card, ServeOptions(**options))
            return stack.enter_context(serve_in_thread(app))

        yield start


@pytest.fixture(scope="session")
def fashion_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory shared by all pytest-xdist workers of a run.

    Under xdist each worker has its own base temporary directory; their parent is the run's. The
    Fashion-MNIST CNN is trained into this shared directory once: the cache's lock makes the other
    workers wait for its file instead of training again.
    """
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / "randfeat_fashion_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def fashion_model(fashion_cache_dir: Path) -> rf_models.FashionCNN:
    """The real fashion-cnn, trained once per test run into `fashion_cache_dir`.

    Only for tests marked to need the real Fashion-MNIST files (Debian's `dataset-fashion-mnist`).
    """
    return rf_models.fashion_cnn(root=rf_data.FASHION_MNIST_DEBIAN_DIR, cache_dir=fashion_cache_dir)
