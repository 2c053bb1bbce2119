"""The data sets `randfeat eval --data` accepts: [DATA_SETS][randfeat.eval.data.registry.DATA_SETS].

`--data` is parsed in one place, [DataSpec.parse][randfeat.eval.data.registry.DataSpec.parse]: a
name (`digits`), a name and a local path (`cifar10:PATH`, `imagenet:PATH`), or a name with an
optional path (`fashion-mnist[:PATH]`, found in its default place without one). Each
[DataSet][randfeat.eval.data.registry.DataSet] carries what the grid needs to know about it: its
default radii and image count, the models it takes, and how to load its test images into a
[Pool][randfeat.eval.data.registry.Pool]. The loaders themselves live in [randfeat.eval.data.loaders][].

To add a data set, write its loader (returning a `Pool`) and add one `DataSet` to `_DATA_SETS`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from randfeat.eval.data import loaders as rf_data
from randfeat.eval.errors import ConfigError

if TYPE_CHECKING:
    from torch.utils.data import Dataset

__all__ = ["DATA_SETS", "PAPER_EPS", "DataSet", "DataSpec", "Pool"]

PAPER_EPS = MappingProxyType({"linf": 0.05, "l2": 5.0})
"""The paper's radii for 224×224 images in $[0, 1]$ (§5, Tables 1–2)."""


