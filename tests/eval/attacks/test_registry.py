"""The attack registry, and the contract every registered attack keeps (one parametrized test).

Every name of `randfeat.eval.ATTACKS` is run on the trained digits CNN (deterministic) with
float32 and float64 images, and must return: no NaN; points inside the ε-ball (float64 check) and
`[0, 1]`, in the input's dtype; no more queries than the budget; the same result for the same
seed; a fooling point judged afresh as the oracle judged it (on a deterministic model "verified"
and "fresh" agree, also for the images it did not fool, whose returned point must be one the
attack saw classified correctly). It never queries a sample it has already fooled: the oracle
refuses such a query with a RuntimeError, so a run that returns proves it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from randfeat.eval import ATTACKS
from randfeat.eval.attacks.base import Attack
from randfeat.eval.attacks.eot import EOT
from randfeat.eval.data.loaders import Digits
from randfeat.eval.oracle import distance, rejudge

EPS = {"linf": 0.12, "l2": 0.9}  # a mix of fooled and unfooled digits within the budget
BUDGET = 150
VOTES = 3
EOT_M = 2


def test_the_registry_names_every_attack_once() -> None:
    base = ["square", "nes", "signhunter"]
    names = [f"{a}-{n}" for a in base for n in ("linf", "l2")] + ["rays", "signflip"]
    names += ["hsja-linf", "hsja-l2"]
    adaptive = [f"adaptive-{a}-{n}" for a in ("square", "nes", "hsja") for n in ("linf", "l2")]
    persistent = [f"{w}-{n}" for w in ("jitter-eot", "resubmit") for n in names]
    assert list(ATTACKS) == [*names, *(f"eot-{n}" for n in names), *adaptive, *persistent]
    for name, factory in ATTACKS.items():
        assert factory.name == name
        attack = factory(EPS[factory.norm], eot_m=3)
        assert isinstance(attack, Attack)
        assert (attack.norm, attack.eps, attack.output) == (
            factory.norm,
            EPS[factory.norm],
            factory.output,
        )
        assert isinstance(attack, EOT) == name.startswith("eot-") == factory.eot
        if isinstance(attack, EOT):
            assert attack.m == 3


def test_labels() -> None:
    assert ATTACKS["square-linf"].label() == "Square ℓ∞"
    assert ATTACKS["nes-l2"].label() == "NES ℓ2"
    assert ATTACKS["rays"].label() == "RayS"
    assert ATTACKS["eot-signflip"].label(5) == "EOT-5 SignFlip"
    assert ATTACKS["eot-square-l2"].label() == "EOT Square ℓ2"


def test_the_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        ATTACKS["mine"] = ATTACKS["rays"]  # type: ignore[index]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "name",  # adaptive and jitter-EOT attacks send one image a call: seconds each, slow tier
    [
        pytest.param(n, marks=pytest.mark.slow) if n.startswith(("adaptive-", "jitter-eot-")) else n
        for n in ATTACKS
    ],
)
def test_every_attack_keeps_the_contract(
    name: str, dtype: torch.dtype, digits: Digits, digits_model: nn.Module
) -> None:
    factory = ATTACKS[name]
    eps = EPS[factory.norm]
    attack = factory(eps, eot_m=EOT_M)
    x = digits.x_test[:12].to(dtype)
    y = digits.y_test[:12]

    def scores(z: Tensor) -> Tensor:
        return digits_model(z.float())

    def labels(z: Tensor) -> Tensor:  # all a decision attack is allowed to need
        return scores(z).argmax(dim=1)

    model = scores if factory.output == "scores" else labels
    res = attack.run(model, x, y, budget=BUDGET, votes=VOTES, seed=5)

    assert res.x_adv.dtype == dtype and res.x_adv.shape == x.shape
    assert bool(torch.isfinite(res.x_adv).all())
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    assert bool((distance(res.x_adv, x, attack.norm) <= eps).all())  # float64 check
    assert bool((res.queries >= 1).all()) and bool((res.queries <= BUDGET).all())
    if name.startswith("eot-"):
        assert bool((res.queries % EOT_M == 0).all())  # every forward of an average is charged
    fooled = res.success
    assert bool((res.success_query[fooled] >= 1).all())
    assert bool((res.success_query[fooled] <= res.queries[fooled]).all())
    assert bool((res.success_query[~fooled] == -1).all())
    # deterministic model: the returned point judged afresh agrees with the verified verdict
    fresh = rejudge(scores, res.x_adv, y, votes=VOTES, forwards=1)
    assert fresh.tolist() == fooled.double().tolist()
    # the same seed, the same run
    again = attack.run(model, x, y, budget=BUDGET, votes=VOTES, seed=5)
    assert torch.equal(again.x_adv, res.x_adv)
    assert torch.equal(again.queries, res.queries)
    assert torch.equal(again.success, res.success)


def ring_model(eps: float) -> Callable[[Tensor], Tensor]:
    """Misclassifies the grey image's neighbours at ℓ∞ distance `>= 2 eps` and on the sphere of
    radius `eps` itself, nowhere else: the projection of a far adversarial point onto the ε-ball
    lands on that sphere, a point no attack queries by chance."""

    def scores(x: Tensor) -> Tensor:
        m = (x.double() - 0.5).flatten(1).abs().amax(dim=1)
        wrong = (m >= 2 * eps) | ((m - eps).abs() < 1e-5)
        return torch.stack([(~wrong).float(), wrong.float()], dim=1)

    return scores


@pytest.mark.parametrize("name", [n for n in ATTACKS if not n.endswith("-l2")])
def test_unfooled_images_get_a_point_the_attack_queried(name: str) -> None:
    """On a deterministic model, the point returned for an image the attack did not fool is
    classified correctly: "verified" and "fresh" agree (RayS and SignFlip used to return the
    projection of their far iterate, which they never queried)."""
    eps = 0.1
    model = ring_model(eps)
    x = torch.full((4, 1, 6, 6), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    res = ATTACKS[name](eps, eot_m=EOT_M).run(model, x, y, budget=300, votes=1, seed=0)
    fresh = rejudge(model, res.x_adv, y, votes=1, forwards=1)
    assert fresh.tolist() == res.success.double().tolist()


def test_the_documented_table_is_the_registry() -> None:
    text = (Path(__file__).resolve().parents[3] / "docs" / "attacks.md").read_text("utf-8")
    block = text.split("<!-- attacks: begin", 1)[1].split("<!-- attacks: end -->", 1)[0]
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in block.splitlines()
        if line.startswith("| `")
    ]
    norms = {"linf": "ℓ∞", "l2": "ℓ2"}
    want = [
        [f"`{f.name}`", f"`{f.family}`", norms[f.norm], f.output]
        for f in ATTACKS.values()
        if not f.eot and f.wrapper is None
    ]
    summaries = ["`eot-<name>`", "`jitter-eot-<name>`", "`resubmit-<name>`"]
    assert rows[: -len(summaries)] == want
    assert [r[0] for r in rows[-len(summaries) :]] == summaries
    bases = {w[0][1:-1] for w in want if not w[0].startswith("`adaptive-")}  # none of those
    assert {f.name for f in ATTACKS.values() if f.eot} == {f"eot-{b}" for b in bases}
    for wrapper in ("jitter-eot", "resubmit"):
        named = {f.name for f in ATTACKS.values() if f.wrapper == wrapper}
        assert named == {f"{wrapper}-{b}" for b in bases}
