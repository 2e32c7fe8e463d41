"""``python -m ptq.report <result.json files, dirs or globs> [--out DIR]``: a comparison table from run
records, printed as Markdown and written as Markdown and CSV.

Tables in the README are generated with this from committed records, never typed by hand.
"""

from __future__ import annotations

import argparse
import csv
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


def _sort_key(r: dict) -> tuple:
    rank = METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else len(METHOD_ORDER)
    label = _label(r)
    return r["model"], -(r["bits"] or 0), -(r.get("act_bits") or 16), str(label[3]), str(label[2]), rank, label[1]


def _full_precision_ppl(r: dict, ok: list[dict]) -> dict:
    """The full-precision perplexities to compare ``r`` with: its own baseline, else a method=none record
    of the same model scored on the same windows."""
    base = ((r.get("baseline") or {}).get("metrics") or {}).get("ppl")
    if base:
        return base
    for other in ok:
        if other["method"] == "none" and other["model"] == r["model"] and _windows(other) == _windows(r):
            return other["metrics"].get("ppl", {})
    return {}


def storage(r: dict) -> dict:
    return ((r.get("quantization") or {}).get("storage")) or {}


def bits_per_weight(r: dict) -> float | None:
    """Effective bits per weight of the quantized linears as stored (scales, zero points, g_idx
    included); 16 for full precision. None for records from before ptq recorded storage."""
    if r["method"] == "none":
        return 16.0
    return storage(r).get("bits_per_weight")


def model_mib(r: dict) -> float | None:
    b = storage(r).get("model_bytes")
    return b / 2**20 if b else None


def _full_precision_rows(ok: list[dict]) -> list[dict]:
    """A full-precision row for each (model, windows) that only appears as other runs' baselines."""
    have = {(r["model"], json.dumps(_windows(r))) for r in ok if r["method"] == "none"}
    rows = []
    for r in ok:
        key = (r["model"], json.dumps(_windows(r)))
        base = (r.get("baseline") or {}).get("metrics")
        if r["method"] == "none" or not base or key in have:
            continue
        have.add(key)
        st = storage(r)
        params = (st.get("linear_weights") or 0) + (st.get("other_params") or 0)
        fp_storage = {"model_bytes": 2 * params} if params else {}
        rows.append(
            {
                "status": "ok", "model": r["model"], "method": "none", "bits": 16, "group_size": None,
                "sym": None, "metrics": base, "eval": r.get("eval"), "env": r.get("env"),
                "timings": {}, "memory": {}, "config": {"experiment": (r.get("config") or {}).get("experiment")},
                "quantization": {"storage": fp_storage}, "_path": f"baseline of {r.get('_path')}",
            }
        )  # fmt: skip
    return rows


def successful_with_full_precision(records: list[dict]) -> list[dict]:
    """The successful records, sorted, plus a full-precision row taken from the baselines where no
    method=none run exists for that model and those evaluation windows."""
    ok = [r for r in records if r.get("status") == "ok"]
    return sorted(ok + _full_precision_rows(ok), key=_sort_key)


def published_key(r: dict) -> str:
    """How experiment presets name a configuration: fp16, or <method>-w<bits>[a<act_bits>]."""
    if r["method"] == "none":
        return "fp16"
    return f"{r['method']}-w{r['bits']}" + (f"a{r['act_bits']}" if r.get("act_bits") else "")


def published_value(r: dict) -> tuple[str, float] | None:
    """(metric path, published number) for a record run under an experiment preset that has one."""
    exp = (r.get("config") or {}).get("experiment") or {}
    value = ((exp.get("published") or {}).get(r["model"]) or {}).get(published_key(r))
    return (exp["metric"], value) if value is not None else None


def _windows(r: dict) -> tuple:
    """What a perplexity was measured on: window length and the number of windows per data set."""
    ev = r.get("eval") or {}
    return ev.get("seqlen"), {name: info.get("windows") for name, info in (ev.get("ppl") or {}).items()}


