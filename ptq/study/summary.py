"""``summary.md`` of a precision-scaling study: its findings as Markdown tables, computed from the point records
and fit.json (``python -m ptq.study fit`` writes it beside them; nothing in it is typed by hand).

    the fitted law       kumar-form parameters per method, in log and linear space, with bootstrap intervals
    does D matter        R² of the law with and without the D term
    data or repetition   local slopes d log δ / d log D inside the first epoch and beyond it
    schedules            γ_D with a constant learning rate and with warmup-stable-decay; δ(wsd) / δ(constant)
    low-precision arms   δ of checkpoints trained with fake-quantized weights, beside the bf16-trained ones
"""

from __future__ import annotations

import math
from collections import defaultdict
from statistics import median

METHOD_ORDER = ("rtn", "gptq", "awq", "pooled")


def _ci(entry: dict, name: str) -> str:
    low, high = entry["intervals"].get(name, (None, None))
    fmt = "{:.3g}".format
    return f"{fmt(entry['params'][name])} [{'∞' if low is None else fmt(low)}, {'∞' if high is None else fmt(high)}]"


def _groups(mapping: dict) -> list[str]:
    return sorted(mapping, key=lambda g: (METHOD_ORDER.index(g) if g in METHOD_ORDER else 99, g))


def law_table(fit: dict) -> list[str]:
    lines = [
        "| method | space | C_T | γ_D | γ_N | γ_post | R² | points (left out) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for group in _groups(fit["fits"]):
        for space, entry in fit["fits"][group]["kumar"].items():
            if "skipped" in entry:
                lines.append(f"| {group} | {space} | skipped: {entry['skipped']} | | | | | |")
                continue
            lines.append(
                f"| {group} | {space} | {_ci(entry, 'C_T')} | {_ci(entry, 'gamma_D')} | {_ci(entry, 'gamma_N')} | "
                f"{_ci(entry, 'gamma_post')} | {entry['r2']:.3f} | {entry['n_points']} ({entry['n_excluded']}) |"
            )
    paper = fit["paper"]
    lines.append(
        f"| paper (as cited) | | {paper['C_T']} | {paper['gamma_D']} | {paper['gamma_N']} | {paper['gamma_post']} | | |"
    )
    return lines


def forms_table(fit: dict) -> list[str]:
    lines = ["| method | R², kumar (N, D, P) | R², ratio (D/N, P) | R², no_data (N, P only) |", "|---|---|---|---|"]
    for group in _groups(fit["fits"]):
        r2 = [fit["fits"][group].get(form, {}).get("log", {}).get("r2") for form in ("kumar", "ratio", "no_data")]
        lines.append(f"| {group} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in r2) + " |")
    return lines


def _int_points(records: list[dict], p_train=None) -> list[dict]:
    return [r for r in records if r.get("format") == "int" and r["checkpoint"].get("p_train") == p_train]


def epoch_slopes(records: list[dict], bits=(3, 4)) -> list[str]:
    """d log δ / d log D between neighbouring budgets of the same model, method, bits and schedule, split by whether
    both checkpoints saw each training token at most once."""
    series = defaultdict(list)
    for r in _int_points(records):
        c = r["checkpoint"]
        if r["bits"] in bits and r["metrics"]["delta_loss"] > 0:
            key = (r["method"], r["bits"], c["n_params"], c["schedule"])
            series[key].append((c["tokens"], c.get("epochs") or 0.0, r["metrics"]["delta_loss"]))
    slopes = {"first epoch": [], "repeated data": []}
    for points in series.values():
        points.sort()
        for (d0, e0, v0), (d1, e1, v1) in zip(points, points[1:], strict=False):
            part = "first epoch" if max(e0, e1) <= 1 else "repeated data"
            slopes[part].append(math.log(v1 / v0) / math.log(d1 / d0))
    lines = ["| budgets | pairs | median slope | range |", "|---|---|---|---|"]
    for part, values in slopes.items():
        if values:
            lines.append(f"| {part} | {len(values)} | {median(values):.3f} | {min(values):.3f} .. {max(values):.3f} |")
    return lines


def schedule_table(records: list[dict], fit: dict) -> list[str]:
    by = fit.get("by_schedule") or {}
    if len(by) < 2:
        return []
    schedules = sorted(by)
    lines = ["| method | " + " | ".join(f"γ_D, {s}" for s in schedules) + " |", "|---|" + "---|" * len(schedules)]
    for group in _groups(by[schedules[0]]):
        cells = [_ci(by[s][group], "gamma_D") if "params" in by[s].get(group, {}) else "-" for s in schedules]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    # δ(wsd) / δ(constant) at each budget, over sizes, methods and the 3- and 4-bit grids
    pairs = defaultdict(dict)
    for r in _int_points(records):
        c = r["checkpoint"]
        if r["bits"] in (3, 4):
            pairs[(r["method"], r["bits"], c["n_params"], c.get("budget") or c["tokens"])][c["schedule"]] = r
    ratios = defaultdict(list)
    for (_, _, _, _), arms in pairs.items():
        if {"wsd", "constant"} <= set(arms) and arms["constant"]["metrics"]["delta_loss"] > 0:
            tokens = arms["constant"]["checkpoint"]["tokens"]
            ratios[tokens].append(arms["wsd"]["metrics"]["delta_loss"] / arms["constant"]["metrics"]["delta_loss"])
    if ratios:
        lines += ["", "| training tokens | δ(wsd) / δ(constant), median over sizes, methods, 3 and 4 bits | pairs |",
                  "|---|---|---|"]  # fmt: skip
        for tokens in sorted(ratios):
            lines.append(f"| {tokens / 1e6:.0f}M | {median(ratios[tokens]):.2f} | {len(ratios[tokens])} |")
    return lines


def low_precision_table(records: list[dict]) -> list[str]:
    """RTN δ of the checkpoints with low-precision arms, at each arm's largest budget."""
    arms = {r["checkpoint"]["p_train"] for r in records if r["checkpoint"].get("p_train") is not None}
    if not arms:
        return []
    sizes = {r["checkpoint"]["size"] for r in records if r["checkpoint"].get("p_train") is not None}
    rows = defaultdict(dict)
    for r in records:
        c = r["checkpoint"]
        if c.get("size") in sizes and r["method"] == "rtn":
            rows[(c["size"], c["schedule"], c["p_train"], c["tokens"])][f"{r['format']}{r['bits']}"] = r["metrics"]
    columns = [("int3", "int3"), ("int4", "int4"), ("int5", "int5"), ("int6", "int6"), ("nvfp44", "nvfp4")]
    lines = [
        "| size | schedule | trained with | tokens | loss, unquantized | "
        + " | ".join(f"δ {label}" for _, label in columns)
        + " | loss after int4 |",
        "|---|---|---|---|---|" + "---|" * len(columns) + "---|",
    ]
    largest = max(key[3] for key in rows)
    for key in sorted(rows, key=lambda k: (k[0], k[1], -(k[2] or 99), k[3])):
        size, schedule, p_train, tokens = key
        if tokens != largest:
            continue
        cells = rows[key]
        loss = next(iter(cells.values()))["val_loss_fp"]
        deltas = [f"{cells[c]['delta_loss']:.4f}" if c in cells else "-" for c, _ in columns]
        after = f"{loss + cells['int4']['delta_loss']:.4f}" if "int4" in cells else "-"
        trained = "bf16" if p_train is None else f"int{p_train} weights (STE)"
        lines.append(
            f"| {size} | {schedule} | {trained} | {tokens / 1e6:.0f}M | {loss:.4f} | "
            + " | ".join(deltas)
            + f" | {after} |"
        )
    return lines


def write_summary(records: list[dict], fit: dict, path) -> None:
    sections = [
        (f"# Precision-scaling study `{fit.get('study', '')}`", [f"{len(records)} point records; fit.json beside."]),
        ("## The fitted law δ = C_T · D^γ_D / N^γ_N · exp(−P/γ_post) (95% bootstrap intervals)", law_table(fit)),
        ("## Does the amount of training data matter? (log space)", forms_table(fit)),
        ("## Data or repetition: local slopes d log δ / d log D (3 and 4 bits, bf16-trained)", epoch_slopes(records)),
        ("## Learning-rate schedule", schedule_table(records, fit)),
        ("## Low-precision training (RTN after training, largest budget)", low_precision_table(records)),
    ]
    text = []
    for title, lines in sections:
        if lines:
            text += [title, "", *lines, ""]
    path.write_text("\n".join(text))
