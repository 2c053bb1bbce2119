"""Evaluation data: embedded digits, local CIFAR-10 / ImageFolder, class-balanced subsets.

The paper (Nguyen Minh et al., "Randomized feature defense", §5 and appendix D) evaluates on "1000
images that contain every class from the studied dataset", each class of equal size:
`balanced_subset` draws such a subset with a seeded generator, optionally disjoint from other
indices (the calibration images must not be the attacked ones).

`digits` is the offline default: scikit-learn's bundled 8×8 handwritten digits (1,797 real
images, shipped inside the scikit-learn wheel, so nothing is downloaded), split once into a fixed,
class-stratified train/test split. The real-data loaders `load_cifar10` and
`load_image_folder` read local files only and never download; they return images in
`[0, 1]` without normalisation, because the models of `randfeat.eval.models` fold their own
normalisation in.

scikit-learn and torchvision are optional (the `eval` extra) and imported lazily.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from randfeat.checks import check_int, check_positive_int

if TYPE_CHECKING:
    from torch.utils.data import Dataset

__all__ = [
    "Digits",
    "balanced_subset",
    "digits",
    "load_cifar10",
    "load_image_folder",
    "materialize",
]

_EVAL_EXTRA_HINT = 'Install the evaluation extra: pip install "randfeat[eval]".'

DIGITS_TEST_FRACTION = 0.3
"""Fraction of the 1,797 digits held out as the test split (540 images, 1,257 for training)."""
DIGITS_SPLIT_SEED = 0
"""`random_state` of the stratified split: fixed, so every call returns the same split."""


def _require(module: str) -> Any:
    """Import an optional dependency of the `eval` extra, or raise an ImportError with the fix."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"randfeat.eval.data needs the optional dependency `{module.split('.')[0]}`, "
            f"which is not installed. {_EVAL_EXTRA_HINT}"
        ) from err


