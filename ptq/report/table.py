"""The comparison table of run records, as Markdown and as CSV."""

from __future__ import annotations

import csv
from pathlib import Path

from ptq.report.records import (
    bits_per_weight,
    full_precision_ppl,
    label,
    metric_columns,
    metric_value,
    model_mib,
    published_value,
    successful_with_full_precision,
)


def device_name(r: dict) -> str:
    env = r.get("env") or {}
    if str(env.get("device", "")).startswith("cuda"):
        return (env.get("device_name") or "GPU").replace("NVIDIA ", "")
    return f"CPU ×{env['cpu_threads']}" if env.get("cpu_threads") else "CPU"


def table_rows(records: list[dict]) -> tuple[list[str], list[list], list[dict]]:
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
        fp = full_precision_ppl(r, ok)
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
            [*label(r), bits_per_weight(r), model_mib(r), *values, *deltas, *theirs, quant, device_name(r),
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
    header, rows, failed = table_rows(records)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(h, v) for h, v in zip(header, row, strict=True)) + " |")
    for r in failed:  # listed, never dropped
        lines.append(f"| failed: {r.get('error', '?')[:80]} ({r['_path']}) |")
    return "\n".join(lines)


def write_csv(records: list[dict], path: Path) -> None:
    """The same table with raw numbers (empty where a metric is missing), failed runs as rows too."""
    header, rows, failed = table_rows(records)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*header, "status", "error"])
        for row in rows:
            writer.writerow([*("" if v is None else v for v in row), "ok", ""])
        for r in failed:
            writer.writerow([*[""] * len(header), "failed", f"{r.get('error', '?')} ({r['_path']})"])
