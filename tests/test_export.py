"""randfeat.export: ONNX graphs whose noise is an input, run by OnnxDefended with fresh noise.

Exported once per model (the digits CNN, timm resnet18 and vit_tiny) at batch 8 with a dynamic
batch, then run at batches 1 and 17.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from _deploy_models import MODELS, NU, check_variance, digits_cnn, draw_in_forked_children, features
from randfeat import RandomizedFeatureWrapper, wrap

pytestmark = pytest.mark.slow  # ONNX export and onnxruntime sessions: seconds of CPU each

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
np = pytest.importorskip("numpy")
export = pytest.importorskip("randfeat.export")
METADATA_KEY, NoiseInput = export.METADATA_KEY, export.NoiseInput
OnnxDefended, to_onnx = export.OnnxDefended, export.to_onnx


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, nn.Module, RandomizedFeatureWrapper, Callable[[int], Tensor], str]:
    """Each model exported once at batch 8 with a dynamic batch: (name, model, wrapper, inputs, path)."""
    name = request.param
    model, inputs = MODELS[name]()
    w = wrap(model, nu=NU)
    path = str(tmp_path_factory.mktemp("onnx") / f"{name}.onnx")
    noise = to_onnx(w, inputs(8), path)
    assert noise == (NoiseInput("noise_0", w.layers[0], ("batch", features(model))),)
    return name, model, w, inputs, path


def test_onnx_graph_takes_its_noise_as_documented_inputs_and_has_no_random_op(
    exported: tuple[str, nn.Module, RandomizedFeatureWrapper, Callable[[int], Tensor], str],
) -> None:
    _, model, w, _, path = exported
    proto = onnx.load(path)
    assert not [n.op_type for n in proto.graph.node if "Random" in n.op_type]
    meta = {p.key: p.value for p in proto.metadata_props}
    entry = json.loads(meta[METADATA_KEY])["inputs"][0]
    assert entry["name"] == "noise_0" and entry["layer"] == w.layers[0]
    assert entry["shape"] == ["batch", features(model)]
    assert "N(0, 1)" in entry["distribution"]
    inputs = {i.name: i for i in proto.graph.input}
    assert set(inputs) == {"x", "noise_0"}
    assert "N(0, 1)" in inputs["noise_0"].doc_string
    dims = [d.dim_param or d.dim_value for d in inputs["noise_0"].type.tensor_type.shape.dim]
    assert dims == ["batch", features(model)]


def test_onnx_equals_the_eager_wrapper_given_the_same_noise(
    exported: tuple[str, nn.Module, RandomizedFeatureWrapper, Callable[[int], Tensor], str],
) -> None:
    _, _, w, inputs, path = exported
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n in (1, 17):  # exported at 8
        x = inputs(n)
        eps = torch.randn(n, *w.feature_shapes(x)[w.layers[0]][1:])
        with torch.no_grad():
            eager = w.forward_with_noise(x, {w.layers[0]: eps})
        (got,) = session.run(["logits"], {"x": x.numpy(), "noise_0": eps.numpy()})
        assert np.abs(got - eager.numpy()).max() <= 1e-5


def test_onnx_defended_draws_fresh_calibrated_noise_per_call_and_per_object(
    exported: tuple[str, nn.Module, RandomizedFeatureWrapper, Callable[[int], Tensor], str],
) -> None:
    _, model, _, inputs, path = exported
    first, second = OnnxDefended(path), OnnxDefended(path)
    x = inputs(17)
    with torch.no_grad():
        clean = model(x)
    a = first(x)
    assert isinstance(a, Tensor) and a.shape == clean.shape
    assert not torch.allclose(a, first(x))  # fresh per call
    assert not torch.allclose(a, second(x))  # two objects in one process never replay each other
    one = first(x[:1].numpy())
    assert isinstance(one, np.ndarray) and one.shape == (1, clean.shape[1])
    check_variance(model, torch.cat([first(x) for _ in range(12)]), clean.repeat(12, 1))


def test_onnx_defended_refuses_a_file_without_noise_metadata(tmp_path: Path) -> None:
    model, inputs = digits_cnn()
    path = str(tmp_path / "plain.onnx")
    torch.onnx.export(model, (inputs(2),), path, dynamo=True, verbose=False)
    with pytest.raises(ValueError, match="to_onnx"):
        OnnxDefended(path)
    with pytest.raises(TypeError, match="RandomizedFeatureWrapper"):
        to_onnx(model, inputs(2), path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="N >= 2"):
        to_onnx(wrap(model, nu=NU), inputs(1), path)


def test_onnxruntime_replays_random_ops_across_sessions() -> None:
    """Why the noise is an input: a graph that draws `RandomNormalLike` without a seed (what a plain
    `torch.onnx.export` of a noisy graph emits) gives the same "noise" in two sessions."""
    helper = onnx.helper
    node = helper.make_node("RandomNormalLike", ["x"], ["noise"], dtype=onnx.TensorProto.FLOAT)
    graph = helper.make_graph(
        [node],
        "noise",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("noise", onnx.TensorProto.FLOAT, [4, 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    blob = model.SerializeToString()
    x = np.zeros((4, 16), dtype=np.float32)
    draws = [
        ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        for _ in range(2)
    ]
    assert np.array_equal(draws[0], draws[1])


@pytest.mark.parametrize("dynamo", [False, True])
def test_plain_onnx_export_of_a_wrapper_is_refused_with_the_way_out(
    tmp_path: Path, dynamo: bool
) -> None:
    """The only ONNX translation of the noise would be a replaying random op: both exporters stop
    before tracing, with a message that names to_onnx and OnnxDefended (not a deep trace that
    names an unknown operator)."""
    model, inputs = digits_cnn()
    with pytest.raises(Exception, match=r"randfeat\.export\.to_onnx.*OnnxDefended"):
        torch.onnx.export(wrap(model, nu=NU), (inputs(2),), str(tmp_path / "p.onnx"), dynamo=dynamo)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_onnx_defended_draws_differently_in_forked_children(tmp_path: Path) -> None:
    """OnnxDefended's stream follows the wrapper's fork policy: re-seeded in every child."""
    model, inputs = digits_cnn()
    path = str(tmp_path / "digits.onnx")
    to_onnx(wrap(model, nu=NU), inputs(2), path)
    runner = OnnxDefended(path, providers=["CPUExecutionProvider"])
    x = inputs(4)
    runner(x)  # the parent has drawn
    a, b = draw_in_forked_children(lambda: runner(x))
    assert not torch.allclose(a, b)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_onnx_defended_is_fork_safe(tmp_path: Path) -> None:
    """onnxruntime sessions are not fork-safe: a child that ran the inherited session hung in
    `Session.run` 7 times in 100 (the parent ran right before the fork). Each child here runs the
    parent's object on a session of its own (checked: not the parent's), then drops the object
    (`gc.collect()`), after the parent ran it right before the fork; the children answer and
    exit, and the parent's session still runs. The hang itself is a race (7%): a child on the
    inherited session passes here most of the time, so the own-session check is what fails."""
    model, inputs = digits_cnn()
    path = str(tmp_path / "digits.onnx")
    to_onnx(wrap(model, nu=NU), inputs(2), path)
    holder = [OnnxDefended(path, providers=["CPUExecutionProvider"])]
    x = inputs(4)
    parent = id(holder[0].session)  # an id only: no reference that would outlive the runner

    def in_child() -> torch.Tensor:
        out = holder[0](x)
        assert id(holder[0].session) != parent  # a session of the child's own
        holder.clear()  # the child's only reference: the runner and its sessions are released
        return out

    outs = draw_in_forked_children(in_child, 3, before=lambda: holder[0](x), timeout=30.0)
    assert all(o.shape == (4, 10) for o in outs)
    assert id(holder[0].session) == parent
    assert holder[0](x).shape == (4, 10)


# ---------------------------------------------------------------------------- keyed noise
@pytest.fixture(scope="module")
def keyed_export(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[RandomizedFeatureWrapper, Callable[[int], Tensor], str]:
    """The digits CNN under keyed noise at two points, exported once (dynamic batch)."""
    model, inputs = digits_cnn()
    w = wrap(model, ["relu2", "penultimate"], nu=NU, noise="keyed")
    path = str(tmp_path_factory.mktemp("onnx") / "keyed.onnx")
    to_onnx(w, inputs(8), path)
    return w, inputs, path


def test_keyed_export_keeps_the_key_out_of_the_file(
    keyed_export: tuple[RandomizedFeatureWrapper, Callable[[int], Tensor], str],
) -> None:
    """The graph takes its noise as inputs like a fresh one; the metadata says "keyed"; neither
    the key's bytes nor its hex appear anywhere in the file."""
    w, _, path = keyed_export
    key = w.noise_key
    assert key is not None
    blob = Path(path).read_bytes()
    assert key not in blob and key.hex().encode() not in blob
    proto = onnx.load(path)
    meta = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    assert meta["noise"] == "keyed" and [e["layer"] for e in meta["inputs"]] == w.layers
    assert {i.name for i in proto.graph.input} == {"x", "noise_0", "noise_1"}


