"""Keyed noise (`wrap(..., noise="keyed")`, randfeat.keyed): a function of the key and each row.

Most tests read the noise exactly: `Probe(d)` outputs zeros `[N, d]` whatever its input, so a
wrapper with ν = 1 at its output returns ε itself (0 + 1.0·ε, no rounding).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import pickle
import secrets
import threading

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from _deploy_models import draw_in_forked_children
from randfeat import RandomizedFeatureWrapper, wrap
from randfeat.keyed import KeyedNoise, mix32, mul32

KEY = bytes(range(32))


class Probe(nn.Module):
    """`x -> zeros [N, d]` (in x's dtype): the noise added at its output is the whole output."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = d

    def forward(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], self.d)


def probe(d: int, nu: float | Tensor = 1.0, key: bytes | None = KEY) -> RandomizedFeatureWrapper:
    return wrap(nn.Sequential(Probe(d)), ["0"], nu=nu, noise="keyed", key=key)


def corr(a: Tensor, b: Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1].item()


def fmix32(h: int) -> int:
    """murmur3's 32-bit finalizer in Python integers (the reference for `mix32`)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


# ---------------------------------------------------------------------------- the integer mixing
@pytest.mark.slow
def test_mix32_is_murmur3_fmix32_on_int64_lanes() -> None:
    """`mix32` (32-bit products as two 16-bit halves, every intermediate below 2^48) equals
    murmur3's finalizer in Python's exact integers, at the edges (0, 2^31, 2^32 - 1) too, eagerly
    and compiled; `mul32` is the product modulo 2^32."""
    g = torch.Generator().manual_seed(0)
    a = torch.cat(
        [torch.tensor([0, 1, 2**31, 2**32 - 1]), torch.randint(0, 2**32, (2000,), generator=g)]
    )
    expected = torch.tensor([fmix32(int(v)) for v in a])
    assert torch.equal(mix32(a), expected)
    assert torch.equal(torch.compile(mix32)(a), expected)
    assert torch.equal(
        mul32(a, 0xFFFFFFFF), torch.tensor([(int(v) * 0xFFFFFFFF) % 2**32 for v in a])
    )


# ---------------------------------------------------------------------------- determinism
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 9),
    d=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    data=st.data(),
)
def test_same_rows_give_the_same_noise_in_any_order_and_batch_size(
    n: int, d: int, dtype: torch.dtype, data: st.DataObject
) -> None:
    """Any permutation, any sub-batch and any repetition of the rows: bit for bit the same noise
    per row (duplicates included), and distinct rows get distinct noise."""
    torch.manual_seed(n * 1000 + d)
    x = torch.rand(n, 3, 5, 7).to(dtype)
    w = probe(d)
    with torch.no_grad():
        ref = w(x)
        assert ref.dtype == dtype and ref.shape == (n, d)
        perm = torch.tensor(data.draw(st.permutations(range(n))))
        assert torch.equal(w(x[perm]), ref[perm])
        pick = torch.tensor(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=12)))
        assert torch.equal(w(x[pick]), ref[pick])
        for i in range(n):
            assert torch.equal(w(x[i : i + 1]), ref[i : i + 1])
    distinct = {tuple(r.tolist()) for r in x.flatten(1)}
    assert len({tuple(r.tolist()) for r in ref}) == len(distinct)


def test_batch_invariance_across_hash_blocks_and_layouts() -> None:
    """Rows of 3x64x64 float32 (12,288 lanes: three 4,096-lane chunks) are hashed in blocks whose
    size depends on the batch (one block for 1 row, two for 64): same noise either way. A
    `channels_last` batch is hashed in logical order, so it gets the same noise too."""
    x = torch.rand(64, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    w = probe(16)
    with torch.no_grad():
        ref = w(x)
        assert torch.equal(w(x[5:6]), ref[5:6])
        assert torch.equal(w(x.flip(0)), ref.flip(0))
        assert torch.equal(w(x.to(memory_format=torch.channels_last)), ref)
        assert torch.equal(w(x), ref)  # and again, from the cached coefficients


def test_a_real_model_answers_the_same_image_alike_in_any_batch() -> None:
    """timm resnet18 keyed at `layer3` and `penultimate`: one image alone, or second in a batch
    of 5, gets the same noise (outputs agree up to the convolutions' batch-dependent rounding);
    the same batch twice is bit for bit the same; `predict`'s votes are one answer."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    w = wrap(model, ["layer3", "penultimate"], nu=0.5, noise="keyed")
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        out = w(x)
        assert torch.equal(w(x), out)
        assert torch.allclose(w(x[1:2]), out[1:2], atol=1e-4)
        assert not torch.allclose(out, model(x), atol=1e-2)  # the noise is there
        assert torch.equal(w.predict(x, votes=9), out.argmax(dim=1))


# ---------------------------------------------------------------------------- independence
def test_one_changed_pixel_gives_uncorrelated_noise() -> None:
    """A 3x32x32 image and copies with one pixel changed by the smallest step (one float32 ulp), or
    a 0.0 turned into -0.0: each copy's noise (d = 20,000 features) is uncorrelated with the
    original's. For independent N(0, 1) vectors the sample correlation is ≈ N(0, 1/d): we accept
    |r| < 5/sqrt(d) = 0.035 (a false alarm < 1e-6 per pair, 5 pairs)."""
    d = 20_000
    w = probe(d)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    x[0, 1, 7, 7] = 0.0
    copies = []
    for c, i, j in [(0, 0, 0), (2, 31, 31), (1, 16, 3)]:
        y = x.clone()
        y[0, c, i, j] = torch.nextafter(y[0, c, i, j], torch.tensor(2.0))
        copies.append(y)
    y = x.clone()
    y[0, 1, 7, 7] = -0.0  # equal as a number, different bytes
    copies.append(y)
    copies.append(x + 1e-3)  # every pixel moved a little
    with torch.no_grad():
        ref = w(x)
        for y in copies:
            eps = w(y)
            assert not torch.equal(eps, ref)
            assert abs(corr(eps, ref)) < 5 / math.sqrt(d)


def test_rows_layers_and_keys_draw_independent_noise() -> None:
    """Two rows, two wrapped points of one row, and two keys on one row: each pair uncorrelated
    (|r| < 5/sqrt(d), d = 20,000). The same key in a second wrapper reproduces the noise exactly,
    and keys drawn from OS entropy differ."""
    d = 20_000
    x = torch.rand(2, 8, generator=torch.Generator().manual_seed(3))
    tol = 5 / math.sqrt(d)
    two = wrap(nn.Sequential(Probe(d), nn.Identity()), ["0", "1"], nu=1.0, noise="keyed", key=KEY)
    one = probe(d)
    with torch.no_grad():
        a = one(x)
        assert abs(corr(a[0], a[1])) < tol  # rows
        both = two(x)  # = ε_layer0 + ε_layer1, and ε_layer0 is `a` (the same key, index 0)
        assert abs(corr(a, both - a)) < tol  # layers
        other = probe(d, key=secrets.token_bytes(32))(x)
        assert abs(corr(a, other)) < tol  # keys
        same = probe(d, key=bytearray(KEY))  # type: ignore[arg-type]  # bytearray is accepted
        assert torch.equal(same(x), a)  # the same key, another wrapper
    k1, k2 = probe(4, key=None).noise_key, probe(4, key=None).noise_key
    assert k1 is not None and k2 is not None and len(k1) == 32 and k1 != k2


# ---------------------------------------------------------------------------- the distribution
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_is_standard_normal(dtype: torch.dtype) -> None:
    """n = 512 distinct rows x 512 features = 262,144 draws, pooled.

    Kolmogorov-Smirnov: P(D_n > t) <= 2 exp(-2 n t^2), so t = sqrt(ln(2/1e-6) / (2n)) = 0.0053
    is exceeded with probability < 1e-6 by N(0, 1) draws. Moments: mean SE = 1/sqrt(n) = 0.002,
    variance SE = sqrt(2/n) = 0.0028, both at 5 SE. Neighbours: Box-Muller gives each pair (2i,
    2i+1) from one radius; their correlation, and that of lag-2 neighbours, is ≈ N(0, 1/m) for m
    pairs: 5/sqrt(m). With ν = 0.25 the noise is exactly 0.5 times ν = 1's.
    """
    x = torch.rand(512, 8, generator=torch.Generator().manual_seed(4), dtype=dtype)
    with torch.no_grad():
        eps = probe(512)(x)
        half = probe(512, nu=0.25)(x)
    assert eps.dtype == dtype and torch.equal(half, 0.5 * eps)
    z = eps.flatten().double()
    n = z.numel()
    s, _ = z.sort()
    cdf = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks < math.sqrt(math.log(2 / 1e-6) / (2 * n)), ks
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    m = n // 2
    assert abs(corr(eps[:, 0::2], eps[:, 1::2])) < 5 / math.sqrt(m)
    assert abs(corr(eps[:, 0:-2:2], eps[:, 2::2])) < 5 / math.sqrt(m)


def test_diagonal_sigma_under_keyed_noise() -> None:
    """Σ on a Probe: Var(out_j) = Σ_j over 20,000 distinct rows; a sample variance's SE is
    Σ_j·sqrt(2/(n-1)), accepted at 5 SE; Σ_j = 0 stays exactly 0."""
    sigma = torch.tensor([0.0, 0.1, 1.0, 4.0], dtype=torch.float64)
    n = 20_000
    x = torch.rand(n, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        var = probe(4, nu=sigma)(x).var(dim=0)
    assert var[0].item() == 0.0
    assert torch.all((var[1:] - sigma[1:]).abs() < 5 * sigma[1:] * math.sqrt(2 / (n - 1)))


# ---------------------------------------------------------------------------- the key
def test_the_key_never_shows_in_repr_str_state_dict_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = secrets.token_bytes(32)
    words = [str(int.from_bytes(key[i : i + 4], "little")) for i in range(0, 32, 4)]
    secrets_as_text = [key.hex(), repr(key), str(list(key)), *words]
    with caplog.at_level(logging.DEBUG):
        w = wrap(nn.Sequential(nn.Linear(4, 3)), nu=0.1, noise="keyed", key=key)
        w(torch.rand(2, 4))
    shown = [repr(w), str(w), w.extra_repr(), repr(vars(w)), caplog.text]
    assert "noise=keyed" in repr(w)
    assert not any(s in text for s in secrets_as_text for text in shown)
    assert list(w.state_dict()) == list(w.model.state_dict())  # no key among the tensors
    assert w.noise == "keyed" and w.noise_key == key  # read back only when asked for
    assert wrap(nn.Linear(4, 3), nu=0.1).noise_key is None


def test_bad_options_and_keys_raise_clear_errors_without_the_key() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    short = secrets.token_bytes(31)
    with pytest.raises(ValueError, match=r"32 bytes \(256 bits\), but got 31 bytes") as err:
        wrap(model, noise="keyed", key=short)
    assert short.hex() not in str(err.value) and repr(short) not in str(err.value)
    with pytest.raises(TypeError, match="32 bytes, but got a str"):
        wrap(model, noise="keyed", key=KEY.hex())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"no `seed` with noise='keyed'.*Drop `seed`"):
        wrap(model, noise="keyed", seed=0)
    with pytest.raises(ValueError, match=r"no `key` with noise='fresh'.*drop `key`"):
        wrap(model, key=KEY)
    with pytest.raises(ValueError, match="'fresh' or 'keyed', but got 'keyd'"):
        wrap(model, noise="keyd")  # type: ignore[arg-type]
    w = wrap(model, noise="keyed")
    with pytest.raises(ValueError, match="Cannot seed keyed noise"):
        w.manual_seed(0)
    folded = wrap(nn.Sequential(nn.Flatten(0), nn.Unflatten(0, (1, -1))), ["1"], noise="keyed")
    with pytest.raises(ValueError, match="first dimension to be the input's batch of 3 rows"):
        folded(torch.rand(3, 4))
    dp = nn.DataParallel(nn.Sequential(nn.Linear(4, 3)))
    dp.device_ids = [0, 1]  # two devices: the replicas would see chunks of the rows
    with pytest.raises(RuntimeError, match=r"nn\.DataParallel"):
        wrap(dp, noise="keyed")(torch.rand(2, 4))
    with pytest.raises(TypeError, match="expected argument `x` to be a tensor"):
        KeyedNoise(KEY).row_seeds([1.0, 2.0])


def test_pickle_deepcopy_and_torch_save_keep_the_key() -> None:
    """Decided and documented: copies keep the key (one key, one answer per image); the key is
    not in the state_dict, so a checkpoint never carries it, but a pickled wrapper does."""
    w = probe(32)
    x = torch.rand(3, 5)
    with torch.no_grad():
        ref = w(x)
        for twin in (copy.deepcopy(w), pickle.loads(pickle.dumps(w))):
            assert twin.noise_key == KEY and torch.equal(twin(x), ref)
            assert repr(twin) == repr(w)


def test_gradients_flow_through_keyed_noise() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    w = wrap(model, ["input", "1"], nu=0.3, noise="keyed")
    x = torch.rand(4, 6, requires_grad=True)
    w(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------- execution modes
def test_threads_get_the_same_answer_for_the_same_row() -> None:
    """Keyed noise is deterministic by design: four threads, each sending the batch in its own
    order 20 times at once, get the reference noise for every row every time."""
    w = probe(64)
    x = torch.rand(6, 5, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = w(x)
    errors: list[int] = []
    barrier = threading.Barrier(4)

    def work(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        barrier.wait()
        with torch.no_grad():
            for _ in range(20):
                perm = torch.randperm(6, generator=g)
                errors.append(int(not torch.equal(w(x[perm]), ref[perm])))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 80 and sum(errors) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.slow
def test_forked_children_share_the_key() -> None:
    """Documented: forked workers keep the key, so every worker gives an image the same answer
    (fresh noise instead re-seeds in every child)."""
    w = probe(64)
    x = torch.rand(4, 5)
    with torch.no_grad():
        ref = w(x)
    a, b = draw_in_forked_children(lambda: w(x))
    assert torch.equal(a, ref) and torch.equal(b, ref)


@pytest.mark.slow
def test_torch_compile_matches_eager_and_respects_changes() -> None:
    """One graph (fullgraph) through the hash and the draws: the same values as eager, for any
    batch composition; `noise_disabled()` and a new ν are honoured."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    w = wrap(model, ["0", "penultimate"], nu=0.5, noise="keyed")
    x = torch.rand(5, 6)
    with torch.no_grad():
        eager = w(x)
        compiled = torch.compile(w, fullgraph=True)
        assert torch.allclose(compiled(x), eager, atol=1e-6)
        assert torch.allclose(compiled(x.flip(0)), eager.flip(0), atol=1e-6)
        assert torch.allclose(compiled(torch.cat([x, x]))[5:], eager, atol=1e-6)
        with w.noise_disabled():
            assert torch.allclose(compiled(x), model(x))
        w.nu = 0.0
        assert torch.allclose(compiled(x), model(x))
