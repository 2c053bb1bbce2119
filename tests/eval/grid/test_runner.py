"""Tests for the evaluation grid (`randfeat.eval.grid`) through `randfeat eval`.

One small grid (20 digits, chunks of 4, budgets 20/50, votes 3) is run once in-process as the
reference; the resume-after-SIGKILL, torchrun and repair tests must reproduce its rows exactly
(timing fields aside). Every run uses one thread: on a shared 2-core machine two threads per process
are several times slower, and the results do not depend on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import randfeat
from randfeat.cli import main
from randfeat.eval.data.loaders import digits
from randfeat.eval.errors import ConfigError
from randfeat.eval.grid.config import EvalConfig, derive_seed
from randfeat.eval.grid.units import UnitRunner, build_attacks
from randfeat.eval.results.file import (
    FORMAT_VERSION,
    NON_RESULT_SETTINGS,
    TIMING_FIELDS,
    ResultWriter,
    complete_units,
    config_differences,
    read_results,
)
from randfeat.eval.results.records import AttackRow, CleanRow, Unit

# The shared grid: 3 defenses x (1 clean + 2 attacks x 2 budgets) x 5 chunks = 75 units, 300 rows.
ARGS = [
    "--n-images", "20",
    "--batch-size", "4",
    "--defenses", "base,input,feature",
    "--target-drop", "0.05",
    "--attacks", "square-linf,rays",
    "--budgets", "20,50",
    "--votes", "3",
    "--calib-images", "100",
    "--calib-draws", "4",
    "--fresh-forwards", "10",
    "--seed", "0",
    "--quiet",
]  # fmt: skip
N_ROWS = 20 * 3 * (1 + 2 * 2)


# ------------------------------------------------------------ helpers
def load_results(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and rows of a result file as the JSON objects the file holds (typed reader)."""
    res = read_results(path)
    return res.header.to_json(), [r.to_json() for r in res.rows]


def rows_of(path: Path) -> list[str]:
    """The rows of a result file (header excluded) as canonical JSON without timing fields."""
    _, rows = load_results(path)
    return sorted(
        json.dumps({k: v for k, v in r.items() if k not in TIMING_FIELDS}, sort_keys=True)
        for r in rows
    )