def test_onnx_defended_with_the_key_gives_the_wrappers_answers(
    keyed_export: tuple[RandomizedFeatureWrapper, Callable[[int], Tensor], str],
) -> None:
    """With `key=defended.noise_key` the runner computes the wrapper's keyed draws: the same
    logits (to 1e-5) in any batch order and size, every call. Without the key it draws a new one:
    deterministic still, but not the wrapper's answers."""
    w, inputs, path = keyed_export
    x = inputs(9)
    with torch.no_grad():
        eager = w(x)
    same = OnnxDefended(path, providers=["CPUExecutionProvider"], key=w.noise_key)
    assert same.noise == "keyed"
    assert (same(x) - eager).abs().max() <= 1e-5
    assert (same(x.flip(0)) - eager.flip(0)).abs().max() <= 1e-5
    assert (same(x[3:4]) - eager[3:4]).abs().max() <= 1e-5
    other = OnnxDefended(path, providers=["CPUExecutionProvider"])
    assert torch.equal(other(x), other(x)) and not torch.allclose(other(x), eager, atol=1e-3)
    fresh = OnnxDefended(path, providers=["CPUExecutionProvider"], noise="fresh")
    assert not torch.allclose(fresh(x), fresh(x))


def test_onnx_defended_refuses_a_key_for_fresh_noise(tmp_path: Path) -> None:
    model, inputs = digits_cnn()
    path = str(tmp_path / "fresh.onnx")
    to_onnx(wrap(model, nu=NU), inputs(2), path)
    with pytest.raises(ValueError, match=r"no `key` with noise='fresh'"):
        OnnxDefended(path, key=bytes(32))
    with pytest.raises(ValueError, match=r"32 bytes \(256 bits\), but got 3 bytes"):
        OnnxDefended(path, noise="keyed", key=b"abc")
    assert OnnxDefended(path, noise="keyed").noise == "keyed"  # any graph can run keyed


@pytest.mark.parametrize("dynamo", [False, True])
def test_plain_onnx_export_of_a_keyed_wrapper_is_refused(tmp_path: Path, dynamo: bool) -> None:
    """Exported by torch.onnx, the hash's coefficients would be constants in the file (the key,
    in effect): both exporters stop, naming to_onnx and OnnxDefended(path, key=...)."""
    model, inputs = digits_cnn()
    with pytest.raises(Exception, match=r"randfeat\.export\.to_onnx.*OnnxDefended\(path, key="):
        torch.onnx.export(
            wrap(model, nu=NU, noise="keyed"), (inputs(2),), str(tmp_path / "k.onnx"), dynamo=dynamo
        )