@dataclass(frozen=True)
class Digits:
    """The embedded digits data set, split into train and test.

    Attributes:
        x_train: `[N_train, 1, 8, 8]` float32 in `[0, 1]` (1,257 images).
        y_train: `[N_train]` int64 labels in `0..9`.
        x_test: `[N_test, 1, 8, 8]` float32 in `[0, 1]` (540 images).
        y_test: `[N_test]` int64 labels in `0..9`.
        classes: number of classes `K`.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: int = 10


def digits() -> Digits:
    """Load scikit-learn's bundled 8×8 digits with a fixed, class-stratified 70/30 split.

    Pixel values `0..16` are divided by 16 to lie in `[0, 1]`. The split is
    `train_test_split(test_size=0.3, stratify=y, random_state=0)`, so every call returns equal
    tensors (fresh copies: mutating them does not affect later calls).

    Returns:
        The `Digits` split: `x_*: [N, 1, 8, 8]` float32 in `[0, 1]`, `y_*: [N]` int64.

    Raises:
        ImportError: scikit-learn is not installed (fix: `pip install "randfeat[eval]"`).
    """
    datasets = _require("sklearn.datasets")
    model_selection = _require("sklearn.model_selection")
    bunch = datasets.load_digits()
    x = np.asarray(bunch.data, dtype=np.float32).reshape(-1, 1, 8, 8) / np.float32(16.0)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, stratify=y, random_state=DIGITS_SPLIT_SEED
    )
    return Digits(
        x_train=torch.from_numpy(np.ascontiguousarray(x_tr)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_te)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_te)),
        classes=10,
    )


def balanced_subset(
    y: Tensor | Sequence[int],
    n: int,
    *,
    seed: int,
    exclude: Tensor | Sequence[int] | None = None,
) -> Tensor:
    """Draw a class-balanced random subset: `n / K` indices of each of the `K` classes.

    As in the paper (§5: "1000 images that contain every class ... each of which has equal size"),
    every class present in `y` gets exactly `n // K` indices, drawn uniformly without
    replacement by a `torch.Generator` seeded with `seed`. Indices in `exclude` are never
    drawn, which keeps e.g. calibration images disjoint from attacked images.

    Args:
        y: `[M]` integer labels of the pool to draw from.
        n: subset size, a positive multiple of the number of classes `K` in `y`.
        seed: seed of the local generator (the global RNG is not touched).
        exclude: indices into `y` that must not be drawn (duplicates allowed).

    Returns:
        `[n]` int64 indices into `y`, sorted by class, then by random draw order.

    Raises:
        ValueError: `y` is not a 1-D integer vector, `n` is not a positive multiple of `K`,
            `exclude` holds an index outside `[0, M)`, or a class has fewer than `n / K`
            available (non-excluded) samples; the message lists the available count per class.
    """
    labels = torch.as_tensor(y)
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            "Expected argument `y` to be a 1-D tensor of integer labels, but got "
            f"dtype {labels.dtype} and shape {tuple(labels.shape)}."
        )
    check_positive_int(n, "n")
    check_int(seed, "seed")
    labels = labels.to("cpu", torch.int64)
    m = labels.numel()
    available = torch.ones(m, dtype=torch.bool)
    if exclude is not None:
        ex = torch.as_tensor(exclude).to("cpu").flatten()
        if ex.numel() > 0:
            if ex.dtype.is_floating_point or ex.dtype == torch.bool:
                raise ValueError(
                    "Expected argument `exclude` to hold integer indices, but got dtype "
                    f"{ex.dtype}."
                )
            ex = ex.to(torch.int64)
            bad = (ex < 0) | (ex >= m)
            if bool(bad.any()):
                raise ValueError(
                    f"Expected argument `exclude` to hold indices in [0, {m}), but got "
                    f"{ex[bad][:5].tolist()}."
                )
            available[ex] = False
    classes = torch.unique(labels)
    k = classes.numel()
    if k == 0:
        raise ValueError("Expected argument `y` to be non-empty, but got 0 labels.")
    if n % k != 0:
        raise ValueError(
            f"Expected argument `n` to be a multiple of the number of classes ({k}) so that "
            f"every class has equal size, but got n={n}."
        )
    per_class = n // k
    counts = {int(c): int((available & (labels == c)).sum()) for c in classes}
    short = {c: cnt for c, cnt in counts.items() if cnt < per_class}
    if short:
        raise ValueError(
            f"Cannot draw n={n} balanced samples ({per_class} per class for {k} classes): "
            f"available (non-excluded) samples per class are {counts}; classes {sorted(short)} "
            f"have fewer than {per_class}. Lower `n` to at most "
            f"{min(counts.values()) * k} or shrink `exclude`."
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in classes:  # K iterations over classes, not over samples
        pool = torch.nonzero(available & (labels == c)).squeeze(1)
        perm = torch.randperm(pool.numel(), generator=generator)[:per_class]
        chosen.append(pool[perm])
    return torch.cat(chosen)


def _check_dir(path: str | os.PathLike[str], argument: str) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"Expected argument `{argument}` to be an existing directory, but got {str(root)!r}, "
            "which does not exist or is not a directory. randfeat never downloads data: "
            "point it at a local copy."
        )
    return root


def _image_transform(image_size: int | None, crop: bool) -> Any:
    transforms = _require("torchvision.transforms")
    steps: list[Any] = []
    if image_size is not None:
        check_positive_int(image_size, "image_size")
        if crop:
            # The usual ImageNet evaluation preprocessing: resize the short side, centre-crop.
            steps += [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
        else:
            steps.append(transforms.Resize((image_size, image_size)))
    steps.append(transforms.ToTensor())  # [C, H, W] float32 in [0, 1]; no normalisation
    return transforms.Compose(steps)


def load_image_folder(path: str | os.PathLike[str], *, image_size: int = 224) -> Dataset[Any]:
    """Load a local `root/<class>/<image>` directory (e.g. the ImageNet validation set).

    Images are resized (short side) to `image_size`, centre-cropped to `image_size × image_size`
    and converted to `[3, image_size, image_size]` float32 in `[0, 1]`; no normalisation (the
    model returned by `randfeat.eval.models.load_timm` normalises itself). Class indices
    follow torchvision's `ImageFolder`: sorted folder names.

    Args:
        path: root directory with one sub-directory per class.
        image_size: side of the square output images.

    Returns:
        A `torchvision.datasets.ImageFolder` yielding `(x: [3, S, S], y: int)`.

    Raises:
        FileNotFoundError: `path` is not a directory, or it holds no images.
        ImportError: torchvision is not installed (fix: `pip install "randfeat[eval]"`).
    """
    root = _check_dir(path, "path")
    datasets = _require("torchvision.datasets")
    transform = _image_transform(image_size, crop=True)
    try:
        return datasets.ImageFolder(str(root), transform=transform)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"No images found under {str(root)!r}: expected one sub-directory per class holding "
            f"image files ({err})."
        ) from err


def load_cifar10(
    path: str | os.PathLike[str], *, train: bool = False, image_size: int | None = None
) -> Dataset[Any]:
    """Load CIFAR-10 from a local copy of the python batches; never downloads.

    `path` is the directory that contains `cifar-10-batches-py/` (as torchvision expects).
    Images are `[3, 32, 32]` float32 in `[0, 1]` (resized to `image_size × image_size` if
    given), without normalisation.

    Args:
        path: directory holding `cifar-10-batches-py`.
        train: the 50,000 training images instead of the 10,000 test images.
        image_size: optional side to resize to (e.g. 224 for ImageNet-pretrained models).

    Returns:
        A `torchvision.datasets.CIFAR10` yielding `(x: [3, S, S], y: int)`.

    Raises:
        FileNotFoundError: the batches are missing, corrupt or unreadable; the message names the
            path and how to get the files.
        ImportError: torchvision is not installed (fix: `pip install "randfeat[eval]"`).
    """
    root = _check_dir(path, "path")
    datasets = _require("torchvision.datasets")
    transform = _image_transform(image_size, crop=False)
    batches = root / "cifar-10-batches-py"
    hint = (
        f"Expected the CIFAR-10 python batches in {str(batches)!r} (download and extract "
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz there yourself; randfeat never "
        "downloads)."
    )
    try:
        # download=False: torchvision then checks the md5 of every batch file and raises
        # RuntimeError("Dataset not found or corrupted") when one is missing or altered.
        return datasets.CIFAR10(str(root), train=train, transform=transform, download=False)
    except RuntimeError as err:
        raise FileNotFoundError(f"CIFAR-10 not found or corrupted. {hint}") from err
    except (OSError, EOFError, ValueError, KeyError) as err:
        raise FileNotFoundError(
            f"CIFAR-10 batches could not be read ({type(err).__name__}: {err}). {hint}"
        ) from err


def materialize(
    dataset: Dataset[Any], indices: Tensor | Sequence[int] | None = None
) -> tuple[Tensor, Tensor]:
    """Read a subset of a dataset into memory as tensors.

    Args:
        dataset: a map-style dataset yielding `(x: [C, H, W], y: int)`.
        indices: which items to read (default: all), e.g. from `balanced_subset`.

    Returns:
        `(x, y)`: `x: [n, C, H, W]` stacked images and `y: [n]` int64 labels, in the order
        of `indices`.

    Raises:
        ValueError: `indices` is empty or not 1-D.
    """
    if indices is None:
        idx = list(range(len(dataset)))  # type: ignore[arg-type]
    else:
        t = torch.as_tensor(indices)
        if t.ndim != 1:
            raise ValueError(
                f"Expected argument `indices` to be 1-D, but got shape {tuple(t.shape)}."
            )
        idx = [int(i) for i in t.tolist()]
    if not idx:
        raise ValueError("Expected at least one index to materialize, but got none.")
    xs, ys = [], []
    for i in idx:  # I/O-bound loading, not a hot path
        x, label = dataset[i]
        xs.append(torch.as_tensor(x))
        ys.append(int(label))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)
