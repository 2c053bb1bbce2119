"""Compiled, traced and exported defended models: torch.compile, torch.export, torch.jit.trace.

Each graph must draw fresh noise at every call, with the calibrated variance, from a stream that no
saved file carries (the noise is the op `randfeat::standard_normal`, which draws when the graph
runs, from the wrapper's own stream).
"""

from __future__ import annotations

import io

import pytest
import torch

from _deploy_models import MODELS, NU, check_variance, digits_cnn
from randfeat import wrap


# ---------------------------------------------------------------------------- torch.export
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.slow
def test_torch_export_with_a_dynamic_batch_draws_fresh_calibrated_noise(name: str) -> None:
    model, inputs = MODELS[name]()
    w = wrap(model, nu=NU)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(w, (inputs(8),), dynamic_shapes=({0: batch},))
    run = program.module()
    with torch.no_grad():
        for n in (1, 17):
            x = inputs(n)
            a, b = run(x), run(x)
            clean = model(x)
            assert a.shape == clean.shape == (n, 7 if name != "digits_cnn" else 10)
            assert not torch.allclose(a, b)  # fresh noise per call
            assert torch.equal(model(x), clean)  # the bare model stays clean
        x = inputs(17)
        clean = model(x)
        check_variance(model, torch.cat([run(x) for _ in range(12)]), clean.repeat(12, 1))


def test_a_saved_exported_program_does_not_replay_its_noise_at_each_load() -> None:
    """A generator traced into the program would be saved with it: two loads replayed the same
    noise. The program names its stream instead, and draws from OS entropy where it runs."""
    model, inputs = digits_cnn()
    w = wrap(model, nu=NU)
    x = inputs(4)
    buf = io.BytesIO()
    torch.export.save(torch.export.export(w, (x,)), buf)
    outs = []
    for _ in range(2):
        buf.seek(0)
        with torch.no_grad():
            outs.append(torch.export.load(buf).module()(x))
    assert not torch.allclose(outs[0], outs[1])


# ---------------------------------------------------------------------------- torch.jit.trace
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.slow
def test_jit_trace_draws_fresh_calibrated_noise_and_saved_traces_do_not_replay(name: str) -> None:
    model, inputs = MODELS[name]()
    w = wrap(model, nu=NU)
    x = inputs(16)
    with torch.no_grad(), pytest.warns(FutureWarning):  # torch.jit.trace is deprecated
        traced = torch.jit.trace(w, (x,), check_trace=False)
        clean = model(x)
        a, b = traced(x), traced(x)
        assert not torch.allclose(a, b)
        check_variance(model, torch.cat([traced(x) for _ in range(12)]), clean.repeat(12, 1))
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        loads = []
        for _ in range(2):
            buf.seek(0)
            loads.append(torch.jit.load(buf)(x))
        assert not torch.allclose(loads[0], loads[1])


# ---------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.slow
def test_compile_fullgraph_has_no_graph_break_and_matches_eager_for_a_seed(name: str) -> None:
    model, inputs = MODELS[name]()
    w = wrap(model, nu=NU, seed=0)
    x = inputs(4)
    torch._dynamo.reset()
    compiled = torch.compile(w, fullgraph=True, backend="aot_eager")  # a graph break raises
    with torch.no_grad():
        w.manual_seed(0)
        eager = [w(x), w(x)]
        w.manual_seed(0)
        comp = [compiled(x), compiled(x)]
        assert not torch.allclose(comp[0], comp[1])
        assert all(torch.allclose(e, c, atol=1e-5) for e, c in zip(eager, comp, strict=True))
        clean = model(x)
        with w.noise_disabled():
            assert torch.allclose(compiled(x), clean, atol=1e-5)


def test_explain_counts_no_graph_break() -> None:
    model, inputs = digits_cnn()
    w = wrap(model, ["conv1", "penultimate"], nu=NU)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(w)(inputs(2))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.slow
def test_compile_with_inductor_draws_from_the_wrappers_stream() -> None:
    """The default backend: inductor generates code around the op; the seed still rules."""
    model, inputs = digits_cnn()
    w = wrap(model, nu=NU, seed=1)
    x = inputs(3)
    torch._dynamo.reset()
    compiled = torch.compile(w, fullgraph=True)
    with torch.no_grad():
        first = compiled(x)
        assert not torch.allclose(compiled(x), first)
        w.manual_seed(1)
        assert torch.allclose(w(x), first, atol=1e-5)


def test_the_noise_op_is_tagged_as_a_seeded_random_op() -> None:
    """`nondeterministic_seeded` tells every compiler pass that two calls with equal arguments are
    different draws: none may merge them (CSE) or fold one into a constant."""
    op = torch.ops.randfeat.standard_normal.default
    assert torch.Tag.nondeterministic_seeded in op.tags
