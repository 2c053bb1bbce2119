"""Evaluation data: embedded digits, Fashion-MNIST, local CIFAR-10 / ImageFolder, balanced subsets.

The paper (Nguyen Minh et al., "Randomized feature defense", §5 and appendix D) evaluates on "1000
images that contain every class from the studied dataset", each class of equal size:
`balanced_subset` draws such a subset with a seeded generator, optionally disjoint from other
indices (the calibration images must not be the attacked ones).

`digits` is the offline default: scikit-learn's bundled 8×8 handwritten digits (1,797 real
images, shipped inside the scikit-learn wheel, so nothing is downloaded), split once into a fixed,
class-stratified train/test split. `fashion_mnist` reads Fashion-MNIST's four IDX files from a
local directory (e.g. Debian's `dataset-fashion-mnist`); both return a
[Split][randfeat.eval.data.loaders.Split]. All loaders read local files only and never download; they
return images in `[0, 1]` without normalisation (the models fold their own normalisation in).

scikit-learn and torchvision are optional (the `eval` extra) and imported lazily.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from randfeat.checks import check_int, check_positive_int
from randfeat.eval.data import idx

if TYPE_CHECKING:
    from torch.utils.data import Dataset

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEBIAN_DIR",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_FILES",
    "Digits",
    "Split",
    "balanced_subset",
    "digits",
    "fashion_mnist",
    "fashion_mnist_root",
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
            f"randfeat.eval.data.loaders needs the optional dependency `{module.split('.')[0]}`, "
            f"which is not installed. {_EVAL_EXTRA_HINT}"
        ) from err


@dataclass(frozen=True)
class Split:
    """A data set in memory, split into train and test.

    Attributes:
        x_train: `[N_train, C, H, W]` float32 in `[0, 1]` (digits: 1,257 images of
            `[1, 8, 8]`; Fashion-MNIST: 60,000 of `[1, 28, 28]`).
        y_train: `[N_train]` int64 labels in `0..K-1`.
        x_test: `[N_test, C, H, W]` float32 in `[0, 1]` (digits: 540; Fashion-MNIST: 10,000).
        y_test: `[N_test]` int64 labels in `0..K-1`.
        classes: number of classes `K`.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: int = 10


Digits = Split
"""The split type of `digits` (an alias of [Split][randfeat.eval.data.loaders.Split])."""


def digits() -> Split:
    """Load scikit-learn's bundled 8×8 digits with a fixed, class-stratified 70/30 split.

    Pixel values `0..16` are divided by 16 to lie in `[0, 1]`. The split is
    `train_test_split(test_size=0.3, stratify=y, random_state=0)`, so every call returns equal
    tensors (fresh copies: mutating them does not affect later calls).

    Returns:
        The split: `x_*: [N, 1, 8, 8]` float32 in `[0, 1]`, `y_*: [N]` int64.

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
    return Split(
        x_train=torch.from_numpy(np.ascontiguousarray(x_tr)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_te)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_te)),
        classes=10,
    )


FASHION_MNIST_ENV = "RANDFEAT_FASHION_MNIST"
"""Environment variable naming the directory of the Fashion-MNIST files (when `root` is None)."""
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's `dataset-fashion-mnist` package installs the files: the last default."""
FASHION_MNIST_FILES = MappingProxyType({
    "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
})  # fmt: skip
"""The four files of the official release by the `Split` field they fill (plain or `.gz`)."""
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
    "Ankle boot",
)  # fmt: skip
"""The class names of labels `0..9`."""
_FASHION_FIX = (
    "Install Debian's package (apt-get install dataset-fashion-mnist), set "
    f"${FASHION_MNIST_ENV} to a directory holding the four files, or pass that directory "
    "(--data fashion-mnist:PATH); the files are those of the official release "
    "(https://github.com/zalandoresearch/fashion-mnist), gzipped or not."
)
_FASHION_REPAIR = (
    "Reinstall the package (apt-get install --reinstall dataset-fashion-mnist) or fetch the "
    "file again from the official release (https://github.com/zalandoresearch/fashion-mnist)."
)


