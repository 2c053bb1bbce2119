"""Tests for the Square Attack (``randfeat.eval.attacks.square``).

Reference values (schedule, window sides, query accounting) come from the official code
``max-andr/square-attack`` ``attack.py`` as summarised in ``REFERENCES.md`` section 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import randfeat
from randfeat.eval.attacks.square import (
    Square,
    _window_masks,
    meta_pseudo_gaussian,
    p_selection,
    pseudo_gaussian_rectangle,
    side_length,
)
from randfeat.eval.data.loaders import Digits
from randfeat.eval.oracle import distance
from randfeat.eval.outcome import AttackResult
from randfeat.losses import margin_loss as margin

N_DIGITS = 60  # test images attacked at the full budget
BUDGET = 1000


# ------------------------------------------------------------ helpers
class Counting:
    """A model wrapper that counts its calls and remembers every input and output."""

    def __init__(self, model: Callable[[Tensor], Tensor]) -> None:
        self.model = model
        self.calls = 0
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        out = self.model(x)
        self.inputs.append(x.clone())
        self.outputs.append(out.clone())
        return out


def linear_model(shape: tuple[int, ...], k: int, seed: int) -> Callable[[Tensor], Tensor]:
    """A tiny random linear classifier on ``[n, *shape]`` as a plain Python function."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(math.prod(shape), k, generator=g, dtype=torch.float64)
    bias = torch.randn(k, generator=g, dtype=torch.float64)

    def f(x: Tensor) -> Tensor:
        return x.flatten(1).double() @ weight + bias

    return f


def constant_model(k: int = 3) -> Callable[[Tensor], Tensor]:
    """Scores that never change: class 0 wins by 1, so the margin never improves."""

    def f(x: Tensor) -> Tensor:
        out = torch.zeros(x.shape[0], k)
        out[:, 0] = 1.0
        return out

    return f


def check_invariants(
    res: AttackResult,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str,
    model: Callable[[Tensor], Tensor],
) -> None:
    """Budget, ε-ball (float64), [0, 1], dtype; successes misclassified by ``model``."""
    assert res.x_adv.dtype == x.dtype
    assert res.x_adv.shape == x.shape
    assert bool((res.queries <= res.budget).all())
    # Square spends its whole budget on every sample it does not fool (init + n_calls - 1 steps).
    assert bool((res.queries[~res.success] == res.budget).all())
    assert bool((res.success_query[res.success] >= 1).all())
    assert float(distance(res.x_adv, x, norm).max()) <= eps  # type: ignore[arg-type]
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    if bool(res.success.any()):
        with torch.no_grad():
            pred = model(res.x_adv[res.success]).argmax(dim=1)
        assert bool((pred != y[res.success]).all())


# ------------------------------------------------------------ schedule
# (n_iters, it, divisor of p_init): REFERENCES.md 1.3, official `p_selection` with the flooring.
SCHEDULE = [
    (10000, 0, 1),
    (10000, 10, 1),
    (10000, 11, 2),
    (10000, 50, 2),
    (10000, 51, 4),
    (10000, 200, 4),
    (10000, 201, 8),
    (10000, 1001, 32),
    (10000, 4001, 128),
    (10000, 8000, 256),
    (10000, 8001, 512),
    (10000, 9999, 512),
    (10000, 10001, 1),  # official else-branch: past n_iters, back to p_init
    (1000, 1, 1),
    (1000, 2, 2),
    (1000, 5, 2),
    (1000, 6, 4),
    (1000, 20, 4),
    (1000, 21, 8),
    (1000, 51, 16),
    (1000, 101, 32),
    (1000, 201, 64),
    (1000, 401, 128),
    (1000, 601, 256),
    (1000, 801, 512),
    (1000, 999, 512),
    (5000, 5, 1),
    (5000, 6, 2),
    (5000, 4001, 512),
    (100, 0, 1),
    (100, 1, 4),  # the p/2 stage is skipped at n_iters = 100
    (100, 2, 4),
    (100, 3, 8),
    (100, 6, 16),
    (100, 81, 512),
    (100, 99, 512),
]


