"""Plots of the precision-scaling study (PNG, matplotlib), from its point records and the content of fit.json.

    delta_vs_tokens.png   δ against training tokens D (log-log): a panel per bit width, a row per method, a color per
                          model size N, the method's fitted kumar law as lines
    delta_vs_bits.png     δ against P_post (log δ): a panel per method, the points of each N at its largest D and the
                          fitted law there
    exponents.png         the fitted kumar exponents (log space) of each method and pooled, with their bootstrap
                          intervals, beside the paper's
    schedule.png          δ against D with each learning-rate schedule's own fit (when there is more than one)

The points are those of the main fits: integer format, checkpoints trained in full precision. A δ at or below the
fit's floor (measurement noise, possibly negative) is drawn hollow at the floor.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ptq.study.fit import EXPONENTS, PAPER, Point, kumar, points_from_records

MARKERS = "osD^v<>p*"
LINESTYLES = ["-", "--", ":", "-."]
HOLLOW = "hollow: δ ≤ floor, drawn at the floor"


def _figure(cols: int, rows: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 4.0 * rows), squeeze=False)
    return plt, fig, axes


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def methods_in(points: list[Point]) -> list[str]:
    """The methods of the points, rtn first, then in order of appearance."""
    return sorted(dict.fromkeys(p.method for p in points), key=lambda m: m != "rtn")


def schedules_in(points: list[Point]) -> list[str]:
    """The schedules of the points, constant first."""
    return sorted({p.schedule for p in points}, key=lambda s: (s != "constant", s))


def kumar_params(entry: dict | None) -> dict[str, float] | None:
    """A fit entry's kumar parameters (null gamma_post: unbounded), or None when the fit was skipped or is absent."""
    if not entry or "params" not in entry:
        return None
    params = entry["params"]
    if any(params.get(name) is None for name in ("C_T", "gamma_D", "gamma_N")):
        return None
    return params | {"gamma_post": params.get("gamma_post") or math.inf}


def main_fit(fit: dict, group: str) -> dict | None:
    return fit.get("fits", {}).get(group, {}).get("kumar", {}).get("log")


def _measured(ax, points: list[Point], x_of, floor: float, color: str, marker: str) -> bool:
    """Points as markers; those at or below the floor hollow at the floor. Returns whether any was hollow."""
    above = [p for p in points if p.delta > floor]
    below = [p for p in points if p.delta <= floor]
    ax.plot([x_of(p) for p in above], [p.delta for p in above], marker=marker, color=color, linestyle="none")
    if below:
        xs = [x_of(p) for p in below]
        ax.plot(xs, [floor] * len(xs), marker=marker, color=color, markerfacecolor="none", linestyle="none")
    return bool(below)


def _size_label(n_params: float) -> str:
    return f"N = {n_params / 1e6:.3g}M"


def _mantissa(v: float) -> int:
    return round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0


