"""Tests for `randfeat.eval.forward` and the forward options of `randfeat eval`.

`--dtype`, `--channels-last` and `--compile` change how the defended model's forward runs and
nothing else: the model sees float32 images, the oracle float32 scores, and the grid's robust
accuracies in bfloat16 agree with float32 within sampling error on the digits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import randfeat
from randfeat.cli import main
from randfeat.eval.errors import ConfigError
from randfeat.eval.forward import Forward, ForwardOptions
from randfeat.eval.grid.config import EvalConfig
from randfeat.eval.grid.runner import run_eval
from randfeat.eval.results.file import read_results
from randfeat.eval.results.records import AttackRow

CPU = torch.device("cpu")


class Probe(nn.Module):
    """A conv net that records the dtype and memory format its input and hidden layer see."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 10)
        self.seen: dict[str, object] = {}

    def forward(self, x: Tensor) -> Tensor:
        self.seen["input"] = x.dtype
        self.seen["channels_last"] = x.is_contiguous(memory_format=torch.channels_last)
        h = self.conv(x).relu()
        self.seen["hidden"] = h.dtype
        return self.head(h.flatten(1))


# ---------------------------------------------------------------------------- Forward
def test_float32_is_the_model_itself() -> None:
    m = Probe().eval()
    x = torch.rand(5, 3, 8, 8)
    f = Forward(m, ForwardOptions(), CPU)
    with torch.no_grad():
        assert torch.equal(f(x), m(x))
    assert m.seen == {"input": torch.float32, "channels_last": False, "hidden": torch.float32}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_covers_the_model_only(dtype: torch.dtype) -> None:
    """The layers compute in the low precision; the images in and the scores out are float32."""
    m = Probe().eval()
    x = torch.rand(5, 3, 8, 8)
    f = Forward(m, ForwardOptions(dtype=str(dtype).removeprefix("torch.")), CPU)  # type: ignore[arg-type]
    with torch.no_grad():
        ref = m(x)
        out = f(x)
    assert m.seen["input"] == torch.float32  # the ε-ball is never rounded to the low precision
    assert m.seen["hidden"] == dtype
    assert out.dtype == torch.float32
    # bfloat16 keeps 8 significant bits: relative error ≤ 2^-8 per rounding, a few roundings deep
    assert torch.allclose(out, ref, atol=0.05 * ref.abs().max().item())
    assert not torch.is_autocast_enabled("cpu")  # the context ends with the call


def test_channels_last_changes_the_layout_not_the_numbers() -> None:
    m = Probe().eval()
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        ref = m(x)
        out = Forward(m, ForwardOptions(channels_last=True), CPU)(x)
    assert m.seen["channels_last"] is True
    assert m.conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_a_wrapper_keeps_its_noise_under_autocast() -> None:
    """The noise is drawn in the feature's dtype: the defended forward in bfloat16 is noisy."""
    m = Probe().eval()
    w = randfeat.wrap(m, ["head.pre"], nu=1.0, seed=0)
    f = Forward(w, ForwardOptions(dtype="bfloat16"), CPU)
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        a, b = f(x), f(x)
    assert not torch.equal(a, b)
    w.manual_seed(7)
    with torch.no_grad():
        c = f(x)
    w.manual_seed(7)
    with torch.no_grad():
        assert torch.equal(f(x), c)  # reseeding the wrapper reseeds the calls made through Forward


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="Expected argument `dtype` to be one of 'float32'"):
        ForwardOptions(dtype="half")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a device that supports autocast for --dtype bfloat16"):
        ForwardOptions(dtype="bfloat16").check(torch.device("meta"))
    ForwardOptions(dtype="float16").check(CPU)  # torch autocasts float16 on the CPU too


