"""Tests for the `randfeat` command line (`randfeat.cli`): parsing, settings, errors, exit codes.

Runs go through `randfeat.cli.main` in-process (a subprocess costs seconds of imports; the
`python -m randfeat` and `torchrun` paths are exercised in `tests/eval/grid/test_runner.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from randfeat.cli import COMMANDS, build_parser, main
from randfeat.cli.eval import settings
from randfeat.eval.grid.config import EvalConfig
from randfeat.eval.grid.presets import PRESETS
from randfeat.eval.results.file import read_results

TINY = ["--n-images", "10", "--batch-size", "10", "--defenses", "base", "--attacks", "square-linf",
        "--budgets", "5", "--votes", "1"]  # fmt: skip


@pytest.fixture
def digits_env(
    digits_model: nn.Module, digits_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Use the session's trained digits CNN, one thread (the machine is shared)."""
    del digits_model
    monkeypatch.setenv("RANDFEAT_CACHE", str(digits_cache_dir))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fails(capsys: Any, *argv: str) -> str:
    """Run ``randfeat *argv``, expect exit code 2 without a traceback; return stderr."""
    assert main(list(argv)) == 2
    err: str = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------ subcommands
def test_help_and_missing_command(capsys: Any) -> None:
    assert main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert [c.name for c in COMMANDS] == ["eval", "report", "serve", "demo", "train"]
    for command in COMMANDS:
        assert command.name in out and command.help in out
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--target-drop", "--calib-images", "--fresh-forwards", "--preset", "--config"):
        assert flag in out
    assert "usage: randfeat" in fails(capsys)


def test_argparse_errors_exit_2(capsys: Any) -> None:
    assert "invalid int value" in fails(capsys, "eval", "--votes", "many")
    assert "invalid choice" in fails(capsys, "eval", "--preset", "paper-mnist")


# ------------------------------------------------------------ unknown names
@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--model", "resnt18"], ["Unknown model 'resnt18'", "'resnet18'", "digits-cnn"]),
        (
            ["--attacks", "square-linf,sqare-l2"],
            ["Unknown attack 'sqare-l2'", "'square-l2'", "Valid attacks: square-linf, square-l2"],
        ),
        (
            ["--data", "mnist"],
            ["Unknown data set 'mnist'", "'digits', 'cifar10:PATH', 'imagenet:PATH'"],
        ),
        (["--defenses", "base,randfeat"], ["Unknown defense 'randfeat'", "base, input, feature"]),
    ],
)
def test_unknown_names_list_the_valid_ones(
    capsys: Any, tmp_path: Path, argv: list[str], fragments: list[str]
) -> None:
    err = fails(capsys, "eval", *argv, "--out", str(tmp_path / "r.jsonl"))
    assert err.startswith("randfeat eval: error: ")
    for f in fragments:
        assert f in err
    assert not (tmp_path / "r.jsonl").exists()  # refused before touching the output


def test_unknown_layer_is_named(capsys: Any, tmp_path: Path, digits_env: None) -> None:
    err = fails(
        capsys, "eval", *TINY, "--defenses", "feature", "--layers", "fc9",
        "--out", str(tmp_path / "r.jsonl"),
    )  # fmt: skip
    assert "Bad --layers 'fc9'" in err and "fc1" in err