@dataclass(frozen=True)
class Pool:
    """The images an evaluation draws from: in memory (`x`) or read on demand (`dataset`).

    Attributes:
        name: the data set's name.
        path: its local path (None for embedded data).
        labels: `[M]` int64 labels of the whole pool.
        x: `[M, C, H, W]` images in $[0, 1]$ when they are in memory.
        dataset: a map-style dataset yielding `(x: [C, H, W], y)` otherwise.
    """

    name: str
    path: str | None
    labels: Tensor
    x: Tensor | None = None
    dataset: Dataset[Any] | None = None

    def images(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """The images and labels at `idx`: `([n, C, H, W], [n])`.

        Raises:
            ConfigError: the files cannot be read.
        """
        if self.x is not None:
            return self.x[idx], self.labels[idx]
        try:
            return rf_data.materialize(self.dataset, idx)  # type: ignore[arg-type]
        except (OSError, ValueError) as err:
            raise ConfigError(f"Could not read images from {self.path!r}: {err}") from err

    def batches(self, idx: Tensor, size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """`(x, y)` batches of at most `size` images of `idx`, read one batch at a time."""
        for part in idx.split(size):
            yield self.images(part)


@dataclass(frozen=True)
class DataSet:
    """One data set `--data` can name.

    Attributes:
        name: the name before the colon (`digits`, `cifar10`, `imagenet`).
        usage: how `--data` spells it (`"cifar10:PATH"`).
        needs_path: whether it is read from a local path.
        eps_linf: default ℓ∞ radius on its images.
        eps_l2: default ℓ2 radius on its images.
        eps_source: what the header calls those defaults (`"paper default"`).
        n_images: default number of attacked images.
        models: the only `--model` names it takes (None: any model whose source takes it).
        classes: classifier outputs a model needs for it by default (None: the model's own).
        native_size: whether images default to the model's own input size (else `image_size`).
        load: its test images as a pool, from `(path, image_size)`.
        optional_path: whether the path may be left out (the loader then finds its files).
        check: a cheap check of `path` before any model is loaded (raises `OSError` or
            `ValueError` with the fix); None: `DataSpec.check_path`'s directory check.
        split: its train and test images in memory, from `path`, for `randfeat train` (None:
            not offered for training).
    """

    name: str
    usage: str
    needs_path: bool
    eps_linf: float
    eps_l2: float
    eps_source: str
    n_images: int
    models: tuple[str, ...] | None
    classes: int | None
    native_size: bool
    load: Callable[[str | None, int | None], Pool]
    optional_path: bool = False
    check: Callable[[str | None], object] | None = None
    split: Callable[[str | None], rf_data.Split] | None = None


def _digits(path: str | None, image_size: int | None) -> Pool:
    del path, image_size  # embedded, always 8×8
    d = rf_data.digits()
    return Pool("digits", None, d.y_test, x=d.x_test)


def _from_files(name: str, dataset: Dataset[Any], path: str) -> Pool:
    labels = torch.as_tensor(list(dataset.targets), dtype=torch.int64)  # type: ignore[attr-defined]
    if labels.numel() == 0:
        raise ConfigError(f"--data {name}:{path} holds no images.")
    return Pool(name, path, labels, dataset=dataset)


def _cifar10(path: str | None, image_size: int | None) -> Pool:
    root = str(path)
    return _from_files("cifar10", rf_data.load_cifar10(root, image_size=image_size), root)


def _imagenet(path: str | None, image_size: int | None) -> Pool:
    root = str(path)
    return _from_files(
        "imagenet", rf_data.load_image_folder(root, image_size=image_size or 224), root
    )


def _fashion_mnist(path: str | None, image_size: int | None) -> Pool:
    split = rf_data.fashion_mnist(path)
    x = split.x_test
    if image_size is not None and image_size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear")
        x = x.clamp_(0.0, 1.0)
    return Pool("fashion-mnist", path, split.y_test, x=x)


_DATA_SETS = (
    # The paper's 0.05 / 5 are meaningless at 64 pixels (ℓ2 5 exceeds the whole image's range,
    # ℓ∞ 0.05 is under one grey level of 16): the digits default to 0.2 / 1.5.
    DataSet("digits", "digits", False, 0.2, 1.5, "digits default", 100, ("digits-cnn",), None, False, _digits),
    DataSet("cifar10", "cifar10:PATH", True, PAPER_EPS["linf"], PAPER_EPS["l2"], "paper default", 1000, None, 10, False, _cifar10),
    DataSet("imagenet", "imagenet:PATH", True, PAPER_EPS["linf"], PAPER_EPS["l2"], "paper default", 1000, None, None, True, _imagenet),
    # 28×28 grey images: ℓ∞ 0.1 as for Fashion-MNIST in Croce, Andriushchenko & Hein (AISTATS
    # 2019), ℓ2 1.5 as for MNIST in Schott et al. (ICLR 2019); docs/evaluation.md says more.
    DataSet("fashion-mnist", "fashion-mnist[:PATH]", True, 0.1, 1.5, "fashion-mnist default", 1000, None, 10, False, _fashion_mnist, True, rf_data.fashion_mnist_root, rf_data.fashion_mnist),
)  # fmt: skip

DATA_SETS: Mapping[str, DataSet] = MappingProxyType({d.name: d for d in _DATA_SETS})
"""Every data set `--data` accepts, by name: `digits` (embedded), `cifar10:PATH` (the python
batches of CIFAR-10), `imagenet:PATH` (any ImageFolder directory) and `fashion-mnist[:PATH]` (the
four IDX files; without a path, `$RANDFEAT_FASHION_MNIST` or Debian's
`/usr/share/datasets/fashion-mnist`)."""


@dataclass(frozen=True)
class DataSpec:
    """A parsed `--data` value: the data set and its path.

    Attributes:
        dataset: the data set.
        path: the local path after the colon (None for embedded data).
    """

    dataset: DataSet
    path: str | None

    @classmethod
    def parse(cls, spec: str) -> DataSpec:
        """Parse `"digits"`, `"cifar10:PATH"`, `"imagenet:PATH"`, `"fashion-mnist[:PATH]"`.

        Raises:
            ConfigError: an unknown name (with the closest valid ones), a missing path, or a path
                given to embedded data.
        """
        name, sep, path = str(spec).partition(":")
        dataset = DATA_SETS.get(name)
        if dataset is None:
            close = difflib.get_close_matches(name, list(DATA_SETS), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            usages = ", ".join(repr(d.usage) for d in DATA_SETS.values())
            raise ConfigError(f"Unknown data set {name!r}.{hint} Valid --data values: {usages}.")
        if not dataset.needs_path:
            if sep:
                raise ConfigError(f"--data {name} takes no path (the images are embedded).")
            return cls(dataset, None)
        if not path:
            if dataset.optional_path and not sep:
                return cls(dataset, None)
            raise ConfigError(f"--data {name} needs a local path: --data {dataset.usage}.")
        return cls(dataset, path)

    def check_path(self) -> None:
        """Fail fast (before loading a model) on a path that is not a readable directory.

        Raises:
            ConfigError: the path is missing, not a directory, or not readable (or the data
                set's own `check` fails).
        """
        if self.dataset.check is not None:
            try:
                self.dataset.check(self.path)
            except (OSError, ValueError) as err:
                raise ConfigError(f"--data {self.dataset.name}: {err}") from err
            return
        if self.path is None:
            return
        p = Path(self.path).expanduser()
        if not p.is_dir():
            raise ConfigError(
                f"--data {self.dataset.name}:{self.path}: {str(p)!r} does not exist or is not a "
                "directory. randfeat never downloads data: point it at a local copy."
            )
        if not os.access(p, os.R_OK | os.X_OK):
            raise ConfigError(
                f"--data {self.dataset.name}:{self.path}: {str(p)!r} is not readable."
            )

    def load(self, image_size: int | None) -> Pool:
        """The pool of test images, resized to `image_size` where the data set allows.

        Raises:
            ConfigError: the files cannot be loaded.
        """
        try:
            return self.dataset.load(self.path, image_size)
        except (OSError, ValueError) as err:
            where = self.dataset.name + (f":{self.path}" if self.path else "")
            raise ConfigError(f"Cannot load --data {where!r}: {err}") from err