def line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def cache_env(digits_model: nn.Module, digits_cache_dir: Path) -> Iterator[dict[str, str]]:
    """The trained digits CNN's cache for in-process runs and the env for subprocesses."""
    del digits_model  # trained into digits_cache_dir by the fixture
    old = os.environ.get("RANDFEAT_CACHE")
    os.environ["RANDFEAT_CACHE"] = str(digits_cache_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANDFEAT_CACHE": str(digits_cache_dir)}
    yield env
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("RANDFEAT_CACHE", None)
    else:
        os.environ["RANDFEAT_CACHE"] = old


@pytest.fixture(scope="module")
def reference(cache_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared grid, uninterrupted, in one process."""
    out = tmp_path_factory.mktemp("reference") / "ref.jsonl"
    assert main(["eval", *ARGS, "--out", str(out)]) == 0
    return out


def run_cli(*args: str) -> int:
    return main(["eval", *args])


# ------------------------------------------------------------ the result file
@pytest.mark.slow
def test_reference_file_is_complete_and_consistent(reference: Path) -> None:
    header, rows = load_results(reference)
    cfg = header["config"]
    assert header["format_version"] == FORMAT_VERSION
    assert header["rows_expected"] == N_ROWS == len(rows)
    assert set(header["versions"]) >= {"randfeat", "torch", "timm"}
    assert header["eps"] == {"linf": 0.2, "l2": 1.5, "source": "digits default"}
    assert cfg["budgets"] == [20, 50] and cfg["votes"] == 3 and cfg["target_drop"] == [0.05]
    # attacked and calibration images: disjoint, counted, class-balanced attacked set
    attacked, cal = header["attacked_indices"], header["calibration_indices"]
    assert len(attacked) == header["n_attacked"] == 20
    assert len(cal) == header["n_calibration"] == 100
    assert not set(attacked) & set(cal)
    labels = {r["image"]: r["label"] for r in rows}
    assert sorted(torch.bincount(torch.tensor([labels[i] for i in attacked])).tolist()) == [2] * 10
    # calibration: one entry per randomized defense, drop near the target (resolution 1/400)
    assert header["defenses"] == ["base", "input@0.05", "feature@0.05"]
    for name, kind in (("input@0.05", "input"), ("feature@0.05", "feature")):
        c = header["calibration"][name]
        assert c["kind"] == kind and c["nu"] > 0 and c["n_images"] == 100
        assert abs(c["drop"] - 0.05) <= 0.0125  # 5 draws of 400 (100 images x 4 draws)
        assert c["drop"] == pytest.approx(c["base_accuracy"] - c["accuracy"])
    assert header["calibration"]["input@0.05"]["layers"] == ["input"]
    assert header["calibration"]["feature@0.05"]["layers"] == ["head.pre"]
    # every (image, defense, attack, budget) exactly once, with the record's fields
    keys = [(r["image"], r["defense"], r.get("attack"), r.get("budget")) for r in rows]
    assert len(set(keys)) == len(keys)
    fields = {"clean": CleanRow, "attack": AttackRow}
    for r in rows:
        # every field, except one added later that holds its default (`detection` without --detect)
        required = [f for f in dataclasses.fields(fields[r["type"]]) if f.name != "detection"]
        assert set(r) == {"type", *(f.name for f in required)}
        assert r["chunk"] == attacked.index(r["image"]) // 4
    attack_rows = [r for r in rows if r["type"] == "attack"]
    assert len(attack_rows) == 20 * 3 * 2 * 2
    for r in attack_rows:
        assert 1 <= r["queries"] <= r["budget"]
        assert (r["success_query"] == -1) != r["success"]
        assert r["success_query"] <= r["queries"]
        assert 0.0 <= r["fresh"] <= 1.0
        assert r["dist"] <= r["eps"] + 1e-6
        assert (r["norm"], r["eps"]) == ("linf", 0.2)
        if r["defense"] == "base":  # deterministic: fresh is 0 or 1, and 1 at a verified success
            assert r["fresh"] in (0.0, 1.0)
            assert r["fresh"] == 1.0 or not r["success"]
            assert r["verify_forwards"] == 3 * int(r["success"])  # first candidate is verified


@pytest.mark.slow
def test_clean_rows_are_judged_by_the_rule(reference: Path, digits_model: nn.Module) -> None:
    """A clean row counts the wrong votes of the defense at the clean image, from the noise
    stream the runner seeds for the unit; correct means not fooled by the judging rule."""
    header, rows = load_results(reference)
    res = read_results(reference)
    x_all = digits().x_test
    y_all = digits().y_test
    clean = {(r["defense"], r["image"]): r for r in rows if r["type"] == "clean"}
    attacked = header["attacked_indices"]
    with torch.no_grad():
        base = digits_model(x_all[attacked]).argmax(1)
    wrong = (base != y_all[attacked]).long().tolist()
    assert [clean["base", i]["wrong_votes"] for i in attacked] == wrong  # deterministic: 1 vote
    assert {clean["base", i]["votes"] for i in attacked} == {1}
    # feature@0.05: the stream of chunk 0, 3 noisy forwards per image (the reference's --votes)
    cal = header["calibration"]["feature@0.05"]
    w = randfeat.wrap(digits_model, layers=cal["layers"], nu=cal["nu"], seed=0)
    w.manual_seed(derive_seed(0, "noise", "clean", "feature@0.05", None, None, 0))
    with torch.no_grad():
        votes = w(x_all[attacked[:4]].repeat_interleave(3, dim=0)).argmax(1).view(4, 3)
    w.unwrap()
    counted = (votes != y_all[attacked[:4]].view(4, 1)).sum(1).tolist()
    assert [clean["feature@0.05", i]["wrong_votes"] for i in attacked[:4]] == counted
    assert {clean["feature@0.05", i]["votes"] for i in attacked} == {3}
    for r in res.clean:
        assert r.correct == (2 * r.wrong_votes <= r.votes)


def test_end_to_end_cli_small_grid(cache_env: dict[str, str], tmp_path: Path, capsys: Any) -> None:
    """AAA, an EOT attack, an ℓ2 attack and several target drops, through `randfeat eval`."""
    out = tmp_path / "sub" / "e2e.jsonl"
    rc = run_cli(
        "--n-images", "10", "--batch-size", "5", "--defenses", "base,feature,aaa",
        "--target-drop", "0.02,0.05", "--attacks", "square-l2,eot-square-linf",
        "--budgets", "10", "--votes", "3", "--calib-images", "60", "--calib-draws", "8",
        "--eot-m", "2", "--eps", "0.1", "--out", str(out),
    )  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    assert "ε: ℓ∞ 0.1, ℓ2 1.5 (digits default (partly user)" in err
    header, rows = load_results(out)
    assert header["defenses"] == ["base", "feature@0.02", "feature@0.05", "aaa"]
    nu = [header["calibration"][f"feature@{t}"]["nu"] for t in ("0.02", "0.05")]
    assert 0 < nu[0] < nu[1]  # a larger drop needs more noise
    assert header["attacks"]["square-l2"]["norm"] == "l2"
    assert header["attacks"]["square-l2"]["eps"] == 1.5
    assert header["attacks"]["eot-square-linf"]["eps"] == 0.1
    assert len(rows) == header["rows_expected"] == 10 * 4 * (1 + 2)
    eot = [r for r in rows if r.get("attack") == "eot-square-linf"]
    assert all(r["queries"] % 2 == 0 for r in eot if not r["success"])  # 2 forwards a query
    aaa = [r for r in rows if r["defense"] == "aaa" and r["type"] == "attack"]
    assert all(r["fresh"] in (0.0, 1.0) for r in aaa)  # AAA is deterministic


# ------------------------------------------------------------ resume, repair, refuse
def test_resume_after_sigkill_equals_an_uninterrupted_run(
    reference: Path, cache_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "killed.jsonl"
    cmd = [sys.executable, "-m", "randfeat", "eval", *ARGS, "--out", str(out)]
    rng = random.Random(20240501)
    targets = sorted(rng.sample(range(2, N_ROWS), 3))  # kill once the file has this many lines
    kills = 0
    for target in targets:
        proc = subprocess.Popen(
            cmd, env=cache_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        while proc.poll() is None and line_count(out) < target:
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        _, err = proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL), err.decode()
    assert kills >= 2  # the runs were really interrupted
    done = subprocess.run(cmd, env=cache_env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    got = rows_of(out)
    assert len(got) == len(set(got)) == N_ROWS
    assert got == rows_of(reference)


def test_torchrun_two_ranks_equals_one_process(
    reference: Path, cache_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "dist.jsonl"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "randfeat", "eval", *ARGS, "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=cache_env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    header, _ = load_results(out)
    assert header["world_size"] == 2
    ref_header, _ = load_results(reference)
    assert (
        header["calibration"]["feature@0.05"]["nu"]
        == (ref_header["calibration"]["feature@0.05"]["nu"])
    )
    got = rows_of(out)
    assert len(got) == len(set(got)) == N_ROWS
    assert got == rows_of(reference)


def test_mismatched_configuration_is_refused_naming_the_settings(
    reference: Path, tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "r.jsonl"
    out.write_bytes(reference.read_bytes())
    args = [a for a in ARGS if a != "--quiet"]  # --quiet does not affect results: not compared
    i = args.index("--votes")
    args[i + 1] = "5"
    rc = run_cli(*args, "--budgets", "20", "--out", str(out))
    assert rc == 2
    err = capsys.readouterr().err
    assert "different configuration" in err
    assert "votes: file has 3, this run has 5" in err
    assert "budgets: file has [20, 50], this run has [20]" in err
    assert "quiet" not in err and "out:" not in err and "Traceback" not in err
    assert out.read_bytes() == reference.read_bytes()
    # the same settings without --quiet (and another --out) resume: nothing left to do
    assert run_cli(*[a for a in ARGS if a != "--quiet"], "--out", str(out)) == 0
    assert out.read_bytes() == reference.read_bytes()


@pytest.mark.slow
def test_damaged_tail_is_dropped_and_recomputed(reference: Path, tmp_path: Path) -> None:
    data = reference.read_bytes()
    lines = data.splitlines(keepends=True)
    out = tmp_path / "r.jsonl"
    # the last unit cut off mid-line (a crash during its write) plus a garbage line
    out.write_bytes(b"".join(lines[:-2]) + lines[-2][:17])
    assert run_cli(*ARGS, "--out", str(out)) == 0
    assert rows_of(out) == rows_of(reference)
    text = out.read_text()
    assert text.endswith("\n") and all(json.loads(s) for s in text.splitlines())
    # a whole last line (it ends with a newline) is no crash mid-write: a corrupt one is refused
    out.write_bytes(b"".join(lines[:-3]) + b'{"type": "attack", "ima\n')
    assert run_cli(*ARGS, "--out", str(out)) == 2


def test_corrupt_line_in_the_middle_is_refused(
    reference: Path, tmp_path: Path, capsys: Any
) -> None:
    lines = reference.read_bytes().splitlines(keepends=True)
    out = tmp_path / "r.jsonl"
    out.write_bytes(b"".join([*lines[:5], b"{oops\n", *lines[5:]]))
    assert run_cli(*ARGS, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "line 6: not valid JSON" in err and "Traceback" not in err


def test_a_foreign_file_is_refused(cache_env: dict[str, str], tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "notes.jsonl"
    out.write_text('{"hello": 1}\n')
    assert run_cli(*ARGS, "--out", str(out)) == 2
    assert "not a randfeat result file" in capsys.readouterr().err
    assert out.read_text() == '{"hello": 1}\n'


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.floats(0.0, 1.0))
@pytest.mark.slow
def test_any_truncation_keeps_exactly_the_complete_units(reference: Path, cut: float) -> None:
    """Cut the file anywhere: the kept rows are whole units of the reference, in file order."""
    data = reference.read_bytes()
    header_end = data.index(b"\n") + 1
    at = header_end + int(cut * (len(data) - header_end))
    path = reference.parent / "cut.jsonl"
    path.write_bytes(data[:at])
    full = read_results(reference)
    existing, damaged = ResultWriter(path).existing(full.header.config)
    assert existing is not None
    assert damaged == (at > header_end and data[at - 1 : at] != b"\n")
    rows = existing.rows
    done, kept = complete_units(existing.header, 4, rows)
    assert tuple(kept) == full.rows[: len(kept)]  # units are written whole: kept rows are a prefix
    assert len(kept) == 4 * len(done)  # chunks of 4 images
    assert len(kept) >= len(rows) - 4  # at most one unit (the cut one) is lost


# ------------------------------------------------------------ timm + ImageFolder
def test_timm_resnet18_on_an_image_folder(
    cache_env: dict[str, str], tmp_path: Path, capsys: Any
) -> None:
    """Write 2 classes x 24 PNGs, fit resnet18's head to them, evaluate base + feature."""
    from PIL import Image

    from randfeat.eval.data.loaders import load_image_folder, materialize
    from randfeat.eval.models import load_timm

    g = torch.Generator().manual_seed(0)
    root = tmp_path / "folder"
    for c, name in enumerate(("ants", "bees")):
        (root / name).mkdir(parents=True)
        for i in range(24):
            img = (torch.rand(40, 40, 3, generator=g) * 128 + 127 * c).to(torch.uint8)
            Image.fromarray(img.numpy()).save(root / name / f"{i}.png")
    # A checkpoint whose head separates the images (least squares on the penultimate features).
    model = load_timm("resnet18", num_classes=2)
    x, y = materialize(load_image_folder(root, image_size=32))
    feats: list[torch.Tensor] = []
    hook = model.model.fc.register_forward_pre_hook(lambda m, a: feats.append(a[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    f = torch.cat([feats[0], torch.ones(len(y), 1)], dim=1).double()
    target = torch.nn.functional.one_hot(y, 2).double() * 2 - 1
    w = torch.linalg.lstsq(f, target).solution.float()
    state = model.model.state_dict()
    state["fc.weight"], state["fc.bias"] = w[:-1].T.contiguous(), w[-1].contiguous()
    ckpt = tmp_path / "resnet18.pt"
    torch.save(state, ckpt)

    out = tmp_path / "folder.jsonl"
    rc = run_cli(
        "--data", f"imagenet:{root}", "--model", "resnet18", "--checkpoint", str(ckpt),
        "--num-classes", "2", "--image-size", "32", "--n-images", "4", "--batch-size", "4",
        "--defenses", "base,feature", "--target-drop", "0.1", "--calib-draws", "16",
        "--attacks", "square-linf", "--budgets", "10", "--votes", "3", "--fresh-forwards", "5",
        "--out", str(out),
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "ε: ℓ∞ 0.05, ℓ2 5 (paper default)" in err
    header, rows = load_results(out)
    assert header["data"]["name"] == "imagenet"
    assert header["data"]["image_shape"] == [3, 32, 32]
    assert header["model"]["outputs"] == 2
    assert header["n_calibration"] == 44  # the rest of the 48 images
    assert header["calibration"]["feature@0.1"]["layers"] == ["model.fc.pre"]
    assert header["calibration"]["feature@0.1"]["base_accuracy"] == 1.0
    assert len(rows) == header["rows_expected"] == 4 * 2 * 2
    assert all(r["dist"] <= 0.05 + 1e-6 for r in rows if r["type"] == "attack")


# ------------------------------------------------------------ configuration
def test_config_defaults_depend_on_the_data() -> None:
    d = EvalConfig.from_mapping({})
    assert (d.model, d.data, d.n_images, d.eps, d.eps_l2) == ("digits-cnn", "digits", 100, 0.2, 1.5)
    assert d.eps_source == "digits default"
    assert (d.budgets, d.votes, d.target_drop) == ((1000, 10000), 9, (0.01, 0.02))
    c = EvalConfig.from_mapping({"data": "cifar10:/x", "model": "resnet50"})
    assert (c.n_images, c.eps, c.eps_l2, c.eps_source) == (1000, 0.05, 5.0, "paper default")
    u = EvalConfig.from_mapping({"eps": "0.1", "eps-l2": 2, "budgets": [5, 7], "votes": "1"})
    assert (u.eps, u.eps_l2, u.budgets, u.votes, u.eps_source) == (0.1, 2.0, (5, 7), 1, "user")
    names = EvalConfig.from_mapping(
        {"defenses": "base,input,feature,aaa", "target_drop": "0.01,0.02"}
    ).defense_names()
    assert names == ["base", "input@0.01", "input@0.02", "feature@0.01", "feature@0.02", "aaa"]


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"attacks": "square-linf,squar-l2"}, "Did you mean 'square-l2'"),
        ({"defenses": "base,features"}, "Did you mean 'feature'"),
        ({"data": "digitz"}, "Valid --data values: 'digits', 'cifar10:PATH', 'imagenet:PATH'"),
        ({"data": "imagenet"}, "needs a local path"),
        ({"budgets": "10,0"}, "ints >= 1"),
        ({"budgets": "10,10"}, "without duplicates"),
        ({"target_drop": "2"}, "drops in (0, 1)"),
        ({"votes": 0}, "`votes` to be an int >= 1"),
        ({"votes": 2.5}, "`votes` to be an int >= 1"),
        ({"eps": -1}, "`eps` to be a finite float > 0"),
        ({"seed": True}, "`seed`"),
        ({"quiet": "yes"}, "true or false"),
        ({"n_imgs": 3}, "Did you mean 'n_images'"),
        ({"model": "resnet50"}, "--data digits needs --model digits-cnn"),
        ({"data": "cifar10:/x"}, "--model digits-cnn takes --data digits only"),
        ({"pretrained": True}, "--pretrained does not apply to digits-cnn"),
        ({"model": "resnt50"}, "Did you mean 'resnet50'"),
    ],
)
def test_bad_settings_are_named(values: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        EvalConfig.from_mapping(values)
    assert fragment in str(err.value)


def test_config_differences_ignore_settings_without_effect() -> None:
    a = EvalConfig.from_mapping({"budgets": "10,20"}).to_dict()
    b = EvalConfig.from_mapping({"budgets": "10", "quiet": True, "out": "x", "device": "cpu"})
    assert config_differences(a, b.to_dict()) == ["budgets: file has [10, 20], this run has [10]"]
    assert config_differences(a, a) == []


def test_derive_seed_is_stable_and_separates_units() -> None:
    parts = [("attack", "base", "square-linf", 20, c) for c in range(50)]
    seeds = {derive_seed(0, *p) for p in parts}
    assert len(seeds) == 50
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(0, "x", 1) == derive_seed(0, "x", 1) != derive_seed(1, "x", 1)
    # the documented recipe: seeds must not change between versions, or resumed files would mix
    assert derive_seed(0, "a") == int.from_bytes(hashlib.sha256(b'[0,"a"]').digest()[:8]) >> 1


def test_settings_not_compared_are_settings() -> None:
    assert set(NON_RESULT_SETTINGS) <= set(EvalConfig.keys())


def test_load_results_rejects_a_headerless_file(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text('{"type": "attack"}\n')
    with pytest.raises(ConfigError, match="no header"):
        read_results(p)


def test_fresh_judging_fills_every_forward_batch(digits_model: nn.Module) -> None:
    """The fresh judging of an attack unit spans images: 4 images × 10 forwards at
    `--forward-batch 16` make calls of 16, 16 and 8 rows, not four part-empty calls of 10."""
    cfg = EvalConfig.from_mapping(
        {
            "model": "digits-cnn",
            "data": "digits",
            "n_images": 4,
            "batch_size": 4,
            "forward_batch": 16,
            "defenses": "feature",
            "attacks": "square-linf",
            "budgets": "5",
            "votes": 3,
            "fresh_forwards": 10,
        }
    )
    name = cfg.defense_names()[0]
    defended = randfeat.wrap(digits_model, layers=["penultimate"], nu=0.5, seed=0)
    sizes: list[int] = []

    def recorded(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        return defended(x)

    x, y = digits().x_test[:4], digits().y_test[:4]
    runner = UnitRunner(cfg, torch.device("cpu"), (0, 1, 2, 3), x, y)
    runner.defended = {name: defended}
    runner.forwards = {name: recorded}
    runner.attacks = build_attacks(cfg)
    try:
        rows = runner.run(Unit("attack", name, "square-linf", 5, 0))
    finally:
        defended.unwrap()
    assert len(rows) == 4
    assert sizes[-3:] == [16, 16, 8]
