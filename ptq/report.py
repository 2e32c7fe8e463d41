"""``python -m ptq.report <result.json files, dirs or globs>``: a Markdown table from run records.

Tables in the README are generated with this from committed records, never typed by hand.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path


def find_records(patterns: list[str]) -> list[dict]:
    paths: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            paths += sorted(p.rglob("result.json")) + sorted(p.rglob("error.json"))
        else:
            paths += [Path(x) for x in sorted(glob.glob(pattern))]
    return [json.loads(p.read_text()) | {"_path": str(p)} for p in paths]


def _label(r: dict) -> tuple:
    group = "-" if r.get("group_size") is None else ("channel" if r["group_size"] == -1 else r["group_size"])
    sym = "-" if r.get("sym") is None else ("sym" if r["sym"] else "asym")
    return r.get("model"), r.get("method"), r.get("bits"), group, sym


def markdown_table(records: list[dict]) -> str:
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") != "ok"]
    datasets = sorted({d for r in ok for d in r["metrics"].get("ppl", {})})
    header = ["model", "method", "bits", "group", "sym", *(f"{d} ppl" for d in datasets), "quantize s", "peak RSS GiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = {"none": 0, "rtn": 1}
    ok.sort(key=lambda r: (r["model"], -(r["bits"] or 0), str(_label(r)[3]), order.get(r["method"], 2), str(r["sym"])))
    for r in ok:
        ppl = [f"{r['metrics']['ppl'][d]:.2f}" if d in r["metrics"].get("ppl", {}) else "—" for d in datasets]
        quant = f"{r['timings']['quantize_s']:.1f}"
        rss = f"{r['memory']['peak_rss_bytes'] / 2**30:.2f}"
        lines.append("| " + " | ".join(str(x) for x in (*_label(r), *ppl, quant, rss)) + " |")
    for r in failed:
        lines.append(f"| failed: {r.get('error', '?')[:80]} ({r['_path']}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args(argv)
    print(markdown_table(find_records(args.paths)))


if __name__ == "__main__":
    main()
