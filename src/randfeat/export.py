r"""ONNX export of a defended model whose noise enters as graph inputs, and a safe runner for it.

Why not the runtime's random ops: `torch.onnx.export(defended, ...)` of a graph that draws its own
noise emits `RandomNormalLike` without a seed, and onnxruntime seeds each session the same way, so
two sessions created in one process replay identical noise (measured in `docs/deploy.md`); TensorRT
ignores the op's seed altogether. A defense whose noise an attacker can replay is no defense.

[to_onnx][randfeat.export.to_onnx] therefore writes a graph with **no random op**: every perturbed
point takes its standard-normal draw $\varepsilon \sim \mathcal{N}(0, I)$ as an explicit input
(`noise_0`, `noise_1`, ... in the order of `defended.layers`, each shaped like the feature there,
batch first), and the graph computes `feature + sqrt(ν) * noise_i` (or `sqrt(Σ)`) with ν baked in.
The inputs are described in the model's metadata (key `"randfeat.noise"`, JSON) and in each input's
`doc_string`. [OnnxDefended][randfeat.export.OnnxDefended] loads such a file with onnxruntime and
feeds it fresh noise at every call, per sample, from OS entropy (one stream per thread, re-seeded
in forked children, like the wrapper's). Any other runtime must do the same: draw every `noise_i`
i.i.d. N(0, 1) afresh for every call from a cryptographically seeded generator.

Keyed noise (`wrap(..., noise="keyed")`, `randfeat.keyed`) exports the same graph: its noise is a
function of the key and `x` computed outside the graph, so **the key never enters the file** (a
graph that computed it would hold the key as a constant, readable by anyone with the file: plain
`torch.onnx.export` of a keyed wrapper is refused for that reason). The metadata records that the
wrapper was keyed, not its key; `OnnxDefended(path, key=defended.noise_key)` computes the same
keyed draws as the wrapper at every call, from `x` as float32.

Requires the `onnx` extra: `pip install "randfeat[onnx]"`.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from randfeat.keyed import KeyedNoise, NoiseKind, check_key, check_noise_options
from randfeat.noise import NoiseRNG
from randfeat.outputs import logits_of
from randfeat.wrapper import RandomizedFeatureWrapper

__all__ = ["METADATA_KEY", "NoiseInput", "OnnxDefended", "to_onnx"]

METADATA_KEY = "randfeat.noise"
"""The metadata entry of an exported graph that lists its noise inputs (JSON)."""

BATCH = "batch"
"""The name of the dynamic batch dimension in shapes and in the graph."""

DISTRIBUTION = "i.i.d. standard normal N(0, 1), drawn afresh for every call from OS entropy"

_Array = TypeVar("_Array")


@dataclass(frozen=True)
class NoiseInput:
    """One noise input of an exported graph.

    Attributes:
        name: the graph input's name (`noise_0`, `noise_1`, ...).
        layer: the perturbed point it feeds (a key of `defended.layers`, e.g. `"fc.pre"`).
        shape: the input's shape, `"batch"` first when the batch is dynamic (e.g. `("batch", 512)`).
    """

    name: str
    layer: str
    shape: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        """The entry written to the graph's metadata."""
        return {
            "name": self.name,
            "layer": self.layer,
            "shape": list(self.shape),
            "distribution": DISTRIBUTION,
        }

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> NoiseInput:
        """Read an entry written by [to_json][randfeat.export.NoiseInput.to_json]."""
        return cls(str(entry["name"]), str(entry["layer"]), tuple(entry["shape"]))


