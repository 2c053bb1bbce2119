"""Tests of the core defense: randfeat.wrap / RandomizedFeatureWrapper."""

from __future__ import annotations

import copy
import gc
import io
import math
import pickle
import weakref

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import randfeat
from randfeat import RandomizedFeatureWrapper, wrap


class MLP(nn.Module):
    def __init__(self, d: int = 6, h: int = 5, k: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, h), nn.ReLU())
        self.head = nn.Linear(h, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Raising(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fc(x)
        raise RuntimeError("boom")


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def tiny_timm(name: str) -> nn.Module:
    kw: dict[str, object] = {"pretrained": False, "num_classes": 7}
    if "vit" in name or "deit" in name:
        kw["img_size"] = 32
    torch.manual_seed(0)
    return timm.create_model(name, **kw).eval()


TIMM = {
    "resnet18": "fc.pre",
    "vgg11": "head.fc.pre",
    "vit_tiny_patch16_224": "head.pre",
    "deit_tiny_patch16_224": "head.pre",
}
TIMM_PARAMS = [  # vgg11 takes seconds of CPU to build: slow tier
    pytest.param(n, marks=pytest.mark.slow) if n == "vgg11" else n for n in sorted(TIMM)
]


# ---------------------------------------------------------------------------- the statistics
@settings(max_examples=15, deadline=None)
@given(
    h=st.integers(1, 12),
    k=st.integers(1, 6),
    nu=st.floats(1e-4, 10.0),
    seed=st.integers(0, 2**31),
)
def test_output_variance_matches_nu_times_frobenius_norm(
    h: int, k: int, nu: float, seed: int
) -> None:
    """For a linear head W, the output change W·δ with δ ~ N(0, ν I) has E‖Wδ‖² = ν‖W‖²_F.

    Var(‖Wδ‖²) = 2ν² tr((W Wᵀ)²) = 2ν²‖W Wᵀ‖²_F for a Gaussian vector, so the mean of n draws has
    standard error SE = ν·sqrt(2‖W Wᵀ‖²_F / n). We accept |mean − ν‖W‖²_F| < 5 SE (a false alarm
    has probability < 1e-6 per example, by the CLT; n = 4000 makes the CLT accurate here).
    """
    torch.manual_seed(seed % 1000)
    model = MLP(d=4, h=h, k=k).double().eval()
    n = 4000
    x = torch.rand(1, 4, dtype=torch.float64).expand(n, 4)
    w = wrap(model, ["head.pre"], nu=nu, seed=seed)
    with torch.no_grad():
        change = w(x) - model(x)
    sq = change.pow(2).sum(dim=1)
    W = model.head.weight
    expected = nu * W.pow(2).sum()
    se = nu * math.sqrt(2 * (W @ W.T).pow(2).sum().item() / n)
    assert abs(sq.mean().item() - expected.item()) < 5 * se


def test_diagonal_sigma_gives_per_feature_variance() -> None:
    """Σ on the input of an identity: Var(out_j) = Σ_j; sample-variance SE = Σ_j·sqrt(2/(n-1))."""
    sigma = torch.tensor([0.0, 0.1, 1.0, 4.0], dtype=torch.float64)
    model = nn.Sequential(nn.Identity())
    w = wrap(model, ["input"], nu=sigma, seed=3)
    n = 20000
    out = w(torch.zeros(n, 4, dtype=torch.float64))
    var = out.var(dim=0)
    assert var[0].item() == 0.0
    se = sigma[1:] * math.sqrt(2 / (n - 1))
    assert torch.all((var[1:] - sigma[1:]).abs() < 5 * se)


def test_noise_is_independent_per_sample_and_per_call_and_per_layer() -> None:
    model = nn.Sequential(nn.Identity(), nn.Identity())
    w = wrap(model, ["0", "1"], nu=1.0, seed=0)
    x = torch.zeros(2, 1000)
    a, b = w(x), w(x)
    assert not torch.equal(a[0], a[1])  # per sample
    assert not torch.equal(a, b)  # per call
    # two independent N(0, 1) layers add to N(0, 2): SE of a sample variance ≈ 2·sqrt(2/1999)
    v = a.flatten().var().item()
    assert abs(v - 2.0) < 5 * 2 * math.sqrt(2 / 1999)


# ---------------------------------------------------------------------------- identity & transparency
@pytest.mark.parametrize("name", TIMM_PARAMS)
def test_zero_nu_is_the_identity_bit_for_bit(name: str) -> None:
    model = tiny_timm(name)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        clean = model(x)
        for spec in ("penultimate", "input", TIMM[name]):
            assert torch.equal(wrap(model, [spec], nu=0.0)(x), clean)
            assert torch.equal(wrap(model, [spec], nu=torch.zeros(1))(x), clean)


@pytest.mark.parametrize("name", TIMM_PARAMS)
def test_penultimate_resolves_to_the_classifier_input_on_timm(name: str) -> None:
    model = tiny_timm(name)
    w = wrap(model, ["penultimate"], nu=1.0, seed=0)
    assert w.layers == [TIMM[name]]
    assert f"penultimate -> {TIMM[name]}" in repr(w)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(w(x), model(x))
        assert torch.equal(model(x), model(x))  # the bare model stays clean while wrapped


def test_penultimate_falls_back_to_last_linear() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert wrap(model, "penultimate", nu=0.1).layers == ["2.pre"]


def test_unwrap_restores_the_model_exactly() -> None:
    model = tiny_timm("resnet18")
    cls = type(model)
    ids = [id(p) for p in model.parameters()]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        clean = model(x)
    w = wrap(model, ["penultimate", "layer2", "input"], nu=0.3)
    assert all_hooks(model) == 2
    back = w.unwrap()
    assert back is model and type(back) is cls
    assert [id(p) for p in back.parameters()] == ids
    assert all_hooks(back) == 0
    assert sd.keys() == back.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in back.state_dict().items())
    with torch.no_grad():
        assert torch.equal(back(x), clean)
    with pytest.raises(RuntimeError, match="unwrapped"):
        w(x)


def test_state_dict_has_exactly_the_model_keys_and_round_trips() -> None:
    model = MLP()
    w = wrap(model, ["head.pre"], nu=0.1)
    assert list(w.state_dict()) == list(model.state_dict())
    fresh = MLP()
    fresh.load_state_dict(w.state_dict())  # wrapper -> model
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True)
    )
    other = MLP()
    w.load_state_dict(other.state_dict())  # model -> wrapper
    assert torch.equal(model.head.weight, other.head.weight)
    # nested inside a parent module the keys carry the parent's prefix only
    parent = nn.Sequential(w)
    assert list(parent.state_dict()) == [f"0.{k}" for k in model.state_dict()]
    parent.load_state_dict(parent.state_dict())


