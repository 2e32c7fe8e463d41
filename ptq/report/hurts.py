"""Where quantization hurts: per-example losses of a run (``eval.per_example=true``) against the
full-precision model's on the same windows.

``python -m ptq.report --where-it-hurts <runs> [--out DIR] [--top N]`` prints, per run and text: the windows
whose mean loss rose most (where they start in the text, how they begin), the distribution of the rise
(quantiles, the share of windows that got worse), and the rise by position in the window (does the damage
grow with context?); with ``--out`` also ``where_it_hurts.md`` and two plots: a histogram of the rise per
window and the rise against position, one line per run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ptq.report.console import run_label

QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


class MissingPerExample(ValueError):
    pass


def pairs(record: dict) -> dict[str, tuple[dict, dict]]:
    """{text: (quantized per-example losses, full-precision ones)} of a record."""
    ours = (record.get("metrics") or {}).get("per_example")
    base = ((record.get("baseline") or {}).get("metrics") or {}).get("per_example")
    if not ours or not base:
        raise MissingPerExample(
            f"{record.get('_path', 'a record')} has no per-example losses for both the quantized and the "
            "full-precision model: run with eval.per_example=true and eval.baseline=true"
        )
    return {name: (ours[name], base[name]) for name in ours if name in base}


def analysis(quantized: dict, full: dict, top: int) -> dict:
    rise = torch.tensor(quantized["window_nll"]) - torch.tensor(full["window_nll"])
    order = torch.argsort(rise, descending=True)[:top].tolist()
    worst = [
        {"window": i, "start_token": quantized["window_start"][i], "fp_nll": full["window_nll"][i],
         "nll": quantized["window_nll"][i], "rise": rise[i].item(),
         "text": (quantized.get("window_text") or [""] * len(rise))[i]}
        for i in order
    ]  # fmt: skip
    by_position = (torch.tensor(quantized["position_nll"]) - torch.tensor(full["position_nll"])).tolist()
    return {
        "windows": len(rise),
        "worse_share": (rise > 0).float().mean().item(),
        "quantiles": {q: torch.quantile(rise, q).item() for q in QUANTILES},
        "worst": worst,
        "position_bucket": quantized["position_bucket"],
        "rise_by_position": by_position,
        "rise": rise.tolist(),
    }


def where_it_hurts(records: list[dict], top: int) -> tuple[str, dict]:
    lines, results = [], {}
    for record in records:
        label = run_label(record)
        for name, (quantized, full) in pairs(record).items():
            a = analysis(quantized, full, top)
            results[(label, name)] = a
            quantiles = ", ".join(f"{int(q * 100)}%: {v:+.3f}" for q, v in a["quantiles"].items())
            lines += [
                f"### {label}: {name}",
                "",
                f"{a['windows']} windows; the loss rose on {a['worse_share']:.0%} of them. Rise in mean NLL per "
                f"window (nats), quantiles: {quantiles}.",
                "",
                "| window | starts at token | fp NLL | NLL | rise | begins with |",
                "|---|---|---|---|---|---|",
            ]
            for w in a["worst"]:
                text = w["text"].replace("|", "\\|")
                lines.append(f"| {w['window']} | {w['start_token']} | {w['fp_nll']:.3f} | {w['nll']:.3f} | "
                             f"{w['rise']:+.3f} | {text} |")  # fmt: skip
            rises = torch.tensor(a["rise_by_position"])
            span = a["position_bucket"] * -(-len(rises) // 8)  # eight ranges of context length
            merged = torch.nn.functional.pad(rises, (0, -len(rises) % 8), value=float("nan")).reshape(8, -1)
            cells = [f"{i * span}–{(i + 1) * span - 1}: {v:+.3f}" for i, v in enumerate(merged.nanmean(1).tolist())]
            lines += ["", f"Rise in mean NLL by position in the window (tokens of context): {'; '.join(cells)}.", ""]
    return "\n".join(lines), results


def where_it_hurts_plots(results: dict, out: Path) -> list[Path]:
    from ptq.report.plots import _figure, _save

    plt, fig, axes = _figure(2)
    hist, position = axes[0]
    every = [r for a in results.values() for r in a["rise"]]
    bins = torch.linspace(min(every, default=0.0), max(every, default=1.0), 41).tolist()  # shared by all runs
    for (label, name), a in results.items():
        hist.hist(a["rise"], bins=bins, alpha=0.5, label=f"{label} ({name})")
        b = a["position_bucket"]
        xs = [(i + 0.5) * b for i in range(len(a["rise_by_position"]))]
        position.plot(xs, a["rise_by_position"], marker=".", label=f"{label} ({name})")
    hist.set(xlabel="rise in mean NLL per window (nats)", ylabel="windows", title="Where it hurts: per window")
    position.axhline(0, color="grey", lw=0.5)
    position.set(xlabel="position in the window (tokens of context)", ylabel="rise in mean NLL (nats)",
                 title="Where it hurts: by context length")  # fmt: skip
    for ax in (hist, position):
        ax.legend(fontsize=7)
    path = _save(plt, fig, out / "where_it_hurts.png", [bool(results)])
    return [path] if path else []
