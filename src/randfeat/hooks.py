"""Forward hooks on a module's input or output: the one way randfeat attaches them.

A *feature hook* is a function of one feature: the module's first positional input (a forward
pre-hook, `pre=True`) or its output (a forward hook, `pre=False`). It returns a replacement for the
feature, or `None` to leave it as it is. [attach][randfeat.hooks.attach] registers one and returns
torch's `RemovableHandle`; [Hooks][randfeat.hooks.Hooks] groups handles so that they are removed
together, and as a context manager removes them on exit even when the forward raised (the
captum habit: a temporary hook never outlives the call that needed it).

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from randfeat.hooks import Hooks
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> seen = []
    >>> with Hooks() as hooks:
    ...     _ = hooks.attach(model[2], seen.append, pre=True)  # the input of the classifier
    ...     _ = model(torch.zeros(5, 3))
    >>> seen[0].shape, len(model[2]._forward_pre_hooks)
    (torch.Size([5, 4]), 0)
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["FeatureHook", "Hooks", "attach"]

FeatureHook = Callable[[Any], Any]
"""A function of the feature (a tensor, or `None` for a pre-hook on a module called without a
positional input) that returns the feature to use instead, or `None` to keep it."""


class _Pre:
    """Forward pre-hook: hand the first positional input to the feature hook, substitute its result."""

    def __init__(self, hook: FeatureHook) -> None:
        self.hook = hook

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        new = self.hook(args[0] if args else None)
        if new is None:
            return None
        return (new, *args[1:])


class _Post:
    """Forward hook: hand the output to the feature hook; torch substitutes a non-`None` result."""

    def __init__(self, hook: FeatureHook) -> None:
        self.hook = hook

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return self.hook(output)


def attach(module: nn.Module, hook: FeatureHook, *, pre: bool) -> RemovableHandle:
    """Attach `hook` to the input (`pre=True`) or the output (`pre=False`) of `module`.

    Args:
        module: the module whose feature the hook sees.
        hook: called with the feature at every forward of `module`; a non-`None` result replaces it.
            The hook is stored on the module (and pickled with it when it is picklable).
        pre: `True` for the module's first positional input (`None` when the module was called with
            keyword arguments only), `False` for its output.

    Returns:
        The handle; `handle.remove()` detaches the hook (idempotent).

    Raises:
        TypeError: `module` is not an `nn.Module` or `hook` is not callable.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"Expected argument `module` to be an nn.Module, but got {type(module).__name__}."
        )
    if not callable(hook):
        raise TypeError(f"Expected argument `hook` to be callable, but got {hook!r}.")
    if pre:
        return module.register_forward_pre_hook(_Pre(hook))
    return module.register_forward_hook(_Post(hook))


class Hooks:
    """Handles removed together: all at once by [remove][randfeat.hooks.Hooks.remove], or on exit.

    As a context manager, every hook attached inside the block is removed when the block ends,
    whether it returned or raised. Outside a `with` block the group lives until `remove()`.
    """

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []

    def attach(self, module: nn.Module, hook: FeatureHook, *, pre: bool) -> RemovableHandle:
        """[attach][randfeat.hooks.attach] `hook` and keep its handle in this group."""
        return self.add(attach(module, hook, pre=pre))

    def add(self, handle: RemovableHandle) -> RemovableHandle:
        """Keep a handle from any other `register_*_hook` call in this group."""
        self.handles.append(handle)
        return handle

    def remove(self) -> None:
        """Remove every hook of the group (idempotent)."""
        handles, self.handles = self.handles, []
        for h in handles:
            h.remove()

    def __len__(self) -> int:
        return len(self.handles)

    def __enter__(self) -> Hooks:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()
