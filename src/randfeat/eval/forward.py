"""How the defended model's forward runs: its precision, memory format and compilation.

[ForwardOptions][randfeat.eval.forward.ForwardOptions] holds the three speed settings of
`randfeat eval` (`--dtype`, `--channels-last`, `--compile`), and
[Forward][randfeat.eval.forward.Forward] applies them to one defended model as a callable the
oracle, the judging rule and the benchmarks call. Only the model's own forward changes:

- `dtype`: the forward runs under `torch.autocast` in `bfloat16` or `float16` (matrix products
  and convolutions in the low precision, reductions and normalisations as autocast decides). The
  images going in stay float32, and the scores coming out are cast back to float32, so the
  attack's state, its projections onto the ε-ball and the oracle's bookkeeping stay exact. The
  defense's noise is drawn in the dtype of the feature it perturbs (the low precision inside the
  model, float32 at the input for RND).
- `channels_last`: the model's 4-D weights and every 4-D input are laid out NHWC, which the
  convolutions of cuDNN and oneDNN prefer (a layout change only: the same numbers).
- `compile`: the defended model is compiled once with `torch.compile` (the first calls trace and
  compile it; later calls reuse the compiled code). The wrapper's noise is the graph op
  `randfeat::standard_normal` where randfeat has it, drawn from the wrapper's own stream when the
  graph runs.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> f = Forward(nn.Linear(4, 3), ForwardOptions(dtype="bfloat16"), torch.device("cpu"))
    >>> f(torch.rand(2, 4)).dtype
    torch.float32
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from randfeat.checks import check_choice
from randfeat.outputs import logits_of

__all__ = ["DTYPES", "RECOMPILE_LIMIT", "DTypeName", "Forward", "ForwardOptions"]

DTypeName = Literal["float32", "bfloat16", "float16"]
"""The names `--dtype` accepts."""
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""`--dtype` name → the dtype the forward computes in (float32: no autocast)."""
RECOMPILE_LIMIT = 64
"""Compiled versions kept per function while a compiled `Forward` runs (torch's default: 8).

Every defense of a grid wraps the same model with the same wrapper class, so their forwards share
one code object, and each needs its own compiled version (its noise stream and ν are constants of
its graph), plus one with a dynamic batch size: five defenses already exceed torch's default.
Past the limit torch would silently run the function uncompiled; a compiled `Forward` raises
instead, so that a run asked to be compiled is compiled.
"""


def _no_silent_fallback() -> contextlib.AbstractContextManager[object]:
    """torch.compile's settings while a compiled forward runs: the limit above, and an error
    rather than an eager fallback past it."""
    import torch._dynamo.config as dynamo_config

    return dynamo_config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True)


@dataclass(frozen=True)
class ForwardOptions:
    """The speed settings of a model's forward (defaults: plain float32 eager forwards).

    Attributes:
        dtype: `"float32"` (no autocast), `"bfloat16"` or `"float16"` (autocast of the forward).
        channels_last: the NHWC memory format for the model's 4-D weights and inputs.
        compile: compile the model once with `torch.compile`.
    """

    dtype: DTypeName = "float32"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        check_choice(self.dtype, "dtype", tuple(DTYPES))

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype the forward computes in."""
        return DTYPES[self.dtype]

    def check(self, device: torch.device) -> None:
        """Raise unless `device` can run these options as asked (before any work is spent).

        Autocast in `bfloat16` on a GPU without it (before compute capability 8.0) would be
        silently disabled by torch, and the run would not be the one asked for.

        Raises:
            ValueError: the device cannot autocast to `dtype`.
        """
        if self.dtype == "float32":
            return
        if not torch.amp.is_autocast_available(device.type):
            raise ValueError(
                f"Expected a device that supports autocast for --dtype {self.dtype}, but "
                f"{device.type!r} does not. Use --dtype float32 on this device."
            )
        if (
            device.type == "cuda"
            and self.dtype == "bfloat16"
            and not torch.cuda.is_bf16_supported()
        ):
            raise ValueError(
                f"Expected a GPU with bfloat16 (compute capability >= 8.0) for --dtype bfloat16, "
                f"but {torch.cuda.get_device_name(device)} has none. Use --dtype float16."
            )


class Forward:
    """A defended model run with [ForwardOptions][randfeat.eval.forward.ForwardOptions].

    Call it like the model: images `[n, C, H, W]` in, float32 scores `[n, K]` out (or the
    model's labels, for a label-only model). The module itself is kept as `module` (its own
    methods, e.g. `manual_seed` of a wrapper, still act on the calls made here).

    With `channels_last`, the module's 4-D parameters are converted in place (a model shared by
    several defenses is converted once, for all of them).

    Args:
        module: the defended model (a wrapper, a baseline defense or the bare model).
        options: how to run its forward.
        device: where it runs (autocast is per device type).

    Raises:
        ValueError: `options` cannot run on `device` (see `ForwardOptions.check`).
    """

    def __init__(self, module: nn.Module, options: ForwardOptions, device: torch.device) -> None:
        options.check(device)
        self.module = module
        self.options = options
        self.device_type = device.type
        if options.channels_last:
            module.to(memory_format=torch.channels_last)
        self._call: Any = torch.compile(module) if options.compile else module

    def __call__(self, x: Tensor) -> Tensor:
        """The model's scores for `x`, as float32 (labels as the model returns them)."""
        opts = self.options
        if opts.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if opts.compile:  # one graph for every batch size (but 1, which torch specialises)
            torch._dynamo.maybe_mark_dynamic(x, 0)
        with contextlib.ExitStack() as stack:
            if opts.compile:
                stack.enter_context(_no_silent_fallback())
            if opts.dtype != "float32":
                stack.enter_context(torch.autocast(self.device_type, dtype=opts.torch_dtype))
            out = logits_of(self._call(x))
        return out.float() if out.is_floating_point() else out

    def __repr__(self) -> str:
        o = self.options
        return (
            f"Forward({type(self.module).__name__}, dtype={o.dtype}, "
            f"channels_last={o.channels_last}, compile={o.compile})"
        )
