"""Tests of randfeat.outputs.logits_of."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from randfeat.outputs import logits_of


def test_a_tensor_is_returned_as_is() -> None:
    t = torch.rand(2, 3)
    assert logits_of(t) is t


def test_the_logits_attribute_of_an_output_object() -> None:
    t = torch.rand(2, 3)
    assert logits_of(SimpleNamespace(logits=t, hidden_states=None)) is t


def test_transformers_output_object() -> None:
    modeling_outputs = pytest.importorskip("transformers.modeling_outputs")
    t = torch.rand(2, 3)
    assert logits_of(modeling_outputs.ImageClassifierOutput(logits=t)) is t


@pytest.mark.parametrize(
    ("output", "named"),
    [
        ((torch.rand(2, 3),), "tuple"),
        ([torch.rand(2, 3)], "list"),
        ({"logits": torch.rand(2, 3)}, "dict"),
        (SimpleNamespace(logits=None), "SimpleNamespace whose `.logits` is NoneType"),
        (3.0, "float"),
    ],
)
def test_anything_else_is_refused_with_what_is_allowed(output: object, named: str) -> None:
    with pytest.raises(TypeError, match=r"a tensor \[N, K\] or an object with a `\.logits`") as e:
        logits_of(output)
    assert f"but got {named}" in str(e.value)