def test_no_parameters_are_copied_and_module_methods_act_on_the_model() -> None:
    model = MLP()
    w = wrap(model, nu=0.1)
    assert [id(p) for p in w.parameters()] == [id(p) for p in model.parameters()]
    w.double()
    assert model.head.weight.dtype == torch.float64
    w.train()
    assert model.training
    w.eval()
    assert not model.training
    w.half()
    assert model.head.weight.dtype == torch.float16
    w.to(torch.float32)
    assert model.head.weight.dtype == torch.float32


def test_noise_disabled_gives_clean_outputs_temporarily() -> None:
    model = MLP().eval()
    w = wrap(model, nu=1.0, seed=0)
    x = torch.rand(4, 6)
    with torch.no_grad(), w.noise_disabled():
        assert torch.equal(w(x), model(x))
    with torch.no_grad():
        assert not torch.equal(w(x), model(x))


def test_deepcopy_and_pickle() -> None:
    model = MLP().eval()
    x = torch.rand(3, 6)
    seeded = wrap(model, nu=1.0, seed=5)
    twin = copy.deepcopy(seeded)
    with torch.no_grad():
        assert torch.equal(twin(x), seeded(x))  # a seeded stream is reproducible
    buf = io.BytesIO()
    torch.save(seeded, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded, RandomizedFeatureWrapper) and loaded.layers == ["head.pre"]
    unseeded = wrap(MLP().eval(), nu=1.0)
    clone = pickle.loads(pickle.dumps(unseeded))
    with torch.no_grad():
        assert not torch.equal(clone(x), unseeded(x))  # a copy must not replay a secret stream
    assert all_hooks(clone.model) == 1 and all_hooks(twin.model) == 1