def fashion_mnist_root(root: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """The four Fashion-MNIST files in `root`, else `$RANDFEAT_FASHION_MNIST`, else Debian's dir.

    Checks only that they exist (cheap: it fails fast before a model is loaded); the plain file
    is preferred to the `.gz` one. Returns their paths by `Split` field (`x_train`, ...).

    Raises:
        FileNotFoundError: the directory or a file is missing; the message names them, where the
            directory came from, and how to get the files.
    """
    if root is not None:
        where, base = "the given directory", Path(root).expanduser()
    elif os.environ.get(FASHION_MNIST_ENV):
        where, base = f"${FASHION_MNIST_ENV}", Path(os.environ[FASHION_MNIST_ENV]).expanduser()
    else:
        where, base = "the default: Debian's package directory", FASHION_MNIST_DEBIAN_DIR
    found = {f: idx.find_idx(base, stem) for f, stem in FASHION_MNIST_FILES.items()}
    missing = [FASHION_MNIST_FILES[f] + "[.gz]" for f, path in found.items() if path is None]
    if missing:
        what = "lacks " + ", ".join(missing) if base.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"Fashion-MNIST directory {str(base)!r} ({where}) {what}. {_FASHION_FIX}"
        )
    return {f: path for f, path in found.items() if path is not None}


def _fashion_part(path: Path, ndim: int) -> np.ndarray:
    """One file, checked: IDX header and length, 28×28 images, labels `0..9`."""
    try:
        array = idx.read_idx(path, ndim)
        if ndim == 3 and array.shape[1:] != (28, 28):
            raise idx.IdxError(f"{str(path)!r} holds images of shape {array.shape[1:]}, not 28×28")
        if ndim == 1 and array.size and int(array.max()) >= len(FASHION_MNIST_CLASSES):
            raise idx.IdxError(f"{str(path)!r} holds the label {int(array.max())}, not 0..9")
    except idx.IdxError as err:
        raise idx.IdxError(f"Fashion-MNIST file {err}. {_FASHION_REPAIR}") from err
    return array


def fashion_mnist(root: str | os.PathLike[str] | None = None) -> Split:
    """Load Fashion-MNIST from its local IDX files (never downloads), with the official split.

    The four files of the official release (Xiao, Rasul and Vollgraf, "Fashion-MNIST: a Novel
    Image Dataset for Benchmarking Machine Learning Algorithms", 2017), plain or gzipped, are read
    from `root`, else `$RANDFEAT_FASHION_MNIST`, else `/usr/share/datasets/fashion-mnist`
    (Debian's `dataset-fashion-mnist`). Pixels `0..255` are divided by 255.

    Args:
        root: the directory holding the files (see `fashion_mnist_root`).

    Returns:
        The [Split][randfeat.eval.data.loaders.Split]: `x_train: [60000, 1, 28, 28]` and
        `x_test: [10000, 1, 28, 28]` float32 in `[0, 1]`, int64 labels, 10 classes
        (`FASHION_MNIST_CLASSES`).

    Raises:
        FileNotFoundError: the directory or a file is missing (the message says how to get them).
        ValueError: a damaged file (an [IdxError][randfeat.eval.data.idx.IdxError]: wrong magic
            number, truncated, bad gzip, not 28×28, a label outside `0..9`), or an image file and
            its label file of different counts; the message names the file(s) and the fix.
    """
    paths = fashion_mnist_root(root)
    out: dict[str, Tensor] = {}
    for part in ("train", "test"):
        images = _fashion_part(paths[f"x_{part}"], 3)
        labels = _fashion_part(paths[f"y_{part}"], 1)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"Fashion-MNIST {part} files disagree: {str(paths[f'x_{part}'])!r} holds "
                f"{images.shape[0]} images, {str(paths[f'y_{part}'])!r} {labels.shape[0]} "
                f"labels. {_FASHION_REPAIR}"
            )
        out[f"x_{part}"] = torch.from_numpy(images.astype(np.float32) / 255).unsqueeze(1)
        out[f"y_{part}"] = torch.from_numpy(labels.astype(np.int64))
    return Split(classes=len(FASHION_MNIST_CLASSES), **out)


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
