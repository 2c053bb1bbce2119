"""Fixtures shared by the evaluation tests: a small, consistent result-file header."""

from __future__ import annotations

import pytest

from randfeat.eval.results.file import FORMAT, FORMAT_VERSION
from randfeat.eval.results.records import (
    AttackInfo,
    CalibratedDefense,
    DataInfo,
    Header,
    ModelInfo,
    Radii,
)


@pytest.fixture
def sample_header() -> Header:
    """A header of 3 attacked digits under base and feature@0.02, attacked by RayS."""
    return Header(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        config={"votes": 9, "attacks": ["rays"]},
        settings_not_compared=("out",),
        versions={"randfeat": "0"},
        device="cpu",
        world_size=1,
        created="2024-01-01T00:00:00Z",
        eps=Radii(0.2, 1.5, "digits default"),
        data=DataInfo("digits", None, 540, 10, (1, 8, 8)),
        model=ModelInfo("digits-cnn", 10, 10, None),
        defenses=("base", "feature@0.02"),
        attacks={"rays": AttackInfo("linf", 0.2, "RayS(eps=0.2)")},
        calibration={
            "feature@0.02": CalibratedDefense(
                "feature",
                ("head.pre",),
                0.02,
                2.5,
                0.98,
                0.96,
                0.02,
                400,
                50,
                "tol",
                "projected",
                1,
                0.5,
            )
        },
        attacked_indices=(3, 1, 2),
        calibration_indices=(7, 8),
        n_attacked=3,
        n_calibration=2,
        n_chunks=1,
        rows_expected=9,
    )