# ---------------------------------------------------------------------------- randomness policy
def test_seeds_reproduce_and_unseeded_wrappers_differ() -> None:
    model = MLP().eval()
    x = torch.rand(8, 6)
    with torch.no_grad():
        a = wrap(model, nu=1.0, seed=11)(x)
        b = wrap(model, nu=1.0, seed=11)(x)
        g = torch.Generator().manual_seed(11)
        c = wrap(model, nu=1.0, seed=g)(x)
        u1 = wrap(model, nu=1.0)(x)
        u2 = wrap(model, nu=1.0)(x)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(u1, u2)
    assert not wrap(model, nu=1.0).seeded and wrap(model, nu=1.0, seed=1).seeded


def test_manual_seed_restarts_the_stream() -> None:
    model = MLP().eval()
    w = wrap(model, nu=1.0, seed=0)
    x = torch.rand(2, 6)
    with torch.no_grad():
        first = w(x)
        w.manual_seed(0)
        assert torch.equal(w(x), first)


# ---------------------------------------------------------------------------- execution modes
def test_grad_modes_and_autograd() -> None:
    model = MLP().eval()
    w = wrap(model, ["body.0", "head.pre"], nu=0.5, seed=0)
    x = torch.rand(4, 6)
    with torch.no_grad():
        assert w(x).shape == (4, 3)
    with torch.inference_mode():
        assert w(x).shape == (4, 3)
    xr = x.clone().requires_grad_(True)
    w(xr).sum().backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all()
    assert model.head.weight.grad is not None  # gradients flow through the noisy model


def test_torchattacks_pgd_runs_on_a_wrapper() -> None:
    torchattacks = pytest.importorskip("torchattacks")
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    w = wrap(model, nu=0.01, seed=0)
    x = torch.rand(4, 1, 3, 4)
    y = torch.zeros(4, dtype=torch.long)
    adv = torchattacks.PGD(w, eps=0.1, alpha=0.02, steps=3)(x, y)
    assert (adv - x).abs().max() <= 0.1 + 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype: torch.dtype) -> None:
    model = tiny_timm("resnet18")
    w = wrap(model, ["layer3", "penultimate"], nu=0.1, seed=0)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = w(x)
    assert torch.isfinite(out.float()).all()


def test_half_model() -> None:
    model = MLP().half()
    w = wrap(model, nu=0.1, seed=0)
    out = w(torch.rand(2, 6, dtype=torch.float16))
    assert out.dtype == torch.float16


def test_channels_last_is_preserved() -> None:
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)).to(
        memory_format=torch.channels_last
    )
    seen = {}
    conv[1].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    w = wrap(conv, ["0"], nu=0.1, seed=0)
    x = torch.rand(2, 3, 8, 8).to(memory_format=torch.channels_last)
    w(x)
    assert seen["x"].is_contiguous(memory_format=torch.channels_last)


def test_batch_size_one() -> None:
    model = MLP().eval()
    w = wrap(model, ["body.1", "head.pre", "input"], nu=0.2, seed=0)
    assert w(torch.rand(1, 6)).shape == (1, 3)
    assert w.predict(torch.rand(1, 6)).shape == (1,)


@pytest.mark.slow
def test_torch_compile_matches_eager_and_respects_changes() -> None:
    model = MLP().eval()
    x = torch.rand(4, 6)
    w = wrap(model, ["body.1", "head.pre"], nu=0.5, seed=0)
    with torch.no_grad():
        eager = [w(x), w(x)]
        w.manual_seed(0)
        compiled = torch.compile(w)
        comp = [compiled(x), compiled(x)]
        assert all(torch.allclose(e, c) for e, c in zip(eager, comp, strict=True))
        assert not torch.allclose(comp[0], model(x))
        with w.noise_disabled():
            assert torch.allclose(compiled(x), model(x))
        w.nu = 0.0
        assert torch.allclose(compiled(x), model(x))


