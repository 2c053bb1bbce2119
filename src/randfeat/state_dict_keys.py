"""State-dict hooks that give a wrapper exactly its model's keys.

A wrapper holds its model as the submodule `model`, so torch would save its parameters as
`model.<key>`. [strip_model_prefix][randfeat.state_dict_keys.strip_model_prefix] (a state-dict
post-hook) removes that prefix, and [add_model_prefix][randfeat.state_dict_keys.add_model_prefix]
(a load pre-hook) puts it back, so checkpoints move between a model and its wrapper both ways;
nested in a parent module, only the parent's prefix appears.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn

__all__ = ["MODEL_PREFIX", "add_model_prefix", "strip_model_prefix"]

MODEL_PREFIX = "model."
"""The name under which a wrapper holds its model, with the dot."""


def strip_model_prefix(module: nn.Module, state: dict[str, Any], prefix: str, meta: Any) -> None:
    """state_dict post-hook: `<prefix>model.<k>` -> `<prefix><k>` (the model's own keys)."""
    full = prefix + MODEL_PREFIX
    keys = [k for k in state if k.startswith(full)]
    moved = OrderedDict((prefix + k[len(full) :], state.pop(k)) for k in keys)
    state.update(moved)
    md = getattr(state, "_metadata", None)
    if md is not None:
        for k in [k for k in md if k == full[:-1] or k.startswith(full)]:
            md[prefix + k[len(full) :]] = md.pop(k)


def add_model_prefix(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: accept the model's own keys (and prefixed ones)."""
    full = prefix + MODEL_PREFIX
    for k in [k for k in state if k.startswith(prefix) and not k.startswith(full)]:
        state[full + k[len(prefix) :]] = state.pop(k)
