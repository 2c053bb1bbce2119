"""Tests for Fashion-MNIST: `randfeat.eval.data.loaders.fashion_mnist` and `--data fashion-mnist[:PATH]`.

The loader is tested on tiny IDX files written here (valid, gzipped and not, and each corruption);
the real files are tested where Debian's `dataset-fashion-mnist` put them (CI installs it).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from _fashion_files import REAL, idx_bytes, needs_real_files, write_fashion

from randfeat.eval.data import loaders as rf_data
from randfeat.eval.data.idx import IdxError
from randfeat.eval.data.loaders import FASHION_MNIST_ENV, Split, fashion_mnist
from randfeat.eval.data.registry import DATA_SETS, DataSpec
from randfeat.eval.errors import ConfigError


@pytest.mark.parametrize("gz", [False, True])
def test_reads_plain_and_gzipped_files(tmp_path: Path, gz: bool) -> None:
    arrays = write_fashion(tmp_path, gz=gz)
    split = fashion_mnist(tmp_path)
    assert isinstance(split, Split) and split.classes == 10
    assert split.x_train.shape == (20, 1, 28, 28) and split.x_test.shape == (10, 1, 28, 28)
    assert split.x_train.dtype == split.x_test.dtype == torch.float32
    assert split.y_train.dtype == split.y_test.dtype == torch.int64
    for part in ("train", "test"):
        x = getattr(split, f"x_{part}")
        # pixels are the bytes / 255, in the files' order; labels are the label bytes
        assert torch.equal(x[:, 0] * 255, torch.from_numpy(arrays[f"x_{part}"].astype(np.float32)))
        assert getattr(split, f"y_{part}").tolist() == arrays[f"y_{part}"].tolist()
        assert float(x.min()) >= 0 and float(x.max()) <= 1


def test_root_then_environment_then_debian(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fashion(tmp_path / "given", n_test=10)
    write_fashion(tmp_path / "env", n_test=20)
    write_fashion(tmp_path / "debian", n_test=30)
    monkeypatch.setattr(rf_data, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "env"))
    assert fashion_mnist(tmp_path / "given").x_test.shape[0] == 10
    assert fashion_mnist().x_test.shape[0] == 20
    monkeypatch.delenv(FASHION_MNIST_ENV)
    assert fashion_mnist().x_test.shape[0] == 30


def test_missing_directory_says_how_to_get_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as err:
        fashion_mnist()
    message = str(err.value)
    assert "nowhere" in message and f"${FASHION_MNIST_ENV}" in message
    assert "does not exist" in message
    assert (
        "apt-get install dataset-fashion-mnist" in message
        and "--data fashion-mnist:PATH" in message
    )
    monkeypatch.delenv(FASHION_MNIST_ENV)
    monkeypatch.setattr(rf_data, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "debian")
    with pytest.raises(FileNotFoundError, match=r"debian.*the default: Debian's package directory"):
        fashion_mnist()


def test_missing_file_is_named(tmp_path: Path) -> None:
    write_fashion(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks t10k-labels-idx1-ubyte\[\.gz\]\. Install"):
        fashion_mnist(tmp_path)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("magic", r"t10k-images-idx3-ubyte' has the magic number 0x00000801"),
        ("truncated", r"t10k-images-idx3-ubyte' is truncated"),
        ("size", r"t10k-images-idx3-ubyte' holds images of shape \(14, 56\), not 28×28"),
        ("label", r"t10k-labels-idx1-ubyte' holds the label 10, not 0\.\.9"),
    ],
)
def test_damaged_file_is_named_with_the_fix(tmp_path: Path, damage: str, expected: str) -> None:
    write_fashion(tmp_path)
    images, labels = tmp_path / "t10k-images-idx3-ubyte", tmp_path / "t10k-labels-idx1-ubyte"
    if damage == "magic":  # a label file where the images should be
        images.write_bytes(idx_bytes(np.zeros(10, dtype=np.uint8)))
    elif damage == "truncated":
        images.write_bytes(images.read_bytes()[:-100])
    elif damage == "size":
        images.write_bytes(idx_bytes(np.zeros((10, 14, 56), dtype=np.uint8)))
    else:
        labels.write_bytes(idx_bytes(np.full(10, 10, dtype=np.uint8)))
    with pytest.raises(IdxError, match=expected) as err:
        fashion_mnist(tmp_path)
    assert "Fashion-MNIST file" in str(err.value)
    assert "apt-get install --reinstall dataset-fashion-mnist" in str(err.value)


def test_truncated_gzip_is_named(tmp_path: Path) -> None:
    write_fashion(tmp_path, gz=True, n_train=200)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(IdxError, match=r"train-images-idx3-ubyte.gz' is not a complete gzip"):
        fashion_mnist(tmp_path)


def test_count_mismatch_names_both_files(tmp_path: Path) -> None:
    write_fashion(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(19, dtype=np.uint8)))
    with pytest.raises(
        ValueError,
        match=r"train files disagree: .*images-idx3-ubyte' holds 20 images, .*labels-idx1-ubyte' 19 labels",
    ):
        fashion_mnist(tmp_path)


def test_gz_and_plain_side_by_side_read_the_plain_file(tmp_path: Path) -> None:
    write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"garbage"))
    assert fashion_mnist(tmp_path).y_test.shape == (10,)


# ----------------------------------------------------------------------------- --data


def test_data_spec_optional_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert DataSpec.parse("fashion-mnist").path is None
    spec = DataSpec.parse(f"fashion-mnist:{tmp_path}")
    assert spec.dataset is DATA_SETS["fashion-mnist"] and spec.path == str(tmp_path)
    with pytest.raises(ConfigError, match="needs a local path"):
        DataSpec.parse("fashion-mnist:")
    with pytest.raises(ConfigError, match=r"Did you mean 'fashion-mnist'"):
        DataSpec.parse("fashion_mnist")
    with pytest.raises(ConfigError, match=r"--data fashion-mnist: .*lacks train-images"):
        spec.check_path()  # before any model is loaded
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "none"))
    with pytest.raises(ConfigError, match=r"RANDFEAT_FASHION_MNIST.*apt-get install"):
        DataSpec.parse("fashion-mnist").check_path()
    write_fashion(tmp_path)
    spec.check_path()
    pool = spec.load(None)
    assert pool.name == "fashion-mnist" and pool.x is not None
    assert pool.x.shape == (10, 1, 28, 28) and pool.labels.tolist() == list(range(10))[::-1]
    big = spec.load(32)
    assert big.x is not None and big.x.shape == (10, 1, 32, 32)
    assert float(big.x.min()) >= 0 and float(big.x.max()) <= 1


def test_data_spec_load_errors_are_config_errors(tmp_path: Path) -> None:
    write_fashion(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03")
    with pytest.raises(ConfigError, match=r"Cannot load --data 'fashion-mnist:.*truncated"):
        DataSpec.parse(f"fashion-mnist:{tmp_path}").load(None)


# ----------------------------------------------------------------------------- the real files


@needs_real_files
@pytest.mark.slow
def test_real_files() -> None:
    split = fashion_mnist(REAL)
    assert split.x_train.shape == (60000, 1, 28, 28) and split.x_test.shape == (10000, 1, 28, 28)
    # the official release: 6,000 training and 1,000 test images of each class
    assert split.y_train.bincount().tolist() == [6000] * 10
    assert split.y_test.bincount().tolist() == [1000] * 10
    # its published pixel statistics (mean 0.2860, std 0.3530 over the training images)
    assert abs(float(split.x_train.mean()) - 0.2860) < 5e-4
    assert abs(float(split.x_train.std()) - 0.3530) < 5e-4