# ---------------------------------------------------------------------------- predict
def test_predict_majority_vote_and_tie_breaking() -> None:
    class Fixed(nn.Module):
        """Returns a scripted sequence of logits so the vote is known."""

        def __init__(self, seq: list[list[float]]) -> None:
            super().__init__()
            self.seq = torch.tensor(seq)
            self.lin = nn.Linear(1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.lin(x[:, :1])
            return self.seq[: x.shape[0]]

    # votes=4 for one sample: classes 0,1,1,0 -> tie; mean logit of class 1 is higher -> 1
    seq = [[2.0, 1.0, 0.0], [0.0, 5.0, 0.0], [0.0, 5.0, 0.0], [2.0, 1.0, 0.0]]
    w = wrap(Fixed(seq), ["lin"], nu=0.0)
    assert w.predict(torch.zeros(1, 1), votes=4).tolist() == [1]
    # votes=3: 0, 0, 1 -> majority 0 even though the mean favours 1
    seq3 = [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 9.0, 0.0]]
    w3 = wrap(Fixed(seq3), ["lin"], nu=0.0)
    assert w3.predict(torch.zeros(1, 1), votes=3).tolist() == [0]
    assert w3.predict(torch.zeros(1, 1), votes=3, reduce="mean").tolist() == [1]


def test_predict_holds_one_forward_batch_of_copies_at_a_time() -> None:
    """5 images × 9 votes at `batch_size=8`: calls of 8 rows (the last 5) whose inputs hold 8 rows
    of storage, not slices of all 45 copies; the labels are those of one big call."""
    sizes: list[tuple[int, int]] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            stored = x.untyped_storage().nbytes() // (x[0].numel() * x.element_size())
            sizes.append((x.shape[0], stored))
            return self.lin(x)

    torch.manual_seed(0)
    w = wrap(Probe(), ["lin"], nu=0.0)
    x = torch.randn(5, 4)
    labels = w.predict(x, votes=9, batch_size=8)
    assert sizes == [(8, 8)] * 5 + [(5, 5)]
    assert torch.equal(labels, w.predict(x, votes=9))
    with pytest.raises(ValueError, match="batch_size"):
        w.predict(x, votes=9, batch_size=-1)


def test_predict_equals_argmax_without_noise_and_is_robust_with_small_noise() -> None:
    model = tiny_timm("resnet18")
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).argmax(1)
    assert torch.equal(wrap(model, nu=0.0).predict(x, votes=9), ref)
    assert torch.equal(wrap(model, nu=0.0).predict(x, votes=9, batch_size=7), ref)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "0.1", True])
def test_bad_nu(bad: object) -> None:
    with pytest.raises((ValueError, TypeError), match="nu"):
        wrap(MLP(), nu=bad)  # type: ignore[arg-type]
    w = wrap(MLP(), nu=0.1)
    with pytest.raises((ValueError, TypeError), match="nu"):
        w.nu = bad  # type: ignore[assignment]
    assert w.nu == 0.1  # a rejected assignment leaves the old value


def test_bad_sigma_tensor() -> None:
    with pytest.raises(ValueError, match="variances >= 0"):
        wrap(MLP(), nu=torch.tensor([-1.0, 1.0]))
    with pytest.raises(TypeError, match="float tensor"):
        wrap(MLP(), nu=torch.tensor([1, 2]))
    w = wrap(MLP(), ["head.pre"], nu=torch.ones(3))
    with pytest.raises(ValueError, match=r"broadcast to the feature shape \[5\]"):
        w(torch.rand(2, 6))


def test_per_layer_mapping() -> None:
    w = wrap(MLP(), ["body.0", "penultimate"], nu={"body.0": 0.0, "penultimate": 1.0}, seed=0)
    assert w.layers == ["body.0", "head.pre"]
    with pytest.raises(ValueError, match="unknown"):
        w.nu = {"body.0": 0.1, "head.pre": 0.1, "nope": 1.0}
    with pytest.raises(ValueError, match="no"):
        w.nu = {"body.0": 0.1}