def _require(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(
            f"randfeat.export needs {name}, which is not installed. "
            'Install it with `pip install "randfeat[onnx]"`.'
        ) from None


class _NoiseAsInputs(nn.Module):
    """`(x, noise_0, ...) -> logits`: the wrapper's forward with the draws given as inputs."""

    def __init__(self, defended: RandomizedFeatureWrapper) -> None:
        super().__init__()
        self.defended = defended

    def forward(self, x: Tensor, *noise: Tensor) -> Tensor:
        given = dict(zip(self.defended.layers, noise, strict=True))
        return logits_of(self.defended.forward_with_noise(x, given))


def to_onnx(
    defended: RandomizedFeatureWrapper,
    example_x: Tensor,
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
) -> tuple[NoiseInput, ...]:
    """Write `defended` to an ONNX file whose noise is a set of explicit inputs.

    The graph has the input `x` (like `example_x`), one input per perturbed point (see
    [NoiseInput][randfeat.export.NoiseInput]) and the output `logits` (for a model that returns an
    output object, its `.logits`). It contains no random op: run it with
    [OnnxDefended][randfeat.export.OnnxDefended], or feed every noise input fresh i.i.d. N(0, 1)
    draws at every call.

    Args:
        defended: the wrapper to export (its current ν, in its current mode: call `.eval()` first).
        example_x: an input batch `[N, ...]` (with `N >= 2` when `dynamic_batch`).
        path: the `.onnx` file to write.
        dynamic_batch: make the batch dimension of `x`, of every noise input and of the output
            dynamic (named `"batch"`); else they keep `N`.
        opset: the ONNX opset; `None` lets `torch.onnx.export` choose.

    Returns:
        The noise inputs, in the order of `defended.layers` (also written to the file's metadata,
        with `defended.noise`: `"fresh"` or `"keyed"`, never the key).

    Raises:
        TypeError: `defended` is not a wrapper, `example_x` not a floating tensor.
        ValueError: `example_x` has no batch dimension, or a batch of 1 with `dynamic_batch`.
        ImportError: onnx / onnxscript are not installed (the `onnx` extra).
    """
    if not isinstance(defended, RandomizedFeatureWrapper):
        raise TypeError(
            "Expected argument `defended` to be a RandomizedFeatureWrapper (from randfeat.wrap), "
            f"but got {type(defended).__name__}."
        )
    if not isinstance(example_x, Tensor) or not example_x.is_floating_point():
        got = f"dtype {example_x.dtype}" if isinstance(example_x, Tensor) else type(example_x)
        raise TypeError(f"Expected argument `example_x` to be a float tensor, but got {got}.")
    if example_x.ndim < 1 or (dynamic_batch and example_x.shape[0] < 2):
        raise ValueError(
            "Expected argument `example_x` to be a batch [N, ...] with N >= 2 when "
            f"dynamic_batch=True (torch.export specialises a batch of 1), but got shape "
            f"{list(example_x.shape)}."
        )
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)):
        raise TypeError(f"Expected argument `opset` to be None or an int, but got {opset!r}.")
    onnx = _require("onnx")
    _require("onnxscript")  # torch.onnx's exporter needs it
    shapes = defended.feature_shapes(example_x)
    inputs = tuple(
        NoiseInput(
            f"noise_{i}",
            key,
            ((BATCH,) if dynamic_batch else (s[0],)) + tuple(int(d) for d in s[1:]),
        )
        for i, (key, s) in enumerate(shapes.items())
    )
    noise = tuple(torch.zeros(shapes[n.layer], dtype=example_x.dtype) for n in inputs)
    noise = tuple(t.to(example_x.device) for t in noise)
    dynamic: Any = None
    if dynamic_batch:
        batch = torch.export.Dim(BATCH, min=1)
        dynamic = ({0: batch}, tuple({0: batch} for _ in inputs))  # x, then *noise
    shim = _NoiseAsInputs(defended)
    shim.training = defended.training  # its own flag only: .train() would reach into the model
    with torch.no_grad(), warnings.catch_warnings():
        # Every input shares the one Dim `batch`, which torch.onnx reports while naming the axes.
        warnings.filterwarnings("ignore", message="# The axis name: batch will not be used")
        torch.onnx.export(
            shim,
            (example_x, *noise),
            str(path),
            input_names=["x", *(n.name for n in inputs)],
            output_names=["logits"],
            opset_version=opset,
            dynamic_shapes=dynamic,
            dynamo=True,
            verbose=False,
        )
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key = METADATA_KEY
    noise_json = [n.to_json() for n in inputs]
    entry.value = json.dumps({"version": 1, "noise": defended.noise, "inputs": noise_json})
    for graph_input in proto.graph.input:
        for n in inputs:
            if graph_input.name == n.name:
                graph_input.doc_string = (
                    f"Noise for layer {n.layer!r}, shape {list(n.shape)}: {DISTRIBUTION}. "
                    "The graph scales it by sqrt(nu) of that layer."
                )
    proto.doc_string = (
        f"A randfeat-defended model: noise at {list(shapes)} enters as the inputs "
        f"{[n.name for n in inputs]} (see metadata {METADATA_KEY!r}); run it with "
        "randfeat.export.OnnxDefended, never with constant noise."
    )
    onnx.save(proto, str(path))
    return inputs


