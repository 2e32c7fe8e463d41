"""The short table a run prints when it finishes: its scores beside the full-precision baseline."""

from __future__ import annotations

from ptq.report.records import aqlm_codebooks, format_name, kv_suffix, method_label, metric_columns, metric_value


def run_label(record: dict) -> str:
    """rtn w4 g128 asym, rtn w8a8 (per_token) per-channel sym; other number formats are named:
    rtn nvfp4 g16 sym, rtn nvfp4 w4a4 (per_block) g16 sym."""
    if record["method"] == "none":
        return "full precision"
    if aqlm_codebooks(record):
        return f"{method_label(record)} (bits={record['bits']} nominal)"
    group_size = record["group_size"]
    group = "per-channel" if group_size == -1 else "per-tensor" if group_size == 0 else f"g{group_size}"
    widths = f"w{record['bits']}"
    if record.get("act_bits"):
        widths += f"a{record['act_bits']} ({record['act_granularity']})"
    if record.get("kv_bits"):
        widths += f" {kv_suffix(record)}"
    formats = format_name(record)
    if formats and not record.get("act_bits") and not record.get("kv_bits"):
        scheme = formats
    else:
        scheme = f"{formats} {widths}" if formats else widths
    return f"{record['method']} {scheme} {group} {'sym' if record['sym'] else 'asym'}"


def console_table(record: dict) -> str:
    cols = metric_columns([record["metrics"]])
    widths = [max(10, len(h)) for h, _ in cols]
    label = run_label(record)
    first = max(28, len(label))
    rows = [f"{'':{first}} " + " ".join(f"{h:>{w}}" for (h, _), w in zip(cols, widths, strict=True))]

    def number(v) -> str:  # perplexities with 3 decimals, accuracies with 4, huge values in exponent form
        if v is None:
            return "—"
        return f"{v:.4g}" if abs(v) >= 1e5 else f"{v:.3f}" if abs(v) >= 1 else f"{v:.4f}"

    def row(label: str, metrics: dict) -> str:
        values = [number(metric_value(metrics, path)) for _, path in cols]
        return f"{label:{first}} " + " ".join(f"{v:>{w}}" for v, w in zip(values, widths, strict=True))

    base = (record.get("baseline") or {}).get("metrics")
    if base:
        rows.append(row("full precision", base))
    rows.append(row(label, record["metrics"]))
    t = record["timings"]
    mem = record["memory"]
    gpu = f", peak GPU {mem['peak_gpu_bytes'] / 2**30:.2f} GiB" if mem["peak_gpu_bytes"] else ""
    rows.append(
        f"ppl: GPTQ-protocol token perplexity ({record['eval']['seqlen']}-token windows); "
        f"quantize {t['quantize_s']:.1f} s, eval {t['eval_s']:.1f} s, total {t['total_s']:.1f} s; "
        f"peak RSS {mem['peak_rss_bytes'] / 2**30:.2f} GiB{gpu}"
    )
    notes = {task: s["note"] for task, s in (record["metrics"].get("tasks") or {}).items() if s.get("note")}
    rows += [f"{task}: {note}" for task, note in notes.items()]
    return "\n".join(rows)