def test_unknown_layer_lists_close_names_and_attaching_is_atomic() -> None:
    model = MLP()
    with pytest.raises(ValueError, match=r"'head\.pree'.*Closest valid names: 'head\.pre'"):
        wrap(model, ["body.0", "head.pre", "head.pree"])
    assert all_hooks(model) == 0
    with pytest.raises(ValueError, match="both resolve"):
        wrap(model, ["head.pre", "penultimate"])
    with pytest.raises(ValueError, match="non-empty"):
        wrap(model, [])
    with pytest.raises(TypeError, match="str"):
        wrap(model, [3])  # type: ignore[list-item]
    assert all_hooks(model) == 0


def test_no_classifier_for_penultimate() -> None:
    with pytest.raises(ValueError, match="penultimate"):
        wrap(nn.Sequential(nn.Conv2d(1, 1, 1)), ["penultimate"])


def test_wrapping_a_wrapper_is_refused_and_two_wrappers_are_independent() -> None:
    model = MLP().eval()
    w = wrap(model, nu=1.0)
    with pytest.raises(TypeError, match="already a RandomizedFeatureWrapper"):
        wrap(w)  # type: ignore[arg-type]
    quiet = wrap(model, nu=0.0)
    x = torch.rand(3, 6)
    with torch.no_grad():
        assert torch.equal(quiet(x), model(x))  # w's hooks stay silent outside w's forward
    with pytest.raises(TypeError, match=r"nn\.Module"):
        wrap(lambda t: t)  # type: ignore[arg-type]


def test_non_floating_feature() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
    w = wrap(model, ["0.pre"], nu=0.1)
    with pytest.raises(TypeError, match="not a floating tensor"):
        w(torch.zeros(2, 2, dtype=torch.long))


def test_layer_never_reached_is_an_error() -> None:
    class Unused(MLP):
        def __init__(self) -> None:
            super().__init__()
            self.spare = nn.Linear(5, 5)

    w = wrap(Unused(), ["spare"], nu=0.1)
    with pytest.raises(RuntimeError, match="never reached"):
        w(torch.rand(2, 6))


