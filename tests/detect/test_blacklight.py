"""The Blacklight port: a small case computed by hand, the official rule, the two defects fixed."""

from __future__ import annotations

import torch

from randfeat.detect import DETECTORS
from randfeat.detect.blacklight import quantize, shared_counts, top_distinct
from randfeat.detect.hashing import hash_coefficients, keyed_hash_reference, make_key, window_hash


def test_fingerprint_of_a_six_pixel_image_by_hand() -> None:
    # 255·x = [0, 25.5, 51, 127.5, 229.5, 255]; / 50 = [0, .51, 1.02, 2.55, 4.59, 5.1];
    # rounded: [0, 1, 1, 3, 5, 5]. The official (255x + s) % 255 would turn the last 5 into 0.
    x = torch.tensor([0.0, 0.1, 0.2, 0.5, 0.9, 1.0]).view(1, 1, 2, 3)
    levels = quantize(x, torch.zeros(6), 50)
    assert levels.tolist() == [[0, 1, 1, 3, 5, 5]]
    # windows of 3, step 1: [0,1,1] [1,1,3] [1,3,5] [3,5,5]; keep the 2 largest hashes
    r = hash_coefficients(make_key(7), "blacklight window", (3,))
    pairs = [(int(a), int(b)) for a, b in r.long().tolist()]
    windows = [[0, 1, 1], [1, 1, 3], [1, 3, 5], [3, 5, 5]]
    by_hand = sorted((keyed_hash_reference(w, pairs) for w in windows), reverse=True)
    hashes = window_hash(levels, r, 1)
    assert hashes.tolist() == [[keyed_hash_reference(w, pairs) for w in windows]]
    assert top_distinct(hashes, 2).tolist() == [by_hand[:2]]
    # step 2: windows at 0 and 2 (the official loop, range((6 - 3 + 1) // 2), agrees)
    assert window_hash(levels, r, 2).tolist() == [
        [keyed_hash_reference(windows[0], pairs), keyed_hash_reference(windows[2], pairs)]
    ]


def test_top_distinct_drops_repeats_and_pads() -> None:
    h = torch.tensor([[5, 9, 9, 1, 5, 7], [3, 3, 3, 3, 3, 3]])
    assert top_distinct(h, 3).tolist() == [[9, 7, 5], [3, -1, -1]]


def test_score_is_the_most_hashes_shared_with_one_stored_query() -> None:
    # postings of one query's 3 keys: query 4 appears under 2 keys, query 8 under 1
    postings = torch.tensor([[[4, 8, -1], [4, -1, -1], [-1, -1, -1]]])
    count, seq = shared_counts(postings)
    assert count.tolist() == [2] and seq.tolist() == [4]


def test_detector_counts_shared_hashes_and_flags_above_the_threshold() -> None:
    det = DETECTORS["blacklight"](seed=3, window=3, top=4, threshold=2)
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 4, 4, generator=gen)
    b = a.clone()
    b[0, 0, 3, 3] = 1 - b[0, 0, 3, 3]  # one pixel changed: the windows through it change
    ka, _ = det.fingerprint(a)
    kb, _ = det.fingerprint(b)
    shared = len(set(ka[0].tolist()) & set(kb[0].tolist()) - {-1})
    assert det.observe(a).score.tolist() == [0.0]
    v = det.observe(b)
    assert v.score.tolist() == [float(shared)]
    assert v.flagged.tolist() == [shared > 2]
    assert det.observe(a).score.tolist() == [4.0]  # an exact repeat shares all four


def test_pixel_one_is_not_pixel_zero() -> None:
    # the official `% 255` maps 1.0 onto 0.0: an all-white and an all-black image would match
    det = DETECTORS["blacklight"](seed=0)
    det.observe(torch.zeros(1, 1, 8, 8))
    assert det.observe(torch.ones(1, 1, 8, 8)).score.tolist() == [0.0]


def test_the_salt_is_secret_and_per_key() -> None:
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    k1, _ = DETECTORS["blacklight"](seed=1).fingerprint(x)
    k1b, _ = DETECTORS["blacklight"](seed=1).fingerprint(x)
    k2, _ = DETECTORS["blacklight"](seed=2).fingerprint(x)
    k3, _ = DETECTORS["blacklight"]().fingerprint(x)
    assert torch.equal(k1, k1b)
    assert len(set(k1[0].tolist()) & set(k2[0].tolist())) == 0
    assert len(set(k1[0].tolist()) & set(k3[0].tolist())) == 0
