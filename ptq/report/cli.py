"""``python -m ptq.report <result.json files, dirs or globs> [--out DIR]``: a comparison table from run
records, printed as Markdown and written as Markdown and CSV. ``--where-it-hurts``: instead, the
per-example analysis of runs made with ``eval.per_example=true`` (``ptq.report.hurts``).

Tables in the README are generated with this from committed records, never typed by hand.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ptq.report.hurts import MissingPerExample, where_it_hurts, where_it_hurts_plots
from ptq.report.plots import write_plots
from ptq.report.records import find_records
from ptq.report.table import markdown_table, write_csv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ptq.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--out", help="also write <out>/report.md, <out>/report.csv and the plots (PNG)")
    parser.add_argument("--no-plots", action="store_true", help="with --out: tables only")
    parser.add_argument(
        "--where-it-hurts", action="store_true",
        help="per-example analysis: the windows whose loss rose most, the rise's distribution, by position",
    )  # fmt: skip
    parser.add_argument("--top", type=int, default=10, help="with --where-it-hurts: how many windows to list")
    args = parser.parse_args(argv)
    records = find_records(args.paths)
    if not records:
        parser.error(f"no result.json or error.json found in {' '.join(args.paths)}")
    if args.where_it_hurts:
        ok = [r for r in records if r.get("status", "ok") == "ok" and r.get("method") != "none"]
        try:
            text, results = where_it_hurts(ok, args.top)
        except MissingPerExample as err:
            parser.error(str(err))
        print(text)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "where_it_hurts.md").write_text(text + "\n")
            for path in [] if args.no_plots else where_it_hurts_plots(results, out):
                print(f"plot: {path}")
        return
    text = markdown_table(records)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(text + "\n")
        write_csv(records, out / "report.csv")
        for path in [] if args.no_plots else write_plots(records, out):
            print(f"plot: {path}")
