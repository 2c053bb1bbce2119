"""The calibration data as batches on the model's device, and the checks of what the model returns."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Batches", "check_logits", "check_pair", "model_device_dtype"]


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """The device and floating dtype of the model's first parameter or buffer (CPU, None if none)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device, (t.dtype if t.is_floating_point() else None)
    return torch.device("cpu"), None


class Batches:
    """`data` as `(x, y)` batches of at most `rows` images on the model's device and dtype.

    A tensor pair is sliced; an iterable (a DataLoader) is iterated once per pass, and later passes
    must yield the same labels in the same order (checked: a shuffled loader would break common
    random numbers); a one-shot iterator is kept in memory on the first pass and replayed.

    Raises:
        TypeError: `data` is neither an `(x, y)` pair of tensors nor an iterable of them, or
            holds non-integer labels.
        ValueError: x and y do not pair up, or a later pass yields other labels or batches.
    """

    def __init__(self, data: object, rows: int, device: torch.device, dtype: torch.dtype | None):
        self.rows, self.device, self.dtype = rows, device, dtype
        self.pair: tuple[Tensor, Tensor] | None = None
        self.iterable: Iterable[Any] | None = None
        self.replay: list[Any] | None = None
        self.labels: list[Tensor] = []  # first-pass labels per batch, to check later passes
        self.passes = 0
        if (
            isinstance(data, (tuple, list))
            and len(data) == 2
            and all(isinstance(t, Tensor) for t in data)
        ):
            x, y = data
            check_pair(x, y)
            self.pair = (x, y)
        elif isinstance(data, Tensor) or not isinstance(data, Iterable):
            raise TypeError(
                "Expected argument `data` to be an (x, y) pair of tensors or an iterable of (x, y) "
                f"batches (e.g. a DataLoader), but got {type(data).__name__}."
            )
        else:
            self.iterable = data
            if isinstance(data, Iterator):
                self.replay = []

    def _raw(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.pair is not None:
            x, y = self.pair
            yield from zip(x.split(self.rows), y.split(self.rows), strict=True)
            return
        if self.replay is not None and self.passes > 1:
            yield from self.replay
            return
        for item in self.iterable or ():
            if not (isinstance(item, (tuple, list)) and len(item) >= 2):
                raise TypeError(
                    "Expected argument `data` to yield (x, y) batches, but got an item of type "
                    f"{type(item).__name__}."
                )
            x, y = item[0], item[1]
            check_pair(x, y)
            if self.replay is not None:
                self.replay.append((x, y))
            yield from zip(x.split(self.rows), y.split(self.rows), strict=True)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.passes += 1
        first = self.passes == 1
        check = self.iterable is not None and self.replay is None  # a re-iterated loader
        i = -1
        for i, (x, y) in enumerate(self._raw()):
            x = x.to(self.device, self.dtype if self.dtype and x.is_floating_point() else None)
            y = y.to(self.device)
            if check and first:
                self.labels.append(y)
            elif check and (i >= len(self.labels) or not torch.equal(y, self.labels[i])):
                raise ValueError(
                    "Expected argument `data` to yield the same batches in the same order on every "
                    "pass, but the labels changed between passes (a shuffled DataLoader?). Use "
                    "shuffle=False, or pass an (x, y) pair of tensors."
                )
            yield x, y
        if check and not first and i + 1 != len(self.labels):
            raise ValueError(
                "Expected argument `data` to yield the same batches on every pass, but it yielded "
                f"{i + 1} batches after {len(self.labels)} on the first pass."
            )


def check_pair(x: object, y: object) -> None:
    """Raise unless `x: [N, ...]` and integer labels `y: [N]` are tensors that pair up."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            "Expected argument `data` to hold tensors (x, y), but got "
            f"({type(x).__name__}, {type(y).__name__})."
        )
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(
            f"Expected the labels y in argument `data` to be an integer tensor, but got dtype {y.dtype}."
        )
    if y.ndim != 1 or x.ndim < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            "Expected argument `data` to pair x [N, ...] with labels y [N], but got x of shape "
            f"{tuple(x.shape)} and y of shape {tuple(y.shape)}."
        )


def check_logits(logits: object, x: Tensor, y: Tensor, start: int) -> int:
    """Check one batch of clean logits `[B, K]` (finite) and its labels (in `[0, K)`); return K."""
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"Expected argument `model` to return logits [N, K], but got {shape} for a batch of "
            f"{x.shape[0]}."
        )
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(
            "Expected argument `model` to return finite logits, but got NaN/inf on clean data "
            f"(images {start}..{start + x.shape[0] - 1})."
        )
    k = logits.shape[1]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(
            f"Expected the labels in argument `data` to lie in [0, {k}) (the model has K={k} "
            f"classes), but got values in [{int(y.min())}, {int(y.max())}]."
        )
    return k