@pytest.mark.parametrize(("n_iters", "it", "div"), SCHEDULE)
def test_p_selection_matches_official(n_iters: int, it: int, div: int) -> None:
    assert p_selection(0.05, it, n_iters) == pytest.approx(0.05 / div, rel=1e-12)


# Window sides "Linf / L2" for p_init, p/2, ..., p/512 (REFERENCES.md 1.3).
SIDES = [
    (32, 0.05, [7, 5, 4, 3, 2, 1, 1, 1, 1, 1], [7, 5, 5, 3, 3, 3, 3, 3, 3, 3]),
    (32, 0.1, [10, 7, 5, 4, 3, 2, 1, 1, 1, 1], [11, 7, 5, 5, 3, 3, 3, 3, 3, 3]),
    (224, 0.05, [50, 35, 25, 18, 13, 9, 6, 4, 3, 2], [51, 35, 25, 19, 13, 9, 7, 5, 3, 3]),
    (224, 0.1, [71, 50, 35, 25, 18, 13, 9, 6, 4, 3], [71, 51, 35, 25, 19, 13, 9, 7, 5, 3]),
]


@pytest.mark.parametrize(("h", "p", "linf", "l2"), SIDES)
def test_side_length_matches_official(h: int, p: float, linf: list[int], l2: list[int]) -> None:
    ps = [p / 2**j for j in range(10)]
    assert [side_length(q, h, h, "linf") for q in ps] == linf
    assert [side_length(q, h, h, "l2") for q in ps] == l2


def test_side_length_fits_tiny_images() -> None:
    for h in range(1, 7):
        for w in range(1, 7):
            for norm in ("linf", "l2"):
                s = side_length(0.8, h, w, norm)
                assert 1 <= s <= max(min(h, w) - 1, 1)


# ------------------------------------------------------------ ℓ2 bumps
def _rings_by_loop(a: int, b: int) -> Tensor:
    """The official ring construction written as a plain loop over rings (test oracle)."""
    out = torch.zeros(a, b, dtype=torch.float64)
    ca, cb = a // 2, b // 2
    for r in range(max(ca, cb) + 1):
        out[max(ca - r, 0) : ca + r + 1, max(cb - r, 0) : cb + r + 1] += 1.0 / (r + 1) ** 2
    return out / out.square().sum().sqrt()


@pytest.mark.parametrize(("a", "b"), [(1, 1), (1, 3), (2, 5), (3, 3), (4, 7), (6, 6), (9, 5)])
def test_pseudo_gaussian_rectangle_matches_ring_loop(a: int, b: int) -> None:
    torch.testing.assert_close(pseudo_gaussian_rectangle(a, b), _rings_by_loop(a, b))


def test_pseudo_gaussian_rectangle_values() -> None:
    # 3x3: centre 1 + 1/4 = 1.25, ring 1/4; norm sqrt(1.25^2 + 8/16) = sqrt(2.0625)
    expected = torch.full((3, 3), 0.25, dtype=torch.float64)
    expected[1, 1] = 1.25
    torch.testing.assert_close(pseudo_gaussian_rectangle(3, 3), expected / math.sqrt(2.0625))