def test_votes_must_be_positive() -> None:
    w = wrap(MLP(), nu=0.1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="votes"):
            w.predict(torch.rand(2, 6), votes=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduce"):
        w.predict(torch.rand(2, 6), reduce="median")  # type: ignore[arg-type]


def test_no_hook_leaks_when_forward_raises() -> None:
    model = Raising()
    w = wrap(model, ["fc", "input"], nu=1.0)
    x = torch.rand(2, 4)
    with pytest.raises(RuntimeError, match="boom"):
        w(x)
    # the bare model's fc is clean again after the failed noisy forward
    assert torch.equal(model.fc(x), model.fc(x))
    w.unwrap()
    assert all_hooks(model) == 0


# ---------------------------------------------------------------------------- mode, lifetime, scripting
class DropBN(nn.Module):
    """A model whose eval/train modes differ: dropout and batch norm (running statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(12)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.bn(x.flatten(1))))


def modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("training", [False, True])
def test_the_wrapper_mirrors_the_model_mode(training: bool) -> None:
    model = DropBN().train(training)
    model.bn.eval()  # a mixed mode: the wrapper must not flatten it
    before = modes(model)
    w = wrap(model, nu=0.1)
    assert w.training is training and modes(model) == before
    w.eval()
    assert not w.training and not any(modes(model))
    w.train()
    assert w.training and all(modes(model))
    model.eval()  # set on the model directly: the wrapper follows
    assert not w.training


def test_torchattacks_pgd_leaves_the_model_mode_and_buffers_unchanged() -> None:
    """torchattacks saves `model.training` (here: the wrapper's) and restores it after the attack.

    A wrapper that reported training=True would leave an eval() model in training mode: dropout on,
    batch norm updating its running statistics at every later forward.
    """
    torchattacks = pytest.importorskip("torchattacks")
    torch.manual_seed(0)
    model = DropBN()
    model(torch.rand(32, 1, 3, 4))  # non-trivial running statistics
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    w = wrap(model, nu=0.01, seed=0)
    x = torch.rand(4, 1, 3, 4)
    y = torch.zeros(4, dtype=torch.long)
    torchattacks.PGD(w, eps=0.1, alpha=0.02, steps=3)(x, y)
    assert not w.training and not any(modes(model))
    with torch.no_grad():
        model(x)  # a forward in the mode the attack left behind
        assert torch.equal(model(x), model(x))  # no dropout
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # running stats untouched


def test_a_dropped_wrapper_leaves_no_hooks_and_no_noise() -> None:
    model = MLP().eval()
    x = torch.rand(2, 6)
    with torch.no_grad():
        clean = model(x)
        w = wrap(model, ["body.0", "head.pre"], nu=1.0)
        assert not torch.equal(w(x), clean)
    ref = weakref.ref(w)
    del w
    gc.collect()
    assert ref() is None  # the model's hooks did not keep the wrapper alive
    assert all_hooks(model) == 0
    with torch.no_grad():
        assert torch.equal(model(x), clean)
    assert list(model.state_dict()) == ["body.0.weight", "body.0.bias", "head.weight", "head.bias"]


def test_a_pickled_model_of_a_live_wrapper_comes_back_clean() -> None:
    """The hooks pickle their wrapper; alone with the model, the copy is dropped and unhooks."""
    model = MLP().eval()
    w = wrap(model, nu=1.0)
    x = torch.rand(2, 6)
    twin = pickle.loads(pickle.dumps(model))
    gc.collect()
    assert all_hooks(twin) == 0
    with torch.no_grad():
        assert torch.equal(twin(x), twin(x))
    assert all_hooks(model) == 1 and w.layers == ["head.pre"]


def test_torch_jit_script_is_refused_with_the_way_out() -> None:
    w = wrap(MLP().eval(), nu=0.1)
    with pytest.raises(TypeError, match=r"torch\.jit\.script cannot.*torch\.export\.export"):
        torch.jit.script(w)


def test_forward_with_noise_is_the_forward_with_that_draw() -> None:
    """`feature + sqrt(ν)·ε` at each point, checked against the model computed by hand."""
    model = MLP().double().eval()
    w = wrap(model, ["body.0", "head.pre"], nu={"body.0": 0.5, "head.pre": 2.0})
    x = torch.rand(3, 6, dtype=torch.float64)
    shapes = w.feature_shapes(x)
    assert shapes == {"body.0": torch.Size([3, 5]), "head.pre": torch.Size([3, 5])}
    eps = {k: torch.randn(s, dtype=torch.float64) for k, s in shapes.items()}
    with torch.no_grad():
        h = model.body[0](x) + math.sqrt(0.5) * eps["body.0"]
        expected = model.head(model.body[1](h) + math.sqrt(2.0) * eps["head.pre"])
        assert torch.allclose(w.forward_with_noise(x, eps), expected)
    with pytest.raises(ValueError, match="every wrapped layer"):
        w.forward_with_noise(x, {"body.0": eps["body.0"]})
    with pytest.raises(ValueError, match="feature's shape"):
        w.forward_with_noise(x, {**eps, "head.pre": torch.zeros(3, 4)})


# ---------------------------------------------------------------------------- property tests
@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 4),
    d=st.integers(1, 8),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    spec=st.sampled_from(["input", "0", "1", "2.pre", "penultimate"]),
    nu=st.one_of(st.just(0.0), st.floats(1e-6, 5.0)),
)
def test_shapes_dtypes_and_layers(n: int, d: int, dtype: torch.dtype, spec: str, nu: float) -> None:
    model = nn.Sequential(nn.Linear(d, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype).eval()
    w = wrap(model, [spec], nu=nu, seed=0)
    x = torch.rand(n, d, dtype=dtype)
    with torch.no_grad():
        out = w(x)
        clean = model(x)
    assert out.shape == clean.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    if nu == 0.0:
        assert torch.equal(out, clean)
    assert torch.equal(model(x), clean)


def test_public_api() -> None:
    assert {"wrap", "RandomizedFeatureWrapper"} <= set(randfeat.__all__)
