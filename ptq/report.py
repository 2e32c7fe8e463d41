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
    method = r.get("method")
    smooth = ((r.get("config") or {}).get("method_options") or {}).get("smoothquant")
    if smooth:  # the migration strength is what distinguishes SmoothQuant runs
        method += f" α={smooth['alpha']}" + (f" ({smooth['scope']})" if smooth.get("scope", "norms") != "norms" else "")
    return r.get("model"), method, bits, group, sym


def _device(r: dict) -> str:
    env = r.get("env") or {}
    if str(env.get("device", "")).startswith("cuda"):
        return (env.get("device_name") or "GPU").replace("NVIDIA ", "")
    return f"CPU ×{env['cpu_threads']}" if env.get("cpu_threads") else "CPU"


TASK_COLUMNS = {  # metric -> column suffix, in this order; lm-eval's word perplexity is not token perplexity
    "acc": "acc",
    "acc_norm": "acc_norm",
    "perplexity": "ppl (lm-eval)",
    "word_perplexity": "word ppl (lm-eval)",
}


def metric_columns(all_metrics: list[dict]) -> list[tuple[str, tuple[str, ...]]]:
    """(header, path into a record's metrics) for every number found in any of ``all_metrics``:
    GPTQ-protocol perplexities first, then each lm-eval task's scores."""
    cols: dict[tuple[str, ...], str] = {}
    for metrics in all_metrics:
        for name in metrics.get("ppl", {}):
            cols.setdefault(("ppl", name), f"{name} ppl")
    for metrics in all_metrics:
        for task, scores in (metrics.get("tasks") or {}).items():
            for metric, label in TASK_COLUMNS.items():
                if scores.get(metric) is not None:
                    cols.setdefault(("tasks", task, metric), f"{task} {label}")
    return [(header, path) for path, header in cols.items()]


def metric_value(metrics: dict, path: tuple[str, ...]):
    for key in path:
        metrics = (metrics or {}).get(key)
    return metrics


METHOD_ORDER = ["none", "rtn", "gptq", "awq", "awq+gptq", "smoothquant", "smoothquant+gptq"]


def markdown_table(records: list[dict]) -> str:
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") != "ok"]
    columns = metric_columns([r["metrics"] for r in ok])
    fixed = ["model", "method", "bits", "group", "sym"]
    header = [*fixed, *(h for h, _ in columns), "quantize s", "device", "peak RSS GiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def key(r):
        rank = METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else len(METHOD_ORDER)
        label = _label(r)
        return r["model"], -(r["bits"] or 0), -(r.get("act_bits") or 16), str(label[3]), str(label[2]), rank, label[1]

    ok.sort(key=key)
    for r in ok:
        values = [metric_value(r["metrics"], path) for _, path in columns]
        ppl = [
            ("—" if v is None else f"{v:.2f}" if path[0] == "ppl" or v > 1 else f"{v:.3f}")
            for v, (_, path) in zip(values, columns, strict=True)
        ]
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