@pytest.mark.parametrize("s", [1, 3, 5, 11])
def test_meta_pseudo_gaussian(s: int) -> None:
    bump = meta_pseudo_gaussian(s, transpose=False)
    assert bump.shape == (s, s)
    assert float(bump.square().sum()) == pytest.approx(1.0)
    assert bool((bump[: s // 2] > 0).all()) and bool((bump[s // 2 :] < 0).all())
    torch.testing.assert_close(meta_pseudo_gaussian(s, transpose=True), bump.T)


def test_window_masks_are_per_sample_squares() -> None:
    g = torch.Generator().manual_seed(0)
    n, s, h, w = 200, 3, 8, 9
    top = torch.randint(0, h - s, (n,), generator=g)
    left = torch.randint(0, w - s, (n,), generator=g)
    masks = _window_masks(top, left, s, h, w)
    assert masks.shape == (n, h, w)
    assert bool((masks.sum(dim=(1, 2)) == s * s).all())
    for i in (0, 17, 199):
        t, q = int(top[i]), int(left[i])
        assert bool(masks[i, t : t + s, q : q + s].all())
    assert len({(int(t), int(q)) for t, q in zip(top, left, strict=True)}) > 10


# ------------------------------------------------------------ digits
@pytest.fixture(scope="module")
def undefended(digits: Digits, digits_model: nn.Module) -> dict[str, AttackResult]:
    x, y = digits.x_test[:N_DIGITS], digits.y_test[:N_DIGITS]
    return {
        "linf": Square(0.2, "linf").run(digits_model, x, y, budget=BUDGET, seed=0),
        "l2": Square(1.5, "l2").run(digits_model, x, y, budget=BUDGET, seed=0),
    }


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.2), ("l2", 1.5)])
def test_undefended_digits_falls(
    undefended: dict[str, AttackResult],
    digits: Digits,
    digits_model: nn.Module,
    norm: str,
    eps: float,
) -> None:
    res = undefended[norm]
    # Measured at seed 0: 0.033 (linf, 2 of 60) and 0.0 (l2); clean accuracy of these 60 is 1.0.
    assert res.robust_accuracy() <= 0.2
    check_invariants(
        res, digits.x_test[:N_DIGITS], digits.y_test[:N_DIGITS], eps, norm, digits_model
    )


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.002), ("l2", 0.01)])
def test_tiny_eps_does_not_fool(
    digits: Digits, digits_model: nn.Module, norm: str, eps: float
) -> None:
    # The <= 20% assertion above can fail: at a tiny ε the model keeps (almost) its clean accuracy.
    x, y = digits.x_test[:20], digits.y_test[:20]
    res = Square(eps, norm).run(digits_model, x, y, budget=100, seed=0)  # type: ignore[arg-type]
    assert res.robust_accuracy() >= 0.8


def test_accepts_only_improvements(digits: Digits, digits_model: nn.Module) -> None:
    """The returned iterate of an unfooled sample has the lowest margin of all its queries."""
    with torch.no_grad():
        clean = margin(digits_model(digits.x_test), digits.y_test)
    pick = clean.argsort(descending=True)[:10]  # the 10 most confident: none fooled at ε = 0.01
    x, y = digits.x_test[pick], digits.y_test[pick]
    model = Counting(digits_model)
    res = Square(0.01, "linf").run(model, x, y, budget=40, votes=1, seed=3)
    assert not bool(res.success.any())
    assert model.calls == 40  # every call held all 10 samples, in order
    seen = torch.stack([margin(out, y) for out in model.outputs])  # [40, 10]
    with torch.no_grad():
        final = margin(digits_model(res.x_adv), y)
    torch.testing.assert_close(final, seen.amin(dim=0))
    assert bool((seen[1:] < seen[0]).any())  # some improvement happened


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.8)])
def test_best_points_survive_successes_of_other_samples(
    digits: Digits, digits_model: nn.Module, norm: str, eps: float
) -> None:
    """With samples fooled mid-run (the active set shrinks), every unfooled sample still returns
    the lowest-margin point of all its queries, and a fooled one its verified point."""
    x, y = digits.x_test[:40], digits.y_test[:40]
    model = Counting(digits_model)
    res = Square(eps, norm).run(model, x, y, budget=150, votes=1, seed=5)  # type: ignore[arg-type]
    late = res.success & (res.success_query > 1)
    assert int(late.sum()) >= 3 and int((~res.success).sum()) >= 3  # both kinds, at many times
    rows = torch.cat(model.inputs)
    scores = torch.cat(model.outputs)
    # each queried row belongs to the one clean image it lies within ε of
    d = torch.stack([distance(rows, x[i].expand_as(rows), norm) for i in range(40)], dim=1)  # type: ignore[arg-type]
    owner = d <= eps + 1e-6
    assert bool((owner.sum(dim=1) == 1).all())
    sample = owner.float().argmax(dim=1)
    seen = margin(scores, y[sample])
    with torch.no_grad():
        final = margin(digits_model(res.x_adv), y)
    for i in range(40):
        mine = seen[sample == i]
        assert mine.numel() == int(res.queries[i])
        if bool(res.success[i]):
            assert float(final[i]) <= 0.0  # the verified point: misclassified
        else:
            assert float(final[i]) == pytest.approx(float(mine.min()), abs=1e-5)


