"""The keyed hash: the same as its plain-Python reference, the same windowed, keyed by the key."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from randfeat.detect.hashing import (
    hash_coefficients,
    key_digest,
    keyed_hash,
    keyed_hash_reference,
    make_key,
    mix32,
    window_hash,
)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.integers(-1000, 1000), min_size=1, max_size=12),
    seed=st.integers(0, 2**31),
)
def test_keyed_hash_matches_the_python_reference(values: list[int], seed: int) -> None:
    key = make_key(seed)
    r = hash_coefficients(key, "test", (len(values),))
    got = int(keyed_hash(torch.tensor(values), r))
    want = keyed_hash_reference(values, [(int(a), int(b)) for a, b in r.long().tolist()])
    assert got == want
    assert 0 <= got < 2**62


def test_window_hash_is_keyed_hash_of_every_window() -> None:
    gen = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 11, (3, 50), generator=gen).double()
    r = hash_coefficients(make_key(1), "w", (7,))
    for step in (1, 3):
        want = keyed_hash(levels.unfold(1, 7, step), r)
        assert torch.equal(window_hash(levels, r, step), want)


def test_the_key_decides_the_hash_and_seeds_reproduce_it() -> None:
    v = torch.arange(20).view(2, 10)
    a = keyed_hash(v, hash_coefficients(make_key(1), "x", (10,)))
    b = keyed_hash(v, hash_coefficients(make_key(1), "x", (10,)))
    c = keyed_hash(v, hash_coefficients(make_key(2), "x", (10,)))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert make_key(None) != make_key(None)  # OS entropy
    assert len(make_key(None)) == 32
    assert key_digest(make_key(1)) == key_digest(make_key(1)) != key_digest(make_key(2))


def test_mix32_stays_in_32_bits_and_is_a_bijection_on_a_sample() -> None:
    h = torch.arange(0, 2**20, dtype=torch.long) * 4093
    m = mix32(h & 0xFFFFFFFF)
    assert int(m.min()) >= 0 and int(m.max()) < 2**32
    assert torch.unique(m).numel() == h.numel()