def table(records: list[dict]) -> tuple[list[str], list[list], list[dict]]:
    """Header, one row of raw values per successful record (sorted), and the failed records."""
    ok = successful_with_full_precision(records)
    failed = [r for r in records if r.get("status") != "ok"]
    columns = metric_columns([r["metrics"] for r in ok])
    ppl_sets = [path[1] for _, path in columns if path[0] == "ppl"]
    published = any(published_value(r) for r in ok)
    header = [
        "model", "method", "bits", "group", "sym", "bits/weight", "size MiB",
        *(h for h, _ in columns),
        *(f"Δ {name} ppl vs fp %" for name in ppl_sets),
        *(["published", "Δ vs published %"] if published else []),
        "quantize s", "device", "peak RSS GiB", "peak GPU GiB",
    ]  # fmt: skip
    rows = []
    for r in ok:
        values = [metric_value(r["metrics"], path) for _, path in columns]
        fp = _full_precision_ppl(r, ok)
        deltas = []
        for name in ppl_sets:
            ppl = r["metrics"].get("ppl", {}).get(name)
            deltas.append(None if ppl is None or not fp.get(name) else 100 * (ppl / fp[name] - 1))
        theirs = []
        if published:
            metric, value = published_value(r) or (None, None)
            ours = metric_value(r["metrics"], tuple(metric.split("."))) if metric else None
            theirs = [value, None if ours is None or value is None else 100 * (ours / value - 1)]
        quant = (r.get("timings") or {}).get("quantize_s")
        mem = r.get("memory") or {}
        rss, gpu = mem.get("peak_rss_bytes"), mem.get("peak_gpu_bytes")
        rows.append(
            [*_label(r), bits_per_weight(r), model_mib(r), *values, *deltas, *theirs, quant, _device(r),
             rss / 2**30 if rss else None, gpu / 2**30 if gpu else None]
        )  # fmt: skip
    return header, rows, failed


def _cell(header: str, value) -> str:
    if value is None:
        return "—"
    if isinstance(value, str) or isinstance(value, bool):
        return str(value)
    if header.startswith("Δ"):
        return f"{value:+.1f}%" if abs(value) < 1e4 else f"{value:+.2g}%"
    if header in ("quantize s", "size MiB"):
        return f"{value:.1f}"
    if header == "bits/weight":
        return f"{value:.2f}"
    if header == "published":
        return f"{value:.4g}"
    if isinstance(value, float):
        return f"{value:.2f}" if header.endswith("ppl") or "ppl (" in header or value > 1 else f"{value:.3f}"
    return str(value)


def markdown_table(records: list[dict]) -> str:
    header, rows, failed = table(records)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(h, v) for h, v in zip(header, row, strict=True)) + " |")
    for r in failed:  # listed, never dropped
        lines.append(f"| failed: {r.get('error', '?')[:80]} ({r['_path']}) |")
    return "\n".join(lines)


def write_csv(records: list[dict], path: Path) -> None:
    """The same table with raw numbers (empty where a metric is missing), failed runs as rows too."""
    header, rows, failed = table(records)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*header, "status", "error"])
        for row in rows:
            writer.writerow([*("" if v is None else v for v in row), "ok", ""])
        for r in failed:
            writer.writerow([*[""] * len(header), "failed", f"{r.get('error', '?')} ({r['_path']})"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--out", help="also write <out>/report.md, <out>/report.csv and the plots (PNG)")
    parser.add_argument("--no-plots", action="store_true", help="with --out: tables only")
    args = parser.parse_args(argv)
    records = find_records(args.paths)
    if not records:
        parser.error(f"no result.json or error.json found in {' '.join(args.paths)}")
    text = markdown_table(records)
    print(text)
    if args.out:
        from ptq.plots import write_plots

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(text + "\n")
        write_csv(records, out / "report.csv")
        for path in [] if args.no_plots else write_plots(records, out):
            print(f"plot: {path}")


if __name__ == "__main__":
    main()
