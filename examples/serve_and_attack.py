"""The demo over HTTP: serve the digits CNN three ways, attack each URL, print the demo's table.

Base (undefended), Input (RND) and Feature (noise on the penultimate features, `head.pre`), both
randomized defenses calibrated to a 2-point drop in clean accuracy, are each served by
`randfeat serve`'s application on a free port of 127.0.0.1 in a background thread. Each URL is
attacked with `randfeat eval --target`'s grid (the demo's five attacks, through `HTTPModel`: the
attacks see only what the endpoint answers), and the three result files are printed as one table,
the one `randfeat demo` prints in process.

    python examples/serve_and_attack.py                      # 100 digits, 1000 queries
    python examples/serve_and_attack.py --n-images 20 --budget 100 --attacks square-linf,rays
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from randfeat.eval.demo import DEMO_ATTACKS, DEMO_LAYER, DEMO_TARGET_DROP
from randfeat.eval.grid.config import EvalConfig
from randfeat.eval.grid.runner import run_eval
from randfeat.eval.report.render import to_markdown
from randfeat.eval.report.summary import Table, TableRow, summarize
from randfeat.eval.results.file import read_results
from randfeat.serve.app import create_app
from randfeat.cli.served_model import ModelSpec, build
from randfeat.serve.run import serve_in_thread

DEFENSES = (("base", "Base"), ("input", "Input"), ("feature", "Feature"))


def attack_served(defense: str, attacks: list[str], n_images: int, budget: int, out: Path) -> Table:
    """Serve the digits CNN under `defense`, run the grid against its URL, summarize the file."""
    spec = ModelSpec(defense=defense, layers=(DEMO_LAYER,), target_drop=DEMO_TARGET_DROP)  # type: ignore[arg-type]
    model, card = build(spec)
    with serve_in_thread(create_app(model, card)) as url:
        settings = {"target": url, "n_images": n_images, "attacks": attacks, "budgets": [budget]}
        run_eval(EvalConfig.from_mapping({**settings, "out": str(out), "quiet": True}))
    results = read_results(out)
    table = summarize(results.header, results.rows)
    row = table.rows[0]  # the one defense of a served run, "served": name it, with its ν
    named: TableRow = dataclasses.replace(
        row,
        defense=defense,
        label=dict(DEFENSES)[defense],
        nu=card.nu,
        target_drop=None if defense == "base" else DEMO_TARGET_DROP,
    )
    return dataclasses.replace(table, rows=(named,))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n-images", type=int, default=100, help="attacked digits (a multiple of 10)")
    p.add_argument("--budget", type=int, default=1000, help="queries per image")
    p.add_argument("--attacks", default=",".join(DEMO_ATTACKS), help="comma list")
    args = p.parse_args()
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        tables = [
            attack_served(d, attacks, args.n_images, args.budget, Path(tmp) / f"{d}.jsonl")
            for d, _ in DEFENSES
        ]
    rows = tuple(r for t in tables for r in t.rows)
    print(to_markdown(dataclasses.replace(tables[0], rows=rows)))


if __name__ == "__main__":
    main()