# ------------------------------------------------------------ paths
def test_missing_data_path(capsys: Any, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "imagenet"
    out = tmp_path / "r.jsonl"
    err = fails(
        capsys, "eval", "--model", "resnet18", "--data", f"imagenet:{missing}", "--out", str(out)
    )
    assert "does not exist or is not a directory" in err and str(missing) in err
    assert not out.exists()  # a failed start leaves no empty result file behind


def test_data_path_that_is_a_file(capsys: Any, tmp_path: Path) -> None:
    f = tmp_path / "cifar.tar.gz"
    f.write_bytes(b"not a directory")
    err = fails(
        capsys, "eval", "--model", "resnet18", "--data", f"cifar10:{f}",
        "--out", str(tmp_path / "r.jsonl"),
    )  # fmt: skip
    assert "is not a directory" in err


def test_data_directory_without_cifar_batches(capsys: Any, tmp_path: Path) -> None:
    err = fails(
        capsys, "eval", "--model", "resnet18", "--data", f"cifar10:{tmp_path}",
        "--out", str(tmp_path / "r.jsonl"),
    )  # fmt: skip
    assert "Cannot load --data" in err and "cifar-10-batches-py" in err


def test_unreadable_image_in_a_folder(capsys: Any, tmp_path: Path) -> None:
    for c in ("a", "b"):
        (tmp_path / "folder" / c).mkdir(parents=True)
        (tmp_path / "folder" / c / "0.png").write_bytes(b"this is no png")
    err = fails(
        capsys, "eval", "--model", "resnet18", "--data", f"imagenet:{tmp_path / 'folder'}",
        "--image-size", "32", "--n-images", "2", "--defenses", "base",
        "--out", str(tmp_path / "r.jsonl"),
    )  # fmt: skip
    assert "Could not read images" in err


def test_output_directory_that_cannot_be_created(capsys: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a regular file, so no directory can be made under it")
    err = fails(capsys, "eval", *TINY, "--out", str(blocker / "out.jsonl"))
    assert "Cannot create the output directory" in err and str(blocker) in err


def test_output_that_is_a_directory(capsys: Any, tmp_path: Path) -> None:
    assert "Cannot write --out" in fails(capsys, "eval", *TINY, "--out", str(tmp_path))


# ------------------------------------------------------------ values the run rejects
def test_unbalanced_image_count(capsys: Any, tmp_path: Path, digits_env: None) -> None:
    err = fails(capsys, "eval", *TINY, "--n-images", "15", "--out", str(tmp_path / "r.jsonl"))
    assert "multiple of the number of classes (10)" in err


def test_unreachable_target_drop(capsys: Any, tmp_path: Path, digits_env: None) -> None:
    err = fails(
        capsys, "eval", *TINY, "--defenses", "feature", "--target-drop", "0.999",
        "--calib-images", "50", "--out", str(tmp_path / "r.jsonl"),
    )  # fmt: skip
    assert "Calibration of feature failed" in err and "target_drop" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(capsys: Any, tmp_path: Path) -> None:
    err = fails(capsys, "eval", *TINY, "--device", "cuda", "--out", str(tmp_path / "r.jsonl"))
    assert "CUDA is not available" in err


# ------------------------------------------------------------ settings: file, preset, flags
def test_config_file_and_flags(capsys: Any, tmp_path: Path, digits_env: None) -> None:
    toml = tmp_path / "grid.toml"
    toml.write_text(
        'n-images = 10\nbatch_size = 10\ndefenses = ["base"]\nattacks = "square-linf"\n'
        "budgets = [5, 6]\nvotes = 3\nseed = 7\nquiet = true\n"
    )
    out = tmp_path / "r.jsonl"
    log = logging.getLogger("randfeat")
    before = (list(log.handlers), log.level, log.propagate)
    assert main(["eval", "--config", str(toml), "--votes", "1", "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""  # quiet = true: no log lines, no bars
    assert (list(log.handlers), log.level, log.propagate) == before  # logging restored
    res = read_results(out)
    cfg = res.header.config
    assert (cfg["n_images"], cfg["budgets"], cfg["seed"]) == (10, [5, 6], 7)
    assert cfg["votes"] == 1  # the flag wins over the file
    assert len(res.rows) == 10 * (1 + 2)


def test_config_file_errors(capsys: Any, tmp_path: Path) -> None:
    bad_key = tmp_path / "a.toml"
    bad_key.write_text("budget = [5]\n")
    assert "Did you mean 'budgets'" in fails(capsys, "eval", "--config", str(bad_key))
    bad_toml = tmp_path / "b.toml"
    bad_toml.write_text("budgets = [5\n")
    assert "is not valid TOML" in fails(capsys, "eval", "--config", str(bad_toml))
    assert "Cannot read --config" in fails(capsys, "eval", "--config", str(tmp_path / "c.toml"))


def test_presets_need_a_model_and_their_data(capsys: Any, tmp_path: Path) -> None:
    err = fails(capsys, "eval", "--preset", "paper-imagenet", "--data", f"imagenet:{tmp_path}")
    assert "choose one with --model" in err
    for m in PRESETS["paper-imagenet"].models:
        assert m in err
    err = fails(capsys, "eval", "--preset", "paper-imagenet", "--model", "vgg19")
    assert "needs --data imagenet:PATH" in err
    err = fails(capsys, "eval", "--preset", "paper-cifar10", "--model", "vgg19", "--data", "digits")
    assert "needs --data cifar10:PATH" in err


def test_preset_settings_and_priorities(tmp_path: Path) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text('preset = "paper-imagenet"\nvotes = 5\nbudgets = "100"\n')
    args = build_parser().parse_args(
        ["eval", "--config", str(toml), "--model", "resnet50", "--data", "imagenet:/x",
         "--budgets", "200"]
    )  # fmt: skip
    s = settings(args)
    assert s["preset"] == "paper-imagenet"
    assert (s["n_images"], s["eps"], s["eps_l2"], s["target_drop"]) == (
        1000,
        0.05,
        5.0,
        "0.01,0.02",
    )
    assert s["defenses"] == "base,input,feature,aaa"
    assert s["attacks"] == "square-linf,nes-linf,signhunter-linf,rays,signflip"
    assert s["votes"] == 5  # the file over the preset
    assert s["budgets"] == "200"  # the flag over the file
    assert "config" not in s
    c = settings(
        build_parser().parse_args(
            ["eval", "--preset", "paper-cifar10", "--model", "vgg19", "--data", "cifar10:/c"]
        )
    )
    assert (c["image_size"], c["num_classes"], c["target_drop"]) == (224, 10, "0.02,0.04")


def test_paper_fashion_preset(capsys: Any) -> None:
    s = settings(
        build_parser().parse_args(
            [
                "eval",
                "--preset",
                "paper-fashion",
                "--model",
                "fashion-cnn",
                "--data",
                "fashion-mnist",
            ]
        )
    )
    assert (s["n_images"], s["eps"], s["eps_l2"], s["votes"]) == (1000, 0.1, 1.5, 9)
    assert (s["budgets"], s["defenses"], s["target_drop"]) == (
        "1000,10000",
        "base,input,feature",
        "0.01,0.02,0.04",
    )
    assert s["attacks"] == "square-linf,nes-linf,signhunter-linf,rays,signflip,eot-square-linf"
    cfg = EvalConfig.from_mapping(s)
    assert cfg.defense_names() == [
        "base",
        "input@0.01",
        "input@0.02",
        "input@0.04",
        "feature@0.01",
        "feature@0.02",
        "feature@0.04",
    ]
    err = fails(
        capsys, "eval", "--preset", "paper-fashion", "--model", "fashion-cnn", "--data", "digits"
    )
    assert "needs --data fashion-mnist[:PATH]" in err
