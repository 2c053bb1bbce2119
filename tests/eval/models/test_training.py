"""Tests for randfeat.eval.models.training (`randfeat train`): a small run, resuming, the checkpoint.

The runs train timm's resnet18 on tiny Fashion-MNIST files written by the tests (512 random
images), so they test the mechanics (checkpoint, resume, rebuild), not the accuracy; the accuracy
of the real recipe is measured in docs/results/fashion-mnist.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _fashion_files import write_fashion
from torch import nn

import randfeat.eval.models.training as training
from randfeat.cli import main
from randfeat.eval.errors import ConfigError
from randfeat.eval.grid.config import EvalConfig
from randfeat.eval.grid.plan import load_model
from randfeat.eval.models.checkpoint import TrainedCheckpoint
from randfeat.eval.models.timm_models import Preprocessed, build_trained, load_timm
from randfeat.eval.models.training import TrainConfig, augment, train


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fashion")
    write_fashion(root, gz=True, n_train=512, n_test=50)
    return root


def _config(fashion_dir: Path, out: Path, **changes: object) -> TrainConfig:
    values: dict[str, object] = {
        "data": f"fashion-mnist:{fashion_dir}",
        "epochs": 1,
        "out": str(out),
        "batch_size": 128,
        "quiet": True,
        **changes,
    }
    return TrainConfig(**values)  # type: ignore[arg-type]


def test_one_epoch_on_512_images(fashion_dir: Path, tmp_path: Path) -> None:
    rng = torch.get_rng_state()
    ckpt = train(_config(fashion_dir, tmp_path / "r18.pt"))
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    assert ckpt.epoch == ckpt.epochs == 1 and ckpt.done
    assert (ckpt.model, ckpt.in_chans, ckpt.num_classes, ckpt.stem) == (
        "resnet18",
        1,
        10,
        "3x3s2-maxpool",
    )
    assert ckpt.image_size == 28 and len(ckpt.history) == 1
    assert set(ckpt.history[0]) == {"epoch", "loss", "train_accuracy", "test_accuracy", "seconds"}
    # the preprocessing is the training images' own statistics
    x = torch.cat([t for t in _train_images(fashion_dir)])
    assert ckpt.mean == pytest.approx([float(x.mean())], abs=1e-6)
    assert ckpt.std == pytest.approx([float(x.std())], abs=1e-6)
    # the file holds the same checkpoint, and nothing else was left in the directory
    again = TrainedCheckpoint.read(tmp_path / "r18.pt")
    assert again.recipe == ckpt.recipe and again.history == ckpt.history
    assert [p.name for p in tmp_path.iterdir()] == ["r18.pt"]
    # the model it describes: a 3×3 stride-2 first convolution on one channel, ten outputs
    model = build_trained(again)
    assert isinstance(model, Preprocessed) and not model.training
    conv = model.model.conv1
    assert isinstance(conv, nn.Conv2d)
    assert (conv.in_channels, conv.kernel_size, conv.stride) == (1, (3, 3), (2, 2))
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def _train_images(root: Path) -> list[torch.Tensor]:
    from randfeat.eval.data.loaders import fashion_mnist

    return [fashion_mnist(root).x_train]


def test_eval_rebuilds_exactly_the_trained_model(fashion_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r18.pt"
    ckpt = train(_config(fashion_dir, out, epochs=1, train_images=256))
    trained = build_trained(ckpt)
    cfg = EvalConfig.from_mapping(
        {"model": "resnet18", "checkpoint": str(out), "data": f"fashion-mnist:{fashion_dir}"}
    )
    loaded = load_model(cfg)  # what `randfeat eval --model resnet18 --checkpoint` loads
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
    assert loaded.state_dict().keys() == trained.state_dict().keys()
    with pytest.raises(ValueError, match=r"holds a trained 'resnet18', not 'resnet34'"):
        load_timm("resnet34", checkpoint=out)
    with pytest.raises(ValueError, match=r"has 10 outputs, not the 7 asked for"):
        load_timm("resnet18", checkpoint=out, num_classes=7)


def test_resume_after_interruption_gives_the_uninterrupted_weights(
    fashion_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kwargs = {"epochs": 2, "train_images": 256, "test_images": 20}
    whole = train(_config(fashion_dir, tmp_path / "whole.pt", **kwargs))
    # Interrupt the second epoch (2 steps of 128 per epoch: the 4th augmentation call).
    calls = {"n": 0}

    def interrupted(*args: object, **kw: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return augment(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(training, "augment", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_config(fashion_dir, tmp_path / "cut.pt", **kwargs))
    monkeypatch.undo()
    half = TrainedCheckpoint.read(tmp_path / "cut.pt")
    assert half.epoch == 1 and not half.done
    assert half.history[0]["loss"] == whole.history[0]["loss"]
    resumed = train(_config(fashion_dir, tmp_path / "cut.pt", **kwargs))
    assert resumed.epoch == 2 and [h["epoch"] for h in resumed.history] == [1, 2]
    for key, value in whole.state_dict.items():
        assert torch.equal(resumed.state_dict[key], value), key
    assert resumed.history[1]["loss"] == whole.history[1]["loss"]
    # a finished checkpoint is not trained again
    assert train(_config(fashion_dir, tmp_path / "cut.pt", **kwargs)).history == resumed.history


def test_refuses_another_training_in_the_same_file(fashion_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r18.pt"
    train(_config(fashion_dir, out, train_images=128, test_images=10))
    with pytest.raises(
        ConfigError, match=r"epochs: file has 1, this run has 2.*choose another --out"
    ):
        train(_config(fashion_dir, out, epochs=2, train_images=128, test_images=10))
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        train(_config(fashion_dir, tmp_path / "other.pt"))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ConfigError, match="is not a checkpoint of `randfeat train`"):
        train(_config(fashion_dir, tmp_path / "plain.pt"))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"stem": "5x5"}, r"Unknown stem '5x5'\. Valid stems: timm, 3x3s1"),
        ({"data": "digits"}, r"--data digits has no training split.*fashion-mnist\[:PATH\]"),
        ({"epochs": 0}, r"`epochs` to be an int >= 1, but got 0"),
        ({"lr": -0.1}, r"`lr` to be > 0, but got -0\.1"),
        ({"label_smoothing": 1.0}, r"`label_smoothing` to be in \[0, 1\)"),
        ({"train_images": 600}, r"--train-images 600 exceeds the 512 images"),
        ({"out": "/nonexistent-dir/x.pt"}, r"the directory '/nonexistent-dir' does not exist"),
    ],
)
def test_bad_settings_fail_before_any_work(
    fashion_dir: Path, tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    out = Path(str(changes.pop("out", tmp_path / "x.pt")))
    with pytest.raises(ConfigError, match=message):
        train(_config(fashion_dir, out, **changes))
    assert not out.exists()


def test_augment_crops_a_window_of_the_padded_image_and_flips() -> None:
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5) + 1
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    g = torch.Generator().manual_seed(0)
    seen_flip = seen_shift = False
    for _ in range(20):
        out = augment(x, 2, True, g)
        assert out.shape == x.shape
        for i in range(2):
            windows = [padded[i, :, r : r + 5, c : c + 5] for r in range(5) for c in range(5)]
            match = [
                w for w in windows if torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1))
            ]
            assert match, "every output is a (flipped) 5×5 window of the padded image"
            seen_shift |= not torch.equal(match[0], x[i])
            seen_flip |= not any(torch.equal(out[i], w) for w in windows)
    assert seen_shift and seen_flip
    assert torch.equal(augment(x, 0, False, g), x)


def test_cli_train_prints_how_to_evaluate(
    fashion_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c.pt"
    code = main(
        [
            "train",
            "--data",
            f"fashion-mnist:{fashion_dir}",
            "--epochs",
            "1",
            "--train-images",
            "128",
            "--test-images",
            "10",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0 and out.is_file()
    printed = capsys.readouterr().out
    assert f"randfeat eval --model resnet18 --checkpoint {out} --data fashion-mnist:" in printed
    assert main(["train", "--out", str(out), "--stem", "nope"]) == 2


def test_serve_builds_the_trained_model_on_fashion_mnist(fashion_dir: Path, tmp_path: Path) -> None:
    from randfeat.cli.served_model import ModelSpec, build

    out = tmp_path / "r18.pt"
    trained = build_trained(train(_config(fashion_dir, out, train_images=128, test_images=10)))
    spec = ModelSpec(
        model="resnet18", checkpoint=str(out), data=f"fashion-mnist:{fashion_dir}", nu=0.0
    )
    model, card = build(
        spec
    )  # `randfeat serve --model resnet18 --checkpoint ... --data fashion-mnist:...`
    assert card.input_shape == (1, 28, 28) and card.classes == 10
    assert card.layers == ("model.fc.pre",)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))  # ν = 0: the wrapper is the identity