class OnnxDefended:
    """Run a graph written by [to_onnx][randfeat.export.to_onnx], with its noise drawn at every call.

    Fresh noise: each call draws every noise input i.i.d. N(0, 1) for every sample from this
    object's own stream: seeded from OS entropy, one stream per thread, re-seeded in forked
    children (the wrapper's policy, `randfeat.noise.NoiseRNG`). Two `OnnxDefended` objects, even on
    the same file in one process, never draw the same noise. Thread-safe (onnxruntime sessions
    are). Keyed noise: each row's draws are computed from its float32 bytes and the key
    (`randfeat.keyed`), exactly as the wrapper computes them, so the same key gives the wrapper's
    noise; the key comes from the caller, never from the file.

    Fork-safe: onnxruntime sessions are not (a forked child inherits the session's thread pool
    without its threads, and any lock those threads held at the fork). In a forked child the
    inherited session is set aside, never used and never destroyed, and the first call builds a
    new one from `path`. Measured with the digits CNN, forking right after a call in the parent:
    7 of 100 children that ran the inherited session hung in `Session.run`; children that built a
    session of their own and then released the inherited one hung in its destructor (60 of 60);
    with the session set aside, none of 100 hung.

    Args:
        path: the `.onnx` file.
        providers: onnxruntime execution providers, in order of preference; `None` takes every
            available one in onnxruntime's order.
        noise: `"fresh"` or `"keyed"`; `None` takes what the file says its wrapper used.
        key: the key of keyed noise (32 bytes, e.g. `defended.noise_key`); `None` draws a new
            one from OS entropy (answers then differ from the wrapper's).

    Raises:
        ValueError: the file was not written by `to_onnx` (it has no noise metadata); `key` with
            fresh noise or not 32 bytes.
        ImportError: onnxruntime is not installed (the `onnx` extra).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        providers: list[str] | None = None,
        *,
        noise: NoiseKind | None = None,
        key: bytes | None = None,
    ) -> None:
        if noise is not None or key is not None:  # check before loading anything
            check_noise_options(noise or "keyed", None, key)
            key = None if key is None else check_key(key)
        ort = _require("onnxruntime")
        self.path = str(path)
        self.providers = list(providers or ort.get_available_providers())
        self._session: Any = ort.InferenceSession(self.path, providers=self.providers)
        self._lock = threading.Lock()
        meta = self._session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if meta is None:
            raise ValueError(
                f"Expected an ONNX file written by randfeat.export.to_onnx, but {str(path)!r} has "
                f"no {METADATA_KEY!r} metadata: its noise (if any) cannot be drawn safely. Export "
                "the wrapper with randfeat.export.to_onnx(defended, example_x, path)."
            )
        entries = json.loads(meta)
        self.noise_inputs = tuple(NoiseInput.from_json(e) for e in entries["inputs"])
        self.noise: NoiseKind = check_noise_options(
            noise or entries.get("noise", "fresh"), None, key
        )
        self._rng = NoiseRNG()
        self._keyed = KeyedNoise(key) if self.noise == "keyed" else None
        _RUNNERS.add(self)

    @property
    def session(self) -> Any:
        """This process's `onnxruntime.InferenceSession` (built anew in a forked child)."""
        session = self._session
        if session is None:
            with self._lock:
                if self._session is None:
                    ort = _require("onnxruntime")
                    self._session = ort.InferenceSession(self.path, providers=self.providers)
                session = self._session
        return session

    def _forked(self) -> None:
        """In a forked child: set the inherited session aside for good (see the class docs)."""
        if self._session is not None:
            _keep_forever(self._session)
        self._session = None
        self._lock = threading.Lock()  # a lock held by another parent thread stays held here

    def __call__(self, x: _Array) -> _Array:
        """The noisy logits for `x`: a torch tensor (any device) or a NumPy array, same type out."""
        np = _require("numpy")
        if isinstance(x, Tensor):
            array = x.detach().to("cpu", torch.float32).numpy()
        elif isinstance(x, np.ndarray):
            array = x.astype(np.float32, copy=False)
        else:
            raise TypeError(
                f"Expected argument `x` to be a torch tensor or a NumPy array, but got "
                f"{type(x).__name__}."
            )
        if array.ndim < 1:
            raise ValueError(f"Expected argument `x` to be a batch [N, ...], got {array.shape}.")
        n = array.shape[0]
        feeds = {"x": array}
        gen = self._rng.generator(torch.device("cpu"))
        seeds = None if self._keyed is None else self._keyed.row_seeds(torch.from_numpy(array))
        for i, inp in enumerate(self.noise_inputs):
            like = torch.empty([n if d == BATCH else int(d) for d in inp.shape])
            if self._keyed is None or seeds is None:
                feeds[inp.name] = like.normal_(generator=gen).numpy()
            else:  # the index in the wrapper's layers: the stream the wrapper draws from
                feeds[inp.name] = self._keyed.standard_normal(like, seeds, i).numpy()
        logits = self.session.run(["logits"], feeds)[0]
        if isinstance(x, Tensor):
            return torch.from_numpy(logits).to(x.device)  # type: ignore[return-value]
        return logits


_RUNNERS: weakref.WeakSet[OnnxDefended] = weakref.WeakSet()
"""Every live `OnnxDefended`: what a fork must detach from its inherited session."""


def _keep_forever(obj: object) -> None:
    """Add a reference to `obj` that is never released, so it is never destroyed in this process.

    An onnxruntime session inherited across `fork` owns a thread pool whose threads exist only in
    the parent; once the child has started threads of its own, the destructor joins threads that
    never end (measured: 60 of 60 children hung). A Python container would not do: interpreter
    shutdown clears module globals and would destroy it then. The memory stays shared with the
    parent, copy-on-write.
    """
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


def _detach_sessions_after_fork() -> None:
    for runner in list(_RUNNERS):
        runner._forked()


if hasattr(os, "register_at_fork"):  # not on Windows, which cannot fork
    os.register_at_fork(after_in_child=_detach_sessions_after_fork)