# ------------------------------------------------------------ geometry
def test_linf_init_stripes_and_window_updates() -> None:
    n, c, h, w, eps, budget = 16, 3, 10, 10, 0.1, 60
    x = torch.full((n, c, h, w), 0.5)
    y = torch.zeros(n, dtype=torch.long)
    model = Counting(constant_model())
    res = Square(eps, "linf").run(model, x, y, budget=budget, seed=0)
    assert model.calls == budget and not bool(res.success.any())
    init = model.inputs[0]
    # vertical stripes: each column of each channel is +ε or -ε for every row
    torch.testing.assert_close((init - x).abs(), torch.full_like(x, eps))
    assert bool((init == init[:, :, :1, :]).all())
    boxes = set()
    for t, cand in enumerate(model.inputs[1:]):
        s = side_length(p_selection(0.05, t, budget), h, w, "linf")
        torch.testing.assert_close((cand - x).abs(), torch.full_like(x, eps))  # stays on ±ε
        changed = (cand != init).any(dim=1)  # [n, h, w]: never improves, so best = init
        assert bool(changed.flatten(1).any(dim=1).all())  # no no-op candidate
        for i in range(n):
            rows = changed[i].any(dim=1).nonzero()
            cols = changed[i].any(dim=0).nonzero()
            assert int(rows.max() - rows.min()) < s and int(cols.max() - cols.min()) < s
            boxes.add((t, int(rows.min()), int(cols.min())))
    assert len(boxes) > 5 * (budget - 1)  # positions differ between samples of one iteration


@pytest.mark.parametrize("at_corner", [True, False])
def test_linf_colours_are_uniform_over_changing_vectors(at_corner: bool) -> None:
    """The no-op resampling gives the official rejection loop's distribution.

    2 channels, 3000 samples. With every pixel already at x0 + ε, the colour vector (+, +) is a
    no-op, so each of the other 3 must come with probability 1/3: SE = sqrt(3000 * 1/3 * 2/3) =
    25.8 per count, tolerance 5 SE = 129. Away from the corners nothing is a no-op and each of the
    4 vectors has probability 1/4: SE = sqrt(3000 * 1/4 * 3/4) = 23.7, tolerance 5 SE = 119.
    """
    n, eps = 3000, 0.1
    x0 = torch.full((n, 2, 6, 6), 0.5)
    x_plus, x_minus = x0 + eps, x0 - eps
    x_best = x_plus.clone() if at_corner else x0.clone()
    g = torch.Generator().manual_seed(0)
    cand = Square._candidate_linf(x_best, x_plus, x_minus, 2, g)
    changed = (cand != x_best).any(dim=1)  # [n, h, w]
    assert bool(changed.flatten(1).any(dim=1).all())
    # the colour of each channel inside the window (the window is where cand differs, or any
    # pixel of an unchanged channel: read the colour at the first changed pixel)
    pos = changed.flatten(1).float().argmax(dim=1)
    colour = cand.flatten(2)[torch.arange(n), :, pos] > 0.5  # [n, 2] True = +ε
    code = colour[:, 0].long() * 2 + colour[:, 1].long()
    counts = torch.bincount(code, minlength=4)
    if at_corner:
        assert int(counts[3]) == 0
        assert bool(((counts[:3] - n / 3).abs() <= 129).all()), counts
    else:
        assert bool(((counts - n / 4).abs() <= 119).all()), counts