def _style_axes(ax, xlabel: str, title: str, floor: float, log_x: bool) -> None:
    from matplotlib.ticker import FuncFormatter

    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}".replace("e+0", "e")))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))  # 3e7 4e7 ... would overlap
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.001, not 10^-3
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if _mantissa(v) in (2, 5) else ""))
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, floor / 3), high)  # a fitted line far below the floor would squeeze the points
    ax.set_xlabel(xlabel)
    ax.set_ylabel("δ = loss increase from PTQ (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)


def _legend(
    ax, sizes: dict[int, str], schedules: list[str], hollow: bool, fitted: str | None, schedule_lines: bool = False
) -> None:
    """One entry per model size (color index -> label), schedule (marker, and line style when each schedule has its
    own line) when several, the fitted law, the floor."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=f"C{i % 10}", marker="o", label=label) for i, label in sizes.items()]
    if len(schedules) > 1:
        handles += [
            Line2D(
                [],
                [],
                color="gray",
                marker=MARKERS[i],
                linestyle=LINESTYLES[i % 4] if schedule_lines else "none",
                label=s,
            )
            for i, s in enumerate(schedules)
        ]
    if fitted:
        handles.append(Line2D([], [], color="gray", label=fitted))
    if hollow:
        handles.append(Line2D([], [], color="gray", marker="o", markerfacecolor="none", linestyle="none", label=HOLLOW))
    ax.legend(handles=handles, fontsize=7)


def _delta_vs_tokens(points: list[Point], fit: dict, path: Path) -> Path | None:
    methods, bits = methods_in(points), sorted({p.bits for p in points})
    sizes, schedules, floor = sorted({p.n_params for p in points}), schedules_in(points), fit.get("floor", 1e-4)
    plt, fig, axes = _figure(len(bits), len(methods))
    for method, row in zip(methods, axes, strict=True):
        params, hollow = kumar_params(main_fit(fit, method)), False
        for b, ax in zip(bits, row, strict=True):
            panel = [p for p in points if p.method == method and p.bits == b]
            if not panel:  # this method was not measured at this width
                ax.axis("off")
                continue
            for i, n in enumerate(sizes):
                for j, schedule in enumerate(schedules):
                    mine = [p for p in panel if p.n_params == n and p.schedule == schedule]
                    hollow |= _measured(ax, mine, lambda p: p.tokens, floor, f"C{i % 10}", MARKERS[j])
                if params and panel:
                    grid = np.geomspace(min(p.tokens for p in panel), max(p.tokens for p in panel), 50)
                    ax.plot(grid, kumar(params, n, grid, b), color=f"C{i % 10}", linewidth=1)
            _style_axes(ax, "training tokens D", f"{method}, int{b:g}", floor, log_x=True)
        labels = {i: _size_label(n) for i, n in enumerate(sizes)}
        _legend(row[0], labels, schedules, hollow, f"kumar law fitted to {method}" if params else None)
    return _save(plt, fig, path)


def _delta_vs_bits(points: list[Point], fit: dict, path: Path) -> Path | None:
    methods, sizes, schedules = methods_in(points), sorted({p.n_params for p in points}), schedules_in(points)
    floor = fit.get("floor", 1e-4)
    plt, fig, axes = _figure(len(methods))
    for method, ax in zip(methods, axes[0], strict=True):
        params = kumar_params(main_fit(fit, method))
        hollow, labels = False, {}
        for i, n in enumerate(sizes):
            mine = [p for p in points if p.method == method and p.n_params == n]
            if not mine:
                continue
            largest = max(p.tokens for p in mine)
            labels[i] = f"{_size_label(n)}, D = {largest / 1e6:.3g}M"
            for j, schedule in enumerate(schedules):
                at_largest = [p for p in mine if p.tokens == largest and p.schedule == schedule]
                hollow |= _measured(ax, at_largest, lambda p: p.bits, floor, f"C{i % 10}", MARKERS[j])
            if params:
                grid = np.linspace(min(p.bits for p in mine), max(p.bits for p in mine), 50)
                ax.plot(grid, kumar(params, n, largest, grid), color=f"C{i % 10}", linewidth=1)
        _style_axes(ax, "P_post (bits of the integer grid)", f"{method}: each N at its largest D", floor, log_x=False)
        _legend(ax, labels, schedules, hollow, f"kumar law fitted to {method}" if params else None)
    return _save(plt, fig, path)


def _exponents(fit: dict, path: Path) -> Path | None:
    groups = [g for g in fit.get("fits", {}) if kumar_params(main_fit(fit, g))]
    if not groups:
        return None
    plt, fig, axes = _figure(len(EXPONENTS))
    for name, ax in zip(EXPONENTS, axes[0], strict=True):
        for x, group in enumerate(groups):
            entry = main_fit(fit, group)
            value = entry["params"][name]
            low, high = entry["intervals"][name]
            if value is None:
                ax.annotate("unbounded", (x, ax.get_ylim()[1]), ha="center", fontsize=7)
                continue
            below = value - low if low is not None else 0.0
            above = high - value if high is not None else 0.0
            ax.errorbar([x], [value], yerr=[[below], [above]], marker="o", color=f"C{x % 10}", capsize=4)
            if high is None:
                ax.annotate("↑ unbounded", (x, value), textcoords="offset points", xytext=(6, 6), fontsize=7)
        ax.plot([len(groups)], [PAPER[name]], marker="*", markersize=14, color="black", linestyle="none")
        ax.set_xticks(range(len(groups) + 1), [*groups, "paper"])
        ax.set_xlim(-0.5, len(groups) + 0.5)
        ax.set_title(f"{name} (kumar law, log space, {fit.get('level', 0.95):.0%} bootstrap intervals)", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    return _save(plt, fig, path)


def _schedule(points: list[Point], fit: dict, path: Path) -> Path | None:
    schedules = schedules_in(points)
    if len(schedules) < 2:
        return None
    method = methods_in(points)[0]
    points = [p for p in points if p.method == method]
    bits, sizes, floor = sorted({p.bits for p in points}), sorted({p.n_params for p in points}), fit.get("floor", 1e-4)
    plt, fig, axes = _figure(len(bits))
    hollow = False
    for b, ax in zip(bits, axes[0], strict=True):
        panel = [p for p in points if p.bits == b]
        for j, schedule in enumerate(schedules):
            params = kumar_params(fit.get("by_schedule", {}).get(schedule, {}).get(method))
            for i, n in enumerate(sizes):
                mine = [p for p in panel if p.n_params == n and p.schedule == schedule]
                hollow |= _measured(ax, mine, lambda p: p.tokens, floor, f"C{i % 10}", MARKERS[j])
                if params and mine:
                    grid = np.geomspace(min(p.tokens for p in mine), max(p.tokens for p in mine), 50)
                    ax.plot(grid, kumar(params, n, grid, b), color=f"C{i % 10}", linestyle=LINESTYLES[j % 4])
        _style_axes(ax, "training tokens D", f"{method}, int{b:g}: each schedule's own fit", floor, log_x=True)
    labels = {i: _size_label(n) for i, n in enumerate(sizes)}
    _legend(axes[0][0], labels, schedules, hollow, "lines: each schedule's kumar fit", schedule_lines=True)
    return _save(plt, fig, path)


def write_study_plots(records: list[dict], fit: dict, out_dir: str | Path) -> list[Path]:
    """Write every study plot the records and the fit support into ``out_dir``; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = points_from_records(records, p_train=None)
    written = [_exponents(fit, out / "exponents.png")]
    if points:
        written += [
            _delta_vs_tokens(points, fit, out / "delta_vs_tokens.png"),
            _delta_vs_bits(points, fit, out / "delta_vs_bits.png"),
            _schedule(points, fit, out / "schedule.png"),
        ]
    return [p for p in written if p is not None]
