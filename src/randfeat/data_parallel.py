"""`nn.DataParallel`'s forward with every replica run in a copy of the caller's context.

torch's `parallel_apply` runs each replica in a new `threading.Thread`, which (before Python 3.14)
starts with an empty `contextvars` context. Code that keeps per-call state in context variables,
like the hooks of [RandomizedFeatureWrapper][randfeat.wrapper.RandomizedFeatureWrapper], would find
none of it in the replicas. [data_parallel_forward][randfeat.data_parallel.data_parallel_forward]
gives each replica its own copy of the caller's context (a context cannot be entered by two threads
at once); the copies hold the same values, so state objects are shared with the caller.
"""

from __future__ import annotations

import contextvars
from typing import Any

from torch import nn

__all__ = ["data_parallel_forward"]


class _InContext:
    """A replica, called inside a copy of the context it was created in."""

    def __init__(self, replica: nn.Module) -> None:
        self.replica = replica
        self.context = contextvars.copy_context()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.context.run(self.replica, *args, **kwargs)


def data_parallel_forward(
    dp: nn.DataParallel[nn.Module], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """What `dp(*args, **kwargs)` computes on two or more devices, replicas in this context.

    Scatter, replicate, apply and gather are DataParallel's own methods; only the replicas are
    called through a context copy. DataParallel's own forward hooks (on `dp` itself) are not run.
    """
    inputs, module_kwargs = dp.scatter(args, kwargs, dp.device_ids)
    if not inputs and not module_kwargs:
        inputs, module_kwargs = ((),), ({},)
    replicas = dp.replicate(dp.module, dp.device_ids[: len(inputs)])
    shims: Any = [_InContext(r) for r in replicas]
    outputs = dp.parallel_apply(shims, inputs, module_kwargs)
    return dp.gather(outputs, dp.output_device)