def test_l2_candidates_stay_on_the_sphere() -> None:
    n, c, h, w, eps, budget = 8, 2, 10, 10, 0.5, 40  # ε = 0.5 around 0.5: no clipping possible
    x = torch.full((n, c, h, w), 0.5, dtype=torch.float64)
    y = torch.zeros(n, dtype=torch.long)
    model = Counting(constant_model())
    Square(eps, "l2").run(model, x, y, budget=budget, seed=0)
    assert model.calls == budget
    norms = torch.stack([distance(q, x, "l2") for q in model.inputs])  # [budget, n]
    torch.testing.assert_close(norms, torch.full_like(norms, eps), rtol=1e-6, atol=0.0)
    assert bool((norms <= eps).all())
    assert not bool((model.inputs[1] == model.inputs[2]).all())


# ------------------------------------------------------------ properties
@settings(max_examples=25, deadline=None)
@given(
    c=st.integers(1, 3),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    n=st.integers(1, 5),
    norm=st.sampled_from(["linf", "l2"]),
    eps_frac=st.floats(0.01, 1.0),
    budget=st.integers(1, 25),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_properties_on_tiny_random_models(
    c: int,
    h: int,
    w: int,
    n: int,
    norm: str,
    eps_frac: float,
    budget: int,
    dtype: torch.dtype,
    seed: int,
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (n,), generator=g)
    eps = eps_frac * (1.0 if norm == "linf" else math.sqrt(c * h * w))
    model = linear_model((c, h, w), 4, seed)
    res = Square(eps, norm).run(model, x, y, budget=budget, seed=seed)  # type: ignore[arg-type]
    check_invariants(res, x, y, eps, norm, model)
    again = Square(eps, norm).run(model, x, y, budget=budget, seed=seed)  # type: ignore[arg-type]
    assert torch.equal(res.x_adv, again.x_adv) and torch.equal(res.queries, again.queries)


def test_seeds_reproduce_and_differ(digits: Digits, digits_model: nn.Module) -> None:
    x, y = digits.x_test[:20], digits.y_test[:20]
    for norm, eps in (("linf", 0.05), ("l2", 0.4)):
        attack = Square(eps, norm)  # type: ignore[arg-type]
        a = attack.run(digits_model, x, y, budget=60, seed=0)
        b = attack.run(digits_model, x, y, budget=60, seed=0)
        c = attack.run(digits_model, x, y, budget=60, seed=1)
        assert torch.equal(a.x_adv, b.x_adv)
        assert torch.equal(a.success_query, b.success_query)
        assert not torch.equal(a.x_adv, c.x_adv)


def test_schedule_follows_n_calls_under_eot() -> None:
    """With ``samples = 3`` per query, a budget of 30 buys 10 calls of 3 forwards each."""
    x = torch.full((2, 1, 6, 6), 0.5)
    y = torch.zeros(2, dtype=torch.long)
    model = Counting(constant_model())
    res = Square(0.1).run(model, x, y, 30, 9, 0, samples=3)
    assert model.calls == 10 and bool((res.queries == 30).all())


# ------------------------------------------------------------ bad input
@pytest.mark.parametrize("eps", [0.0, -1.0, math.nan, math.inf])
def test_bad_eps(eps: float) -> None:
    with pytest.raises(ValueError, match="eps"):
        Square(eps)


@pytest.mark.parametrize("p_init", [0.0, -0.1, 1.5, math.nan])
def test_bad_p_init(p_init: float) -> None:
    with pytest.raises(ValueError, match="p_init"):
        Square(0.1, p_init=p_init)


def test_defaults() -> None:
    assert Square(0.05).p_init == 0.05
    assert Square(5.0, "l2").p_init == 0.1
    assert Square(5.0, "l2", p_init=0.3).p_init == 0.3
    with pytest.raises(ValueError, match="norm"):
        Square(0.1, "l1")  # type: ignore[arg-type]


def _bad_runs(x: Tensor, y: Tensor) -> list[tuple[str, dict[str, object]]]:
    return [
        ("budget", {"x": x, "y": y, "budget": 0}),
        ("budget", {"x": x, "y": y, "budget": 2.5}),
        ("`x`", {"x": x * 3 - 1, "y": y, "budget": 10}),
        ("`x`", {"x": torch.full_like(x, math.nan), "y": y, "budget": 10}),
        ("`y`", {"x": x, "y": y[:-1], "budget": 10}),
        ("`y`", {"x": x, "y": -y - 1, "budget": 10}),
        ("`x`", {"x": x[:, 0], "y": y, "budget": 10}),
    ]


@pytest.mark.parametrize("case", range(7))
def test_bad_input_raises_before_any_query(
    digits: Digits, digits_model: nn.Module, case: int
) -> None:
    x, y = digits.x_test[:4], digits.y_test[:4]
    match, kwargs = _bad_runs(x, y)[case]
    model = Counting(digits_model)
    with pytest.raises((ValueError, TypeError), match=match):
        Square(0.1).run(model, **kwargs)  # type: ignore[arg-type]
    assert model.calls == 0


@pytest.mark.parametrize(
    "bad",
    [
        lambda x: torch.zeros(x.shape[0]),  # scores of the wrong shape
        lambda x: torch.zeros(x.shape[0], 10, 1),
        lambda x: torch.full((x.shape[0], 10), math.nan),
    ],
)
def test_bad_model_output_raises_on_first_forward(
    digits: Digits, bad: Callable[[Tensor], Tensor]
) -> None:
    # A model's output can only be checked by calling it: the first forward raises, and it is
    # the only one (nothing is charged: the oracle validates before counting).
    model = Counting(bad)
    with pytest.raises(ValueError):
        Square(0.1).run(model, digits.x_test[:4], digits.y_test[:4], budget=10)
    assert model.calls == 1


def test_label_out_of_range_raises_on_first_forward(
    digits: Digits, digits_model: nn.Module
) -> None:
    # The number of classes K is only known from the first forward; that forward raises.
    model = Counting(digits_model)
    y = digits.y_test[:4].clone()
    y[0] = 10
    with pytest.raises(ValueError, match="labels"):
        Square(0.1).run(model, digits.x_test[:4], y, budget=10)
    assert model.calls == 1


# ------------------------------------------------------------ models
class Opaque:
    """A black box: raises if the attack uses autograd or asks for parameters."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self.calls = 0

    def parameters(self) -> None:
        raise AssertionError("the attack asked for parameters()")

    def __call__(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or x.requires_grad:
            raise AssertionError("the attack used autograd")
        self.calls += 1
        return self._model(x)


def test_black_box_models(digits: Digits, digits_model: nn.Module) -> None:
    x, y = digits.x_test[:10], digits.y_test[:10]
    opaque = Opaque(digits_model)
    res = Square(0.2).run(opaque, x, y, budget=50, seed=0)
    assert opaque.calls > 0
    check_invariants(res, x, y, 0.2, "linf", digits_model)

    def plain(z: Tensor) -> Tensor:  # a plain Python function
        return digits_model(z)

    res2 = Square(1.5, "l2").run(plain, x, y, budget=50, seed=0)
    check_invariants(res2, x, y, 1.5, "l2", digits_model)


def test_defended_model(digits: Digits, digits_model: nn.Module) -> None:
    wrap = getattr(randfeat, "wrap", None)
    if wrap is None:
        pytest.skip("randfeat.wrap is not available yet")
    defended = wrap(digits_model, layers=["head.pre"], nu=1.0, seed=0)
    x, y = digits.x_test[:30], digits.y_test[:30]
    res = Square(0.2).run(defended, x, y, budget=200, votes=9, seed=0)
    assert bool((res.queries <= 200).all())
    assert float(distance(res.x_adv, x, "linf").max()) <= 0.2
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    # every success was verified by 9 extra forwards (D.4); the clean model sees none of the noise
    assert bool((res.verify_forwards[res.success] >= 9).all())
    assert bool((res.queries[~res.success] == 200).all())
