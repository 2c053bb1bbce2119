"""`calibrate`: the threshold flags at most the target share of benign images, here and on
held-out images of the same traffic, within the standard error."""

from __future__ import annotations

import math

import pytest
import torch
from _detect_images import smooth_images
from torch import Tensor

from randfeat.detect import DETECTORS

N = 5000
FPR = 0.02


def benign(n: int, seed: int) -> Tensor:
    """Benign traffic with near neighbours: 8 base images, each seen with its own amount of
    smooth noise (amplitude uniform in [0.1, 0.6]), so scores spread over many values."""
    gen = torch.Generator().manual_seed(seed)
    base = smooth_images(8, seed=100)
    which = torch.randint(0, 8, (n,), generator=gen)
    amplitude = 0.1 + 0.5 * torch.rand(n, 1, 1, 1, generator=gen)
    return (base[which] + amplitude * (smooth_images(n, seed=seed) - 0.5)).clamp(0, 1)


def leave_one_out(name: str, x: Tensor, threshold: float) -> Tensor:
    """Each image's score against all the others (the calibration rule), with public calls:
    observed in order by one detector and in reverse by another, the larger score kept."""
    forward = DETECTORS[name](seed=0, threshold=threshold).observe(x).score
    backward = DETECTORS[name](seed=0, threshold=threshold).observe(x.flip(0)).score.flip(0)
    return torch.maximum(forward, backward)


@pytest.mark.parametrize(
    "name", [pytest.param("blacklight", marks=pytest.mark.slow), "pooled-linf"]
)
@pytest.mark.slow
def test_calibrate_hits_the_target_fpr_on_held_out_traffic(name: str) -> None:
    det = DETECTORS[name](seed=0)
    threshold = det.calibrate(benign(N, seed=1), FPR)
    assert det.threshold == threshold

    # on its own images, by construction: at most FPR above the threshold, more at or above it
    own = leave_one_out(name, benign(N, seed=1), threshold)
    assert float((own > threshold).float().mean()) <= FPR
    assert float((own >= threshold).float().mean()) > FPR

    # held-out images of the same traffic. Standard error of a rate p = 0.02 over n = 5000:
    # sqrt(0.02 · 0.98 / 5000) = 0.00198; the threshold's own rate carries the same error, so
    # the difference has sqrt(2) · 0.00198 = 0.0028; three of them: 0.0084. Scores are
    # discrete (1/255 steps, or whole shared hashes), so the rate can also fall short of FPR by
    # the share of images tied at the threshold.
    held = leave_one_out(name, benign(N, seed=2), threshold)
    rate = float((held > threshold).float().mean())
    tied = float((held == threshold).float().mean())
    tolerance = 3 * math.sqrt(2 * FPR * (1 - FPR) / N)
    assert FPR - tied - tolerance <= rate <= FPR + tolerance, (rate, tied, threshold)


def test_more_benign_images_are_needed_for_a_smaller_rate() -> None:
    det = DETECTORS["pooled-linf"](seed=0)
    with pytest.raises(ValueError, match=r"1000 images.*>= 10000 for a stable threshold"):
        det.calibrate(benign(999, seed=3), 1e-3)
    det.calibrate([benign(500, seed=3), (benign(500, seed=4), torch.zeros(500))], 1e-3)
    assert det.stored() == 0  # calibration used a private store
