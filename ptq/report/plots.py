"""Plots from run records (PNG, matplotlib): what each method's quality costs in bits and memory.

    quality_vs_bits.png     perplexity vs effective bits per weight, one line per method and number format,
                            a panel per model
    tasks_vs_bits.png       each lm-eval task's accuracy vs effective bits (when records have task scores)
    quality_vs_memory.png   perplexity vs model size as a GPTQ checkpoint would store it
    formats.png             perplexity of each method in each number format, as bars (when records hold
                            more than one format)

Full precision is drawn as a dashed line at its score (its 16 bits would squeeze the x axis).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ptq.report.records import (
    aqlm_codebooks,
    bits_label,
    bits_per_weight,
    format_name,
    group_label,
    method_label,
    metric_value,
    model_mib,
    successful_with_full_precision,
)

MARKERS = "osD^v<>p*"


def line_name(r: dict) -> str:
    """One line per method, number formats, group size and activation granularity: the bits vary along it."""
    group = r.get("group_size")
    name = method_label(r)
    if format_name(r):
        name += f" {format_name(r)}"
    if aqlm_codebooks(r):  # its groups are in the method's label
        return name
    name += " per-channel" if group in (None, -1) else " per-tensor" if group == 0 else f" g{group}"
    if r.get("act_bits"):
        name += f" {r['act_granularity'].replace('_', '-')}"
    return name


def _series(rows: list[dict], metric: tuple[str, ...], x_of) -> dict[str, list[tuple[float, float]]]:
    """Quantized runs grouped into lines: line name -> [(x, y)]."""
    lines: dict[str, list] = defaultdict(list)
    for r in rows:
        x, y = x_of(r), metric_value(r["metrics"], metric)
        if r["method"] == "none" or x is None or y is None:
            continue
        lines[line_name(r)].append((x, y))
    return {k: sorted(v) for k, v in lines.items()}


def _full_precision(rows: list[dict], metric: tuple[str, ...]) -> dict | None:
    for r in rows:
        if r["method"] == "none" and metric_value(r["metrics"], metric) is not None:
            return r
    return None


def _panel(ax, rows, metric, x_of, xlabel, ylabel, title, log_y, fp_as_point=False) -> bool:
    lines = _series(rows, metric, x_of)
    if not lines:
        return False
    for i, (name, points) in enumerate(sorted(lines.items())):
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker=MARKERS[i % len(MARKERS)], label=name)
    fp_row = _full_precision(rows, metric)
    if fp_row is not None:
        fp = metric_value(fp_row["metrics"], metric)
        label = f"full precision ({fp:.4g})"
        if fp_as_point and x_of(fp_row) is not None:
            ax.plot([x_of(fp_row)], [fp], marker="*", markersize=12, color="black", linestyle="none", label=label)
        else:
            ax.axhline(fp, color="black", linestyle="--", linewidth=1, label=label)
    if log_y:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 130, not 1.3 x 10^2
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if len(lines) > 6:  # many lines: the legend beside the axes, not over the points
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)
    return True


def _figure(panels: int, rows: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, panels, figsize=(5.5 * panels, 4.2 * rows), squeeze=False)
    return plt, fig, axes


def _save(plt, fig, path: Path, used: list[bool]) -> Path | None:
    if not any(used):
        plt.close(fig)
        return None
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


BITS = "effective bits per weight (all that is stored)"


def scheme_name(r: dict) -> str:
    """A bar group's name: the formats and widths (bits column) and the scale granularity."""
    bits, group = bits_label(r), group_label(r)
    bits = f"int{bits}" if isinstance(bits, int) else str(bits)
    group = {"channel": "per-channel", "tensor": "per-tensor"}.get(group, group)
    return f"{bits}\n{'' if isinstance(group, str) else 'g'}{group}"


def _format_bars(ax, rows: list[dict], metric: tuple[str, ...], title: str) -> bool:
    """Grouped bars: one group per scheme (in report order), one bar per method, log-scale perplexity."""
    quantized = [r for r in rows if r["method"] != "none" and metric_value(r["metrics"], metric) is not None]
    schemes = list(dict.fromkeys(scheme_name(r) for r in quantized))
    methods = list(dict.fromkeys(method_label(r) for r in quantized))
    if len(schemes) < 2:
        return False
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = {scheme_name(r): metric_value(r["metrics"], metric) for r in quantized if method_label(r) == method}
        xs = [j + (i - (len(methods) - 1) / 2) * width for j, s in enumerate(schemes) if s in values]
        ax.bar(xs, [values[s] for s in schemes if s in values], width, label=method)
    fp_row = _full_precision(rows, metric)
    if fp_row is not None:
        fp = metric_value(fp_row["metrics"], metric)
        ax.axhline(fp, color="black", linestyle="--", linewidth=1, label=f"full precision ({fp:.4g})")
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xticks(range(len(schemes)), schemes, fontsize=8)
    ax.set_ylabel(f"{metric[1]} perplexity (log scale, lower is better)")
    ax.set_title(title)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return True


def write_plots(records: list[dict], out: Path) -> list[Path]:
    """Write every plot the records support into ``out``; returns the files written."""
    rows = successful_with_full_precision(records)
    models = sorted({r["model"] for r in rows})
    ppl_sets = sorted({name for r in rows for name in (r["metrics"].get("ppl") or {})})
    written = []
    for ppl_set in ppl_sets[:1]:  # the first perplexity set (wikitext2 when present)
        metric = ("ppl", ppl_set)
        ylabel = f"{ppl_set} perplexity (log scale, lower is better)"
        plt, fig, axes = _figure(len(models))
        used = [
            _panel(ax, [r for r in rows if r["model"] == m], metric, bits_per_weight, BITS, ylabel, m, True)
            for ax, m in zip(axes[0], models, strict=True)
        ]
        written.append(_save(plt, fig, out / "quality_vs_bits.png", used))
        plt, fig, axes = _figure(len(models))
        used = [
            _panel(
                ax, [r for r in rows if r["model"] == m], metric, model_mib,
                "model size as stored (MiB; 16-bit embeddings and norms)", ylabel, m, True, fp_as_point=True,
            )
            for ax, m in zip(axes[0], models, strict=True)
        ]  # fmt: skip
        written.append(_save(plt, fig, out / "quality_vs_memory.png", used))
        if len({(r.get("format"), r.get("act_format")) for r in rows if r["method"] != "none"}) > 1:
            plt, fig, axes = _figure(1, len(models))
            schemes = {scheme_name(r) for r in rows if r["method"] != "none"}
            fig.set_size_inches(max(8.0, 1.3 * len(schemes)), 4.5 * len(models))
            used = [
                _format_bars(ax, [r for r in rows if r["model"] == m], metric, m)
                for ax, m in zip(axes[:, 0], models, strict=True)
            ]
            written.append(_save(plt, fig, out / "formats.png", used))
    tasks = sorted({t for r in rows for t, s in (r["metrics"].get("tasks") or {}).items() if "acc" in s})
    if tasks:  # a row of panels per model, a panel per task
        plt, fig, axes = _figure(len(tasks), len(models))
        used = []
        for model, axes_row in zip(models, axes, strict=True):
            subset = [r for r in rows if r["model"] == model]
            for ax, task in zip(axes_row, tasks, strict=True):
                metric = ("tasks", task, "acc")
                used.append(_panel(ax, subset, metric, bits_per_weight, BITS, "accuracy", f"{model}: {task}", False))
        written.append(_save(plt, fig, out / "tasks_vs_bits.png", used))
    return [p for p in written if p is not None]