# ---------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"dtype": "fp16"}, "Unknown dtype 'fp16'. Did you mean 'float16'"),
        ({"compile": "yes"}, "Expected `compile` to be true or false"),
        ({"target": "http://127.0.0.1:1", "dtype": "bfloat16"}, "Drop --dtype"),
        ({"target": "http://127.0.0.1:1", "compile": True}, "Drop --compile"),
        ({"target": "http://127.0.0.1:1", "channels_last": True}, "Drop --channels-last"),
    ],
)
def test_bad_forward_settings_are_named(values: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        EvalConfig.from_mapping(values)
    assert fragment in str(err.value)


def test_forward_flags_reach_the_header(cache_env: None, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "quiet"]
    assert (
        main(
            ["eval", *flags, "--quiet", "--dtype", "bfloat16", "--channels-last", "--out", str(out)]
        )
        == 0
    )
    res = read_results(out)
    config = res.header.config
    assert (config["dtype"], config["channels_last"], config["compile"]) == (
        "bfloat16",
        True,
        False,
    )
    assert len(res.rows) == res.header.rows_expected
    assert {"channels_last", "compile"} <= set(res.header.settings_not_compared)
    assert "dtype" not in res.header.settings_not_compared  # bfloat16 changes the results


def test_a_bad_dtype_flag_lists_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--dtype", "half"]) == 2
    err = capsys.readouterr().err  # Python 3.12.8 stopped quoting the choices: accept both
    assert "invalid choice: 'half' (choose from" in err
    assert all(name in err for name in ("float32", "bfloat16", "float16"))


def test_device_without_autocast_is_refused_before_any_work(tmp_path: Path) -> None:
    cfg = EvalConfig.from_mapping(
        {"dtype": "bfloat16", "device": "meta", "out": str(tmp_path / "r")}
    )
    with pytest.raises(ConfigError, match="supports autocast"):
        run_eval(cfg)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------- the grid
TINY = {
    "n_images": 10,
    "batch_size": 10,
    "defenses": "feature",
    "target_drop": "0.05",
    "attacks": "square-linf",
    "budgets": "10",
    "votes": 3,
    "calib_images": 100,
    "calib_draws": 4,
    "fresh_forwards": 4,
    "quiet": True,
}


@pytest.fixture(scope="module")
def cache_env(digits_model: nn.Module, digits_cache_dir: Path) -> Iterator[None]:
    """The trained digits CNN's cache, one thread (results do not depend on it)."""
    del digits_model  # trained into digits_cache_dir by the fixture
    old = os.environ.get("RANDFEAT_CACHE")
    os.environ["RANDFEAT_CACHE"] = str(digits_cache_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("RANDFEAT_CACHE", None)
    else:
        os.environ["RANDFEAT_CACHE"] = old


def _attack_rows(path: Path) -> list[AttackRow]:
    return sorted(
        (r for r in read_results(path).rows if isinstance(r, AttackRow)),
        key=lambda r: (r.defense, r.image),
    )


@pytest.mark.slow
def test_bfloat16_robust_accuracy_is_float32s_within_sampling_error(
    cache_env: None, tmp_path: Path
) -> None:
    """The digits grid in bfloat16 and in float32, same seeds: robust accuracy per defense.

    n = 200 attacked images, Square ℓ∞ with 40 queries, votes 3; base and feature@0.05 (the
    noise is drawn in bfloat16 inside the model). Two checks, both at 3 standard errors:

    - unpaired: the two robust accuracies are estimates from n images each, standard error
      $\\sqrt{p(1-p)/n}$ each; their difference has $SE = \\sqrt{2p(1-p)/n}$ with $p$ the pooled
      robust accuracy. At $p \\approx 0.7$: $SE = \\sqrt{2 \\cdot 0.21 / 200} = 0.046$, so
      $|Δ| \\le 0.14$.
    - paired (McNemar): the same images and seeds, so most verdicts agree; with $b$ images robust
      only in float32 and $c$ only in bfloat16, $b - c$ has standard deviation $\\sqrt{b + c}$
      when the precision makes no difference, so $|b - c| \\le 3\\sqrt{b + c}$ (at $b + c = 20$:
      $|Δ| \\le 13.4 / 200 = 0.067$).
    """
    grid = {
        **TINY,
        "n_images": 200,
        "batch_size": 200,
        "defenses": "base,feature",
        "budgets": "40",
        "calib_images": 200,
        "fresh_forwards": 1,
    }
    verdicts = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.jsonl"
        run_eval(EvalConfig.from_mapping({**grid, "dtype": dtype, "out": str(out)}))
        verdicts[dtype] = {(r.defense, r.image): not r.success for r in _attack_rows(out)}
    assert verdicts["float32"].keys() == verdicts["bfloat16"].keys()
    for defense in ("base", "feature@0.05"):
        keys = [k for k in verdicts["float32"] if k[0] == defense]
        n = len(keys)
        assert n == 200
        r32 = [verdicts["float32"][k] for k in keys]
        r16 = [verdicts["bfloat16"][k] for k in keys]
        ra32, ra16 = sum(r32) / n, sum(r16) / n
        p = (ra32 + ra16) / 2
        assert 0.1 < p < 0.9, f"{defense}: robust accuracy {p} leaves nothing to compare"
        se = math.sqrt(2 * p * (1 - p) / n)
        assert abs(ra32 - ra16) <= 3 * se, (defense, ra32, ra16, se)
        b = sum(a and not c for a, c in zip(r32, r16, strict=True))
        c = sum(c and not a for a, c in zip(r32, r16, strict=True))
        assert abs(b - c) <= 3 * math.sqrt(b + c), (defense, b, c)


@pytest.mark.slow
def test_compile_runs_the_grid_with_the_same_noise(cache_env: None, tmp_path: Path) -> None:
    """`--compile` smoke test: the grid runs compiled, and the compiled defense draws the same
    noise from the same seeds (the attacks see the same answers, up to rounding in fused code)."""
    from torch._dynamo.utils import counters

    eager, compiled = tmp_path / "eager.jsonl", tmp_path / "compiled.jsonl"
    run_eval(EvalConfig.from_mapping({**TINY, "out": str(eager)}))
    counters.clear()
    run_eval(EvalConfig.from_mapping({**TINY, "compile": True, "out": str(compiled)}))
    assert counters["stats"]["unique_graphs"] >= 1  # the defense was compiled
    assert read_results(compiled).header.config["compile"] is True
    a, b = _attack_rows(eager), _attack_rows(compiled)
    assert len(a) == len(b) == 10
    assert [(r.success, r.queries) for r in a] == [(r.success, r.queries) for r in b]
