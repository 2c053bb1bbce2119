"""Tests of randfeat.hooks: the one hook helper (attach by a flag, grouped removal, no leaks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from randfeat.hooks import Hooks, attach


def n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class KwargsOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(input=x)


def test_pre_hook_sees_and_replaces_the_first_positional_input() -> None:
    lin = nn.Linear(3, 2)
    seen: list[torch.Tensor] = []
    h = attach(lin, lambda f: (seen.append(f), torch.zeros_like(f))[1], pre=True)
    x = torch.ones(4, 3)
    assert torch.equal(lin(x), lin.bias.expand(4, 2))  # the input was replaced by zeros
    assert seen[0] is x
    h.remove()
    assert torch.allclose(lin(x), x @ lin.weight.T + lin.bias)


def test_post_hook_sees_and_replaces_the_output() -> None:
    lin = nn.Linear(3, 2)
    attach(lin, lambda out: out * 0, pre=False)
    assert torch.equal(lin(torch.ones(4, 3)), torch.zeros(4, 2))


def test_returning_none_keeps_the_feature() -> None:
    lin = nn.Linear(3, 2)
    x = torch.rand(4, 3)
    ref = lin(x)
    with Hooks() as hooks:
        hooks.attach(lin, lambda f: None, pre=True)
        hooks.attach(lin, lambda f: None, pre=False)
        assert torch.equal(lin(x), ref)


def test_pre_hook_on_keyword_only_call_sees_none() -> None:
    model = KwargsOnly()
    seen: list[object] = []
    attach(model.inner, seen.append, pre=True)
    model(torch.zeros(1))
    assert seen == [None]


def test_hooks_are_removed_on_exit_even_when_the_forward_raises() -> None:
    """captum's hook-leak test: an exception inside forward must not leave a hook behind."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))

    def boom(f: object) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), Hooks() as hooks:
        hooks.attach(model[0], lambda f: None, pre=False)
        hooks.attach(model[2], boom, pre=True)
        model(torch.zeros(1, 3))
    assert n_hooks(model) == 0


def test_remove_is_idempotent_and_add_keeps_foreign_handles() -> None:
    lin = nn.Linear(3, 2)
    hooks = Hooks()
    hooks.add(lin.register_forward_hook(lambda m, a, o: None))
    hooks.attach(lin, lambda f: None, pre=True)
    assert len(hooks) == 2 and n_hooks(lin) == 2
    hooks.remove()
    hooks.remove()
    assert len(hooks) == 0 and n_hooks(lin) == 0


def test_bad_arguments_are_refused_before_anything_is_attached() -> None:
    with pytest.raises(TypeError, match=r"nn\.Module"):
        attach(lambda x: x, lambda f: None, pre=True)  # type: ignore[arg-type]
    lin = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="callable"):
        attach(lin, 3, pre=False)  # type: ignore[arg-type]
    assert n_hooks(lin) == 0
