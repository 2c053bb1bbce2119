"""Tests of the report: tables by hand, Markdown/CSV content, the plot, bad input, the CLI."""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from randfeat.cli import main
from randfeat.eval.errors import ReportError
from randfeat.eval.report import summary
from randfeat.eval.report.plot import plot_curves, robust_curve
from randfeat.eval.report.render import to_csv, to_markdown
from randfeat.eval.report.summary import Table, summarize
from randfeat.eval.results.file import FORMAT, FORMAT_VERSION, read_results
from randfeat.eval.results.records import Header, Row, row_from_json

IMAGES = [11, 22, 33, 44, 55]


def _header(
    defenses: list[str], attacks: list[str], budgets: list[int], n: int = len(IMAGES)
) -> dict[str, Any]:
    """A header record as JSON (values made up, consistent)."""
    calibration = {
        d: {
            "kind": d.partition("@")[0],
            "layers": ["input"] if d.startswith("input") else ["head.pre"],
            "target_drop": float(d.partition("@")[2]),
            "nu": 0.0125 if d.startswith("input") else 2.5,
            "base_accuracy": 0.985,
            "accuracy": 0.965 if d.startswith("input") else 0.9625,
            "drop": 0.02 if d.startswith("input") else 0.0225,
            "n_images": 400,
            "draws": 50,
            "stopped": "tol",
            "path": "full" if d.startswith("input") else "projected",
            "seed": 1,
            "wall_time_s": 0.5,
        }
        for d in defenses
        if "@" in d
    }
    header = {
        "type": "header",
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": {
            "model": "digits-cnn",
            "data": "digits",
            "n_images": n,
            "attacks": attacks,
            "budgets": budgets,
            "votes": 9,
            "eot_m": 5,
            "target_drop": sorted({c["target_drop"] for c in calibration.values()}),
        },
        "settings_not_compared": ["device", "out", "preset", "quiet"],
        "versions": {"randfeat": "0", "torch": "0", "timm": "0", "python": "3"},
        "device": "cpu",
        "world_size": 1,
        "created": "2024-01-01T00:00:00Z",
        "eps": {"linf": 0.2, "l2": 1.5, "source": "digits default"},
        "data": {
            "name": "digits",
            "path": None,
            "pool_size": 540,
            "classes": 10,
            "image_shape": [1, 8, 8],
        },
        "model": {"name": "digits-cnn", "parameters": 1, "outputs": 10, "image_size": None},
        "defenses": defenses,
        "attacks": {
            a: {"norm": "l2" if a.endswith("-l2") else "linf", "eps": 0.2, "repr": a}
            for a in attacks
        },
        "calibration": calibration,
        "attacked_indices": IMAGES[:n],
        "calibration_indices": list(range(100, 500)),
        "n_attacked": n,
        "n_calibration": 400,
        "n_chunks": 1,
        "rows_expected": 0,
    }
    Header.from_json(header)  # the synthetic file follows the schema
    return header


def _clean(defense: str, correct: list[bool]) -> list[dict[str, Any]]:
    return [
        {
            "type": "clean",
            "image": img,
            "label": img % 10,
            "defense": defense,
            "votes": 9,
            "wrong_votes": 2 if ok else 5,  # 5 of 9 wrong: fooled at the clean image
            "chunk": 0,
            "seconds": 0.1,
        }
        for img, ok in zip(IMAGES, correct, strict=False)
    ]


def _attack(
    defense: str, attack: str, budget: int, success_query: list[int], fresh: list[float]
) -> list[dict[str, Any]]:
    """Rows of one unit; ``success_query[i] = -1`` means never fooled."""
    return [
        {
            "type": "attack",
            "image": img,
            "label": img % 10,
            "defense": defense,
            "attack": attack,
            "budget": budget,
            "eps": 0.2,
            "norm": "linf",
            "success": sq >= 0,
            "queries": sq if sq >= 0 else budget,
            "success_query": sq,
            "verify_forwards": 9 * (sq >= 0),
            "fresh": fr,
            "dist": 0.2,
            "chunk": 0,
            "seconds": 1.0,
        }
        for img, sq, fr in zip(IMAGES, success_query, fresh, strict=False)
    ]


