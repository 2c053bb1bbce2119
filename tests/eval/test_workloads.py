"""The benign query streams (`randfeat.eval.workloads`): sizes, ranges, seeds, what each client sends."""

from __future__ import annotations

import pytest
import torch

from randfeat.eval.workloads import WORKLOADS, benign_stream


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_each_stream_is_images_in_range_and_seeded(name: str, images: torch.Tensor) -> None:
    a, b = benign_stream(name, images, seed=1), benign_stream(name, images, seed=1)
    assert a.shape[1:] == images.shape[1:] and a.dtype == images.dtype
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b)


def test_sizes_follow_the_table(images: torch.Tensor) -> None:
    n = len(images)
    assert len(benign_stream("in-order", images)) == n
    assert len(benign_stream("re-upload", images)) == n * 3
    # occlusion: window 28 // 4 = 7, stride 28 // 8 = 3: (28 - 7) // 3 + 1 = 8 positions a side
    assert len(benign_stream("occlusion", images)) == 4 * (1 + 8 * 8)
    assert len(benign_stream("lime", images)) == 4 * 1000
    assert len(benign_stream("retry", images)) == n * 3


def test_what_each_client_sends(images: torch.Tensor) -> None:
    assert torch.equal(benign_stream("in-order", images), images)
    retry = benign_stream("retry", images)
    assert torch.equal(retry[0::3], images) and torch.equal(retry[2::3], images)
    up = benign_stream("re-upload", images, seed=3)
    assert torch.equal(up[: len(images)], images)
    changed = up[len(images) :]
    # every re-upload differs from every original, yet stays close to one of them
    dist = torch.cdist(changed.flatten(1), images.flatten(1))
    assert bool((dist.min(1).values > 0).all())
    occ = benign_stream("occlusion", images)
    assert torch.equal(occ[0], images[0])
    assert int((occ[1] != images[0]).sum()) == 7 * 7  # one 7×7 window hidden
    lime = benign_stream("lime", images, seed=4)
    assert torch.equal(lime[0], images[0]) and not torch.equal(lime[1], images[0])


def test_different_seeds_give_different_streams(images: torch.Tensor) -> None:
    assert not torch.equal(
        benign_stream("lime", images, seed=1), benign_stream("lime", images, seed=2)
    )


def test_bad_input_is_refused_with_the_fix(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="Did you mean 'lime'"):
        benign_stream("lim", images)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\].*unsqueeze"):
        benign_stream("retry", images[:, 0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        benign_stream("retry", images * 2)
    with pytest.raises(TypeError, match="float batch"):
        benign_stream("retry", (images * 255).to(torch.uint8))
