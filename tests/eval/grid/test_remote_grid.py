"""`randfeat eval --target URL`: the evaluation grid against a served model, over real HTTP."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import nn

import randfeat
from randfeat.cli import main
from randfeat.eval.results.file import read_results
from randfeat.eval.results.records import AttackRow, CleanRow
from randfeat.serve.config import ModelCard

NU = 5.5  # the digits CNN's feature defense at a 2-point drop (see test_remote.py)
KEY = "s3cret-key"


def _fails(capsys: Any, *argv: str) -> str:
    assert main(list(argv)) == 2
    err: str = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture
def defended_url(serve: Any, digits_model: nn.Module) -> Any:
    defended = randfeat.wrap(digits_model, ["head.pre"], nu=NU)
    card = ModelCard("digits-cnn", (1, 8, 8), 10, True, "feature", ("head.pre",), NU)
    try:
        yield serve(defended, card, admin_key="admin")
    finally:
        defended.unwrap()


@pytest.mark.slow
def test_eval_against_a_url_writes_a_result_file_resumes_and_reports(
    defended_url: str, tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "served.jsonl"
    argv = ["eval", "--target", defended_url, "--api-key", KEY, "--n-images", "20",
            "--batch-size", "10", "--attacks", "square-linf,rays", "--budgets", "40",
            "--fresh-forwards", "5", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    results = read_results(out)
    header = results.header
    assert header.config["target"] == defended_url and header.defenses == ("served",)
    assert header.calibration == {} and header.n_calibration == 0  # no local calibration
    served = header.model.served
    assert served is not None and served["defended"] is True and served["classes"] == 10
    assert served["nu"] is None  # the server does not reveal ν
    assert header.model.name == "digits-cnn" and header.model.outputs == 10
    assert KEY not in out.read_text()  # the key is a secret
    clean = [r for r in results.rows if isinstance(r, CleanRow)]
    attacked = [r for r in results.rows if isinstance(r, AttackRow)]
    assert len(clean) == 20 and {r.defense for r in clean} == {"served"}
    assert len(attacked) == 40 and all(0 < r.queries <= 40 for r in attacked)
    assert sum(r.correct for r in clean) >= 16  # the served model is accurate (97% clean)

    # every query went to the server under the key: the attacks' charged queries, plus the
    # uncharged verification votes, the clean votes and the fresh judging
    usage = httpx.get(defended_url + "/v1/usage", headers={"X-API-Key": "admin"}).json()
    spent = usage["keys"][KEY]["queries"]
    assert spent >= sum(r.queries + r.verify_forwards for r in attacked) + 20 * 9

    assert main(argv) == 0  # resuming a complete file sends nothing
    usage = httpx.get(defended_url + "/v1/usage", headers={"X-API-Key": "admin"}).json()
    assert usage["keys"][KEY]["queries"] == spent

    assert main(["report", str(out)]) == 0
    assert "Served" in capsys.readouterr().out


def test_target_refuses_settings_of_a_local_model(defended_url: str, capsys: Any) -> None:
    err = _fails(capsys, "eval", "--target", defended_url, "--model", "resnet18")
    assert "--model does not apply" in err
    err = _fails(capsys, "eval", "--target", defended_url, "--defenses", "base,feature")
    assert "--defenses does not apply" in err
    assert "http://" in _fails(capsys, "eval", "--target", "127.0.0.1:8000")


def test_an_unreachable_target_is_a_usage_error(capsys: Any, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = _fails(capsys, "eval", "--target", f"http://127.0.0.1:{port}", "--out",
                 str(tmp_path / "r.jsonl"), "--quiet")  # fmt: skip
    assert "Cannot use --target" in err


def test_a_target_that_does_not_fit_the_data_is_refused_before_any_query(
    serve: Any, capsys: Any, tmp_path: Path
) -> None:
    color = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    url = serve(color, ModelCard("color", (3, 32, 32), 10, False), admin_key="admin")
    err = _fails(capsys, "eval", "--target", url, "--out", str(tmp_path / "r.jsonl"), "--quiet")
    assert "[n, 3, 32, 32]" in err
    usage = httpx.get(url + "/v1/usage", headers={"X-API-Key": "admin"}).json()
    assert usage["keys"] == {}


def test_a_labels_only_target_takes_decision_attacks_only(
    serve: Any, digits_model: nn.Module, digits: Any, capsys: Any, tmp_path: Path
) -> None:
    url = serve(digits_model, output="labels")
    out = str(tmp_path / "r.jsonl")
    err = _fails(capsys, "eval", "--target", url, "--attacks", "square-linf,rays", "--out", out)
    assert "square-linf" in err and "need scores" in err
    argv = ["eval", "--target", url, "--attacks", "rays", "--budgets", "20", "--n-images", "10",
            "--fresh-forwards", "2", "--out", out, "--quiet"]  # fmt: skip
    assert main(argv) == 0
    results = read_results(out)
    clean = [r for r in results.rows if isinstance(r, CleanRow)]
    idx = torch.tensor([r.image for r in clean])
    want = (digits_model(digits.x_test[idx]).argmax(dim=1) != digits.y_test[idx]).tolist()
    # an undefended server: one forward per clean image, judged by its label
    assert [r.votes for r in clean] == [1] * len(clean)
    assert [r.wrong_votes for r in clean] == [int(w) for w in want]
