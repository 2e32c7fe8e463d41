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
    bits = r.get("bits")
    if r.get("act_bits"):
        bits = f"w{bits}a{r['act_bits']} {r['act_granularity'].replace('_', '-')}"
    return r.get("model"), r.get("method"), bits, group, sym


def _device(r: dict) -> str:
    env = r.get("env") or {}
    if str(env.get("device", "")).startswith("cuda"):
        return (env.get("device_name") or "GPU").replace("NVIDIA ", "")
    return f"CPU ×{env['cpu_threads']}" if env.get("cpu_threads") else "CPU"


METHOD_ORDER = ["none", "rtn", "gptq", "awq", "awq+gptq", "smoothquant", "smoothquant+gptq"]


def markdown_table(records: list[dict]) -> str:
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") != "ok"]
    datasets = sorted({d for r in ok for d in r["metrics"].get("ppl", {})})
    header = [
        "model",
        "method",
        "bits",
        "group",
        "sym",
        *(f"{d} ppl" for d in datasets),
        "quantize s",
        "device",
        "peak RSS GiB",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def key(r):
        rank = METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else len(METHOD_ORDER)
        return r["model"], -(r["bits"] or 0), -(r.get("act_bits") or 16), str(_label(r)[3]), rank, str(r["sym"])

    ok.sort(key=key)
    for r in ok:
        ppl = [f"{r['metrics']['ppl'][d]:.2f}" if d in r["metrics"].get("ppl", {}) else "—" for d in datasets]
        quant = f"{r['timings']['quantize_s']:.1f}" if "quantize_s" in r.get("timings", {}) else "—"
        rss_bytes = (r.get("memory") or {}).get("peak_rss_bytes")
        rss = f"{rss_bytes / 2**30:.2f}" if rss_bytes else "—"
        lines.append("| " + " | ".join(str(x) for x in (*_label(r), *ppl, quant, _device(r), rss)) + " |")
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
