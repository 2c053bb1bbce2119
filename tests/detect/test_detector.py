"""Every detector, on every store: repeats flagged, strangers not, one index, eviction, bounds."""

from __future__ import annotations

import itertools

import pytest
import torch
from _detect_images import probes, smooth_images
from hypothesis import given, settings
from hypothesis import strategies as st

from randfeat.detect import DEFAULT, DETECTORS, AccountCounts, Verdict

NAMES = sorted(DETECTORS)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_registry_names_blacklight_and_the_default() -> None:
    assert set(DETECTORS) == {"blacklight", "pooled-linf"}
    assert DEFAULT == "pooled-linf"
    for name, cls in DETECTORS.items():
        assert cls.name == name


@pytest.mark.parametrize("name", NAMES)
def test_exact_repeats_are_flagged_and_unrelated_images_are_not(name: str) -> None:
    det = DETECTORS[name](seed=0)
    x = smooth_images(40, seed=1)
    first = det.observe(x, account="alice")
    assert not first.flagged.any(), first.score
    again = det.observe(x[:5], account="alice")
    assert again.flagged.all()
    assert again.match.tolist() == first.ids[:5].tolist()
    assert det.observe(smooth_images(40, seed=2), account="bob").flagged.sum() == 0


def test_the_default_flags_nes_probes_and_blacklight_does_not() -> None:
    # NES probes x ± σu (σ = 0.02, the attack's default at ε = 0.1) move almost every pixel a
    # little: every 20-pixel window of Blacklight changes, the pooled image barely does
    x = smooth_images(1, seed=3)
    p = probes(x, 20, 0.02, seed=4)
    ours, theirs = DETECTORS[DEFAULT](seed=0), DETECTORS["blacklight"](seed=0)
    assert ours.observe(p).flagged[1:].all()
    assert not theirs.observe(p).flagged.any()


@pytest.mark.parametrize("name", NAMES)
def test_rows_of_one_batch_are_checked_against_the_earlier_rows(name: str) -> None:
    det = DETECTORS[name](seed=0)
    x = smooth_images(3, seed=5)
    v = det.observe(torch.cat([x, x[1:2]]), account="mallory", tag="probe")
    assert v.flagged.tolist() == [False, False, False, True]
    assert v.match.tolist() == [-1, -1, -1, int(v.ids[1])]
    assert v.same_account.tolist() == [False, False, False, True]
    assert v.match_account == (None, None, None, "mallory")
    assert v.match_tag == (None, None, None, "probe")


@pytest.mark.parametrize("name", NAMES)
def test_accounts_share_one_index_and_are_counted_apart(name: str, store_spec: str) -> None:
    det = DETECTORS[name](seed=0, store=store_spec)
    x = smooth_images(4, seed=6)
    det.observe(x, account="alice", tag="benign")
    v = det.observe(x[2:3], account="bob")  # another key, the same image: still matched
    assert v.flagged.tolist() == [True]
    assert v.same_account.tolist() == [False]
    assert v.match_account == ("alice",) and v.match_tag == ("benign",)
    assert det.counts("alice") == AccountCounts(4, 0)
    assert det.counts("bob") == AccountCounts(1, 1)
    assert det.counts("carol") == AccountCounts(0, 0)
    assert det.counts() == AccountCounts(5, 1)
    assert det.accounts() == {"alice": AccountCounts(4, 0), "bob": AccountCounts(1, 1)}
    det.close()


@pytest.mark.parametrize("name", NAMES)
def test_capacity_evicts_the_oldest_first(name: str, store_spec: str) -> None:
    det = DETECTORS[name](seed=0, store=store_spec, capacity=3)
    x = smooth_images(4, seed=7)
    for i in range(4):  # one at a time into a ring of three: x[0] is indexed, then evicted
        det.observe(x[i : i + 1])
    assert det.stored() == 3
    assert det.observe(x[3:4]).flagged.tolist() == [True]
    assert det.observe(x[0:1]).score.tolist() == [0.0]
    det.close()


@pytest.mark.parametrize("name", NAMES)
def test_ttl_evicts_by_age(name: str, store_spec: str) -> None:
    clock = Clock()
    det = DETECTORS[name](seed=0, store=store_spec, ttl=10, clock=clock)
    x = smooth_images(2, seed=8)
    det.observe(x[0:1])
    clock.now += 5
    det.observe(x[1:2])
    clock.now += 7  # x[0] is 12 s old, x[1] 7 s
    assert det.stored() == 1
    assert det.observe(x[0:1]).score.tolist() == [0.0]
    assert det.observe(x[1:2]).flagged.tolist() == [True]
    det.close()