def _grid() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Base / Input / Feature at a 2-point drop; Square ℓ∞ and RayS; budget 100; 5 images."""
    header = _header(["base", "input@0.02", "feature@0.02"], ["square-linf", "rays"], [100])
    rows = [
        *_clean("base", [True, True, True, True, False]),
        *_clean("input@0.02", [True, True, True, False, False]),
        *_clean("feature@0.02", [True] * 5),
        # base: 4 of 5 fooled; deterministic, fresh is 0 or 1
        *_attack("base", "square-linf", 100, [3, 10, 50, 1, -1], [1, 1, 1, 1, 0]),
        *_attack("base", "rays", 100, [20, 30, -1, 1, 40], [1, 1, 0, 1, 1]),
        # input: 2 of 5 fooled; fresh mean (0.5 + 0.3 + 0.1 + 0.2 + 0) / 5 = 0.22
        *_attack("input@0.02", "square-linf", 100, [5, -1, -1, 60, -1], [0.5, 0.3, 0.1, 0.2, 0]),
        *_attack("input@0.02", "rays", 100, [-1] * 5, [0.0, 0.0, 0.0, 0.0, 0.05]),
        # feature: 1 of 5 fooled; fresh mean (0.9 + 0.3 + 0.1 + 0 + 0) / 5 = 0.26
        *_attack("feature@0.02", "square-linf", 100, [-1, 70, -1, -1, -1], [0.9, 0.3, 0.1, 0, 0]),
        *_attack("feature@0.02", "rays", 100, [-1, -1, 99, -1, -1], [0, 0, 1, 0, 0]),
    ]
    return header, rows


def typed(header: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[Header, list[Row]]:
    """The records of the JSON objects, as the reader builds them."""
    return Header.from_json(header), [row_from_json(r) for r in rows]


def table_of(header: dict[str, Any], rows: list[dict[str, Any]]) -> Table:
    return summarize(*typed(header, rows))


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- tables by hand
def test_summarize_by_hand() -> None:
    header, rows = _grid()
    table = table_of(header, rows)
    assert [c.label for c in table.columns] == ["Square ℓ∞ 100", "RayS 100"]
    base, inp, feat = table.rows
    assert [r.label for r in table.rows] == ["Base", "Input", "Feature"]
    # verified = 1 - fooled / 5, fresh = 1 - mean(fresh)
    sq, rays = ("square-linf", 100), ("rays", 100)
    assert base.cells[sq].verified == pytest.approx(1 / 5)
    assert base.cells[sq].fresh == pytest.approx(1 / 5)
    assert base.cells[rays].verified == pytest.approx(1 / 5)
    assert inp.cells[sq].verified == pytest.approx(3 / 5)
    assert inp.cells[sq].fresh == pytest.approx(1 - 0.22)
    assert inp.cells[rays].verified == pytest.approx(1.0)
    assert inp.cells[rays].fresh == pytest.approx(1 - 0.01)
    assert feat.cells[sq].verified == pytest.approx(4 / 5)
    assert feat.cells[sq].fresh == pytest.approx(1 - 0.26)
    # mean queries: successes at their query, the rest at the budget
    assert inp.cells[sq].mean_queries == pytest.approx((5 + 100 + 100 + 60 + 100) / 5)
    # clean accuracy on the attacked images, calibration figures from the header
    assert (base.clean, inp.clean, feat.clean) == pytest.approx((0.8, 0.6, 1.0))
    assert base.accuracy == pytest.approx(0.985) and base.nu is None and base.drop is None
    assert (inp.nu, inp.accuracy, inp.drop) == pytest.approx((0.0125, 0.965, 0.02))
    assert (feat.nu, feat.accuracy, feat.drop) == pytest.approx((2.5, 0.9625, 0.0225))
    assert inp.target_drop == pytest.approx(0.02)
    # worst case over both attacks: images that survive Square and RayS (see test_markdown)
    assert table.worst_budgets == (100,)
    assert base.worst[100].verified == pytest.approx(0.0)
    assert inp.worst[100].verified == pytest.approx(3 / 5)
    assert inp.worst[100].fresh == pytest.approx((0.5 + 0.7 + 0.9 + 0.8 + 0.95) / 5)
    assert feat.worst[100].verified == pytest.approx(3 / 5)
    assert feat.worst[100].fresh == pytest.approx((0.1 + 0.7 + 0.0 + 1.0 + 1.0) / 5)


def test_markdown_by_hand() -> None:
    md = to_markdown(table_of(*_grid()))
    lines = md.splitlines()
    head = next(line for line in lines if line.startswith("| Model"))
    assert [c.strip() for c in head.strip("|").split("|")] == [
        "Model",
        "Defense",
        "ν",
        "Acc",
        "Drop",
        "Clean",
        "Square ℓ∞ 100",
        "RayS 100",
        "Worst case 100",
    ]
    body = {
        cells[1]: cells
        for line in lines
        if line.startswith("| ") and not line.startswith("| Model")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert body["Base"] == [
        "digits-cnn",
        "Base",
        "–",
        "98.50",
        "–",
        "80.0",
        "20.0 / 20.0",
        "20.0 / 20.0",
        "0.0 / 0.0",  # every image is fooled by one of the two
    ]
    assert body["Input"] == [
        "",
        "Input",
        "0.0125",
        "96.50",
        "2.00",
        "60.0",
        "60.0 / 78.0",
        "100.0 / 99.0",
        # images 2, 3, 5 survive both; fresh: 1 - max over attacks, (0.5+.7+.9+.8+.95) / 5
        "60.0 / 77.0",
    ]
    assert body["Feature"] == [
        "",
        "Feature",
        "2.5",
        "96.25",
        "2.25",
        "100.0",
        "80.0 / 74.0",
        "80.0 / 80.0",
        "60.0 / 56.0",  # (0.1 + 0.7 + 0 + 1 + 1) / 5
    ]
    # the legend says what the two figures are; the setting line gives ε and the drop
    assert "verified / fresh" in md and "1 − success rate" in md
    assert "ℓ∞ ε = 0.2 (digits default)" in md and "≈2 points" in md
    assert "*" not in md  # every cell is complete


def test_several_drops_name_the_target() -> None:
    header = _header(["base", "input@0.01", "input@0.02"], ["square-linf"], [100])
    rows = [
        *_attack("base", "square-linf", 100, [1] * 5, [1] * 5),
        *_attack("input@0.01", "square-linf", 100, [-1] * 5, [0] * 5),
        *_attack("input@0.02", "square-linf", 100, [-1] * 5, [0] * 5),
    ]
    table = table_of(header, rows)
    assert [r.label for r in table.rows] == ["Base", "Input (≈1%)", "Input (≈2%)"]
    assert "≈1 / ≈2 points" in to_markdown(table)


def test_csv_by_hand() -> None:
    got = list(csv.DictReader(io.StringIO(to_csv(table_of(*_grid())))))
    assert [r["defense"] for r in got] == ["base", "input@0.02", "feature@0.02"]
    inp = got[1]
    assert inp["label"] == "Input"
    assert float(inp["nu"]) == pytest.approx(0.0125)
    assert float(inp["accuracy_pct"]) == pytest.approx(96.5)
    assert float(inp["drop_pct"]) == pytest.approx(2.0)
    assert float(inp["clean_pct"]) == pytest.approx(60.0)
    assert float(inp["Square ℓ∞ 100 verified"]) == pytest.approx(60.0)
    assert float(inp["Square ℓ∞ 100 fresh"]) == pytest.approx(78.0)
    assert inp["Square ℓ∞ 100 n"] == "5"
    assert float(got[2]["RayS 100 verified"]) == pytest.approx(80.0)
    assert got[0]["nu"] == "" and got[0]["drop_pct"] == ""
    assert float(inp["Worst case 100 verified"]) == pytest.approx(60.0)
    assert float(inp["Worst case 100 fresh"]) == pytest.approx(77.0)
    assert inp["Worst case 100 n"] == "5"


def test_incomplete_rows_are_marked() -> None:
    header, rows = _grid()
    rows = [r for r in rows if not (r.get("defense") == "base" and r["image"] == 55)]
    table = table_of(header, rows)
    base, _, feat = table.rows
    assert (base.clean, base.n_clean) == (1.0, 4)  # images 11..44, all correct
    # base square on 4 images, all fooled: 0%, marked incomplete; so is the worst case
    assert base.cells[("square-linf", 100)].n == 4
    assert base.cells[("square-linf", 100)].verified == pytest.approx(0.0)
    assert base.worst[100].n == 4
    assert feat.cells[("rays", 100)].verified == pytest.approx(4 / 5)
    md = to_markdown(table)
    assert "0.0 / 0.0*" in md
    assert "* incomplete" in md and "Base / Square ℓ∞ 100: 4 of 5" in md
    assert "Base / Worst case 100: 4 of 5" in md


def test_repeated_rows_are_refused_and_named(tmp_path: Path, capsys: Any) -> None:
    header, rows = _grid()
    rows.append({**rows[-1], "success": True, "success_query": 1})  # image 55, feature, rays
    rows.append({**rows[0], "wrong_votes": 9})  # image 11, base, clean
    with pytest.raises(ReportError) as err:
        table_of(header, rows)
    msg = str(err.value)
    assert "2 repeated row(s)" in msg
    assert "(image 55, defense feature@0.02, attack rays, budget 100): 2 rows" in msg
    assert "(image 11, defense base): 2 rows" in msg
    assert "Rerun `randfeat eval`" in msg
    path = _write(tmp_path / "dupes.jsonl", [header, *rows])
    assert main(["report", str(path)]) == 2
    err_text = capsys.readouterr().err
    assert "dupes.jsonl" in err_text and "repeated row" in err_text


def test_one_attack_has_no_worst_case_column() -> None:
    header = _header(["base"], ["square-linf"], [100, 200])
    rows = [
        *_attack("base", "square-linf", 100, [1, -1, -1, -1, -1], [1, 0, 0, 0, 0]),
        *_attack("base", "square-linf", 200, [1, 150, -1, -1, -1], [1, 1, 0, 0, 0]),
    ]
    table = table_of(header, rows)
    assert table.worst_budgets == () and table.rows[0].worst == {}
    assert "Worst case" not in to_markdown(table)


def test_attack_labels() -> None:
    assert summary.attack_label("square-linf") == "Square ℓ∞"
    assert summary.attack_label("nes-l2") == "NES ℓ2"
    assert summary.attack_label("signhunter-linf") == "SignHunter ℓ∞"
    assert summary.attack_label("rays") == "RayS"
    assert summary.attack_label("signflip") == "SignFlip"
    assert summary.attack_label("eot-square-linf", 5) == "EOT-5 Square ℓ∞"
    assert summary.defense_label("aaa", True) == "AAA"
    assert summary.defense_label("feature@0.04", True) == "Feature (≈4%)"
    assert summary.defense_label("feature@0.04", False) == "Feature"


def test_combine_two_models() -> None:
    h1, r1 = _grid()
    h2, r2 = _grid()
    h2["model"]["name"] = "other-cnn"
    table = summary.combine([table_of(h1, r1), table_of(h2, r2)])
    assert [r.model for r in table.rows] == ["digits-cnn"] * 3 + ["other-cnn"] * 3
    md = to_markdown(table)
    assert "| other-cnn  | Base" in md and "| digits-cnn | Base" in md


# ---------------------------------------------------------------------------- curves
def test_robust_curve_by_hand() -> None:
    _, rows = _grid()
    base_square = [
        row_from_json(r)
        for r in rows
        if r.get("defense") == "base" and r.get("attack") == "square-linf"
    ]
    # fooled at queries 3, 10, 50, 1 (one never): RA(q) = 1 - #{sq <= q} / 5
    assert robust_curve(base_square, [0, 1, 2, 3, 9, 10, 49, 50, 100]) == pytest.approx(
        [1.0, 0.8, 0.8, 0.6, 0.6, 0.4, 0.4, 0.2, 0.2]
    )
    assert robust_curve([], [1, 2]) == []


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(min_value=-1, max_value=50), st.floats(0, 1)), min_size=1, max_size=5
    )
)
def test_curve_ends_at_the_verified_figure(data: list[tuple[int, float]]) -> None:
    sq = [q if q != 0 else -1 for q, _ in data]  # success_query is >= 1 or -1
    fresh = [f for _, f in data]
    n = len(data)
    header = _header(["base"], ["square-linf"], [50], n=n)
    rows = _attack("base", "square-linf", 50, sq, fresh)
    cell = table_of(header, rows).rows[0].cells[("square-linf", 50)]
    assert cell.verified == pytest.approx(1 - sum(q > 0 for q in sq) / n)
    assert cell.fresh == pytest.approx(1 - sum(fresh) / n)
    curve = robust_curve(typed(header, rows)[1], list(range(51)))  # type: ignore[arg-type]
    assert curve[0] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(curve))  # non-increasing
    assert curve[-1] == pytest.approx(cell.verified)


# ---------------------------------------------------------------------------- the plot
def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    header, rows = _grid()
    path = plot_curves(*typed(header, rows), tmp_path / "sub" / "curves.png")
    assert path == tmp_path / "sub" / "curves.png"
    width, height = _png_size(path)
    assert width > 1000 and height > 500


def test_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r'pip install "randfeat\[plot\]"'):
        plot_curves(*typed(*_grid()), tmp_path / "x.png")


def test_plot_without_attack_rows(tmp_path: Path) -> None:
    header, rows = _grid()
    with pytest.raises(ReportError, match="no attack rows"):
        clean = [r for r in rows if r["type"] == "clean"]
        plot_curves(*typed(header, clean), tmp_path / "x.png")


# ---------------------------------------------------------------------------- bad input
def test_load_round_trip(tmp_path: Path) -> None:
    header, rows = _grid()
    res = read_results(_write(tmp_path / "r.jsonl", [header, *rows]))
    assert res.header.to_json() == header and [r.to_json() for r in res.rows] == rows
    assert len(res.clean) == 15 and len(res.attacks) == 30


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="does not exist"):
        read_results(tmp_path / "nope.jsonl")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ReportError, match="is empty"):
        read_results(tmp_path / "e.jsonl")


def test_no_header(tmp_path: Path) -> None:
    _, rows = _grid()
    with pytest.raises(ReportError, match="has no header"):
        read_results(_write(tmp_path / "h.jsonl", rows))


def test_corrupt_line(tmp_path: Path) -> None:
    header, rows = _grid()
    path = _write(tmp_path / "c.jsonl", [header, *rows])
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[3] = lines[3][:20]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ReportError, match=r"line 4: not valid JSON"):
        read_results(path)


def test_cut_off_last_line_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    header, rows = _grid()
    path = _write(tmp_path / "t.jsonl", [header, *rows])
    text = path.read_text(encoding="utf-8")
    path.write_text(text + json.dumps(rows[0])[:30], encoding="utf-8")  # a run still writing
    with caplog.at_level(logging.WARNING):
        got = read_results(path).rows
    assert [r.to_json() for r in got] == rows and "cut-off last line" in caplog.text


def test_not_an_object_and_other_format(tmp_path: Path) -> None:
    header, rows = _grid()
    with pytest.raises(ReportError, match="line 2: expected a JSON object"):
        read_results(_write(tmp_path / "a.jsonl", [header, [1, 2], *rows]))  # type: ignore[list-item]
    with pytest.raises(ReportError, match="format 'randfeat-eval' version 99"):
        read_results(_write(tmp_path / "v.jsonl", [{**header, "format_version": 99}]))


def test_row_without_a_needed_field(tmp_path: Path) -> None:
    header, rows = _grid()
    del rows[20]["fresh"]
    with pytest.raises(ReportError, match=r"line 22: The attack record lacks field\(s\) fresh"):
        read_results(_write(tmp_path / "f.jsonl", [header, *rows]))
    rows[20]["fresh"] = "high"
    with pytest.raises(ReportError, match=r"line 22: Expected `attack.fresh` to be float"):
        read_results(_write(tmp_path / "f.jsonl", [header, *rows]))


# ---------------------------------------------------------------------------- the command
def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    header, rows = _grid()
    path = _write(tmp_path / "grid.jsonl", [header, *rows])
    out = tmp_path / "out"
    assert main(["report", str(path), "--out", str(out), "--plot"]) == 0
    printed = capsys.readouterr().out
    assert "60.0 / 78.0" in printed and "Square ℓ∞ 100" in printed
    assert (out / "grid.md").read_text(encoding="utf-8") == to_markdown(table_of(header, rows))
    assert (out / "grid.csv").read_text(encoding="utf-8") == to_csv(table_of(header, rows))
    _png_size(out / "grid.png")
    # default: beside the result file; --format picks the files
    assert main(["report", str(path), "--format", "csv"]) == 0
    assert (tmp_path / "grid.csv").exists() and not (tmp_path / "grid.md").exists()


def test_cli_report_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    header, rows = _grid()
    path = _write(tmp_path / "g.jsonl", [header, *rows])
    assert main(["report", str(path), "--format", "md,pdf"]) == 2
    assert "--format" in capsys.readouterr().err
