"""Shared fixtures: the embedded digits data set and a trained digits CNN (once per session).

The CNN is trained into a cache directory under pytest's ``tmp_path_factory`` so the tests never
read or write the user's cache (``$RANDFEAT_CACHE`` / ``~/.cache/randfeat``); training takes a few
seconds on one CPU core and happens once per session (once per worker under pytest-xdist).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from randfeat.eval import data as rf_data
from randfeat.eval import models as rf_models


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