@pytest.mark.parametrize("name", NAMES)
def test_the_posting_cap_bounds_what_a_lookup_reads(name: str, store_spec: str) -> None:
    # 60 stored queries share every key (a blank image): a lookup still reads K · cap entries
    cap = 4
    det = DETECTORS[name](seed=0, store=store_spec, posting_cap=cap)
    blank = torch.zeros(60, 1, 28, 28)
    for i in range(0, 60, 20):
        det.observe(blank[i : i + 20])
    keys, _ = det.fingerprint(blank[:1])
    found = det.store.lookup(keys, 2e9)
    k = int((keys >= 0).sum())
    assert found.postings.shape == (1, keys.shape[1], cap)
    assert int((found.postings >= 0).sum()) == k * cap  # full lists: exactly the bound
    assert found.seqs.tolist() == [56, 57, 58, 59]  # the newest four
    det.close()


@settings(max_examples=15, deadline=None)
@given(
    picks=st.lists(st.integers(0, 5), min_size=1, max_size=12),
    cuts=st.lists(st.integers(1, 11), max_size=4),
    name=st.sampled_from(NAMES),
)
def test_a_batch_split_anyhow_gives_the_same_verdicts(
    picks: list[int], cuts: list[int], name: str
) -> None:
    # rows are compared with every earlier row, stored or in the batch: one call or several
    x = smooth_images(6, seed=9)[picks]
    whole = DETECTORS[name](seed=1).observe(x)
    det = DETECTORS[name](seed=1)
    bounds = sorted({0, len(picks), *[c for c in cuts if c < len(picks)]})
    parts = [det.observe(x[a:b]) for a, b in itertools.pairwise(bounds)]
    for field in ("flagged", "score", "ids", "match", "same_account"):
        got = torch.cat([getattr(p, field) for p in parts])
        assert torch.equal(got, getattr(whole, field)), field


@pytest.mark.parametrize("name", NAMES)
def test_threshold_is_settable_and_repr_keeps_the_key_secret(name: str) -> None:
    det = DETECTORS[name](seed=5)
    assert det.threshold == DETECTORS[name].default_threshold
    det.threshold = 0.5
    assert det.threshold == 0.5
    x = smooth_images(1, seed=10)
    det.observe(x)
    text = repr(det)
    assert text.startswith(type(det).__name__ + "(") and "threshold=0.5" in text
    secret = det._key  # the test may look: nothing printed may contain it
    assert secret.hex() not in text and repr(secret) not in text and "key" not in text
    with pytest.raises(ValueError, match="threshold"):
        det.threshold = float("nan")


def test_a_verdict_round_trips_through_json() -> None:
    det = DETECTORS[DEFAULT](seed=0)
    x = smooth_images(2, seed=11)
    v = det.observe(torch.cat([x, x[:1]]), account="a", tag="t")
    back = Verdict.from_json(v.to_json())
    for field in ("flagged", "score", "ids", "match", "same_account"):
        assert torch.equal(getattr(back, field), getattr(v, field))
    assert (back.match_account, back.match_tag, back.account) == (
        v.match_account,
        v.match_tag,
        v.account,
    )
    assert len(v) == 3 and v.n_flagged == 1


@pytest.mark.parametrize("name", NAMES)
def test_any_float_dtype_and_the_cpu_give_the_same_keys(name: str) -> None:
    det = DETECTORS[name](seed=0)
    x = smooth_images(3, seed=12)
    k32, p32 = det.fingerprint(x)
    k64, p64 = det.fingerprint(x.double())
    assert torch.equal(k32, k64) and torch.equal(p32, p64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_gives_the_cpu_verdicts(name: str) -> None:
    x = smooth_images(30, seed=13)
    x = torch.cat([x, probes(x[:1], 10, 0.02, seed=1)])
    cpu = DETECTORS[name](seed=0).observe(x)
    gpu = DETECTORS[name](seed=0).observe(x.cuda())
    assert gpu.flagged.device.type == "cuda"
    assert torch.equal(gpu.score.cpu(), cpu.score) and torch.equal(gpu.match.cpu(), cpu.match)
