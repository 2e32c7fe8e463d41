"""Fit the loss that post-training quantization adds to the study's models: the δ_PTQ term of Kumar et al., 2024,
"Scaling Laws for Precision" (arXiv 2411.04330). For a model of N non-embedding parameters trained in high
precision on D tokens and quantized to P_post bits (their δ_PTQ with P_train large, where the P_train factor is 1):

    δ_PTQ(N, D, P_post) = C_T · D^γ_D / N^γ_N · exp(−P_post / γ_post)

Every law form fitted here is linear in log space, log δ = log C_T + γ_D log D − γ_N log N − P_post / γ_post, so
the solver works with θ = (log C_T, the exponents, 1/γ_post): C_T stays positive, the log-space residuals are
linear in θ (the linear regression that starts the solver is already their least-squares answer), and a δ that does
not depend on the bits (γ_post → ∞) is the finite point 1/γ_post = 0.

In log space every point counts by its relative error; points with δ at or below ``floor`` are below the measurement
noise (δ can be negative at high precision) and are left out, and counted. In linear space every point counts by its
absolute error, so the few-bit points, whose δ is largest, decide the fit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# The constants of Kumar et al.'s δ_PTQ fit, as the issue cites them from the paper (not checked against it here).
PAPER = {"C_T": 0.0598, "gamma_D": 0.5068, "gamma_N": 0.3439, "gamma_post": 0.5907}

SPACES = ("log", "linear")
EXPONENTS = ("gamma_D", "gamma_N", "gamma_post")  # the kumar exponents compared with the paper's
BOOTSTRAP_MAX_NFEV = 50  # per resample; from the log-space start a fit needs a handful of evaluations


class FitError(ValueError):
    """The points cannot determine the law's parameters, or the solver found no finite answer."""


@dataclass(frozen=True)
class Point:
    """One quantized checkpoint: N non-embedding parameters, D training tokens, P_post bits, its loss increase δ."""

    n_params: float
    tokens: float
    bits: float
    delta: float
    method: str
    format: str
    schedule: str
    p_train: int | None
    name: str


def load_points(folder: str | Path) -> list[dict]:
    """Every ``precision-point`` record in the JSON files under ``folder`` (recursively), in path order."""
    records = []
    for path in sorted(Path(folder).rglob("*.json")):
        record = json.loads(path.read_text())
        if isinstance(record, dict) and record.get("kind") == "precision-point":
            records.append(record)
    return records


def points_from_records(
    records: list[dict],
    method: str | None = None,
    format: str | None = "int",
    schedule: str | None = None,
    p_train: int | str | None = "any",
) -> list[Point]:
    """The records' points, filtered: ``method``, ``format`` and ``schedule`` None keep all; ``p_train`` None keeps
    the checkpoints trained in full precision only, "any" keeps all. The default format is "int": the law's P_post
    is the integer grid's bit width (``bits``), not the effective bits per weight that scales add. Records without a
    ``delta_loss`` (failed runs) are left out."""
    points = []
    for r in records:
        checkpoint, delta = r["checkpoint"], (r.get("metrics") or {}).get("delta_loss")
        if delta is None or r.get("bits") is None:
            continue
        point = Point(
            n_params=float(checkpoint["n_params"]),
            tokens=float(checkpoint["tokens"]),
            bits=float(r["bits"]),
            delta=float(delta),
            method=r["method"],
            format=r.get("format") or "int",
            schedule=checkpoint.get("schedule") or "constant",
            p_train=checkpoint.get("p_train"),
            name=checkpoint["name"],
        )
        if (
            (method is None or point.method == method)
            and (format is None or point.format == format)
            and (schedule is None or point.schedule == schedule)
            and (p_train == "any" or point.p_train == p_train)
        ):
            points.append(point)
    return points


def kumar(p: dict[str, float], N: np.ndarray, D: np.ndarray, P: np.ndarray) -> np.ndarray:
    return p["C_T"] * D ** p["gamma_D"] / N ** p["gamma_N"] * np.exp(-P / p["gamma_post"])


def ratio(p: dict[str, float], N: np.ndarray, D: np.ndarray, P: np.ndarray) -> np.ndarray:
    return p["C_T"] * (D / N) ** p["gamma"] * np.exp(-P / p["gamma_post"])


def no_data(p: dict[str, float], N: np.ndarray, D: np.ndarray, P: np.ndarray) -> np.ndarray:
    return p["C_T"] * N ** -p["gamma_N"] * np.exp(-P / p["gamma_post"])


@dataclass(frozen=True)
class LawForm:
    """A law for δ(N, D, P). ``log_features`` are the columns X with log δ = X @ θ, θ = (log C_T, the exponents,
    1/γ_post) in the order of ``params`` (C_T first, gamma_post last). ``initial`` starts the solver where the points
    with δ above the floor cannot (a linear-space fit of mostly noise)."""

    name: str
    equation: str
    params: tuple[str, ...]
    predict: Callable[[dict[str, float], np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    log_features: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    initial: dict[str, float]


LAWS = {
    "kumar": LawForm(
        name="kumar",
        equation="C_T * D^gamma_D / N^gamma_N * exp(-P / gamma_post)",
        params=("C_T", "gamma_D", "gamma_N", "gamma_post"),
        predict=kumar,
        log_features=lambda N, D, P: np.column_stack([np.ones_like(N), np.log(D), -np.log(N), -P]),
        initial=PAPER,
    ),
    "ratio": LawForm(  # tokens per parameter: γ_D = γ_N
        name="ratio",
        equation="C_T * (D / N)^gamma * exp(-P / gamma_post)",
        params=("C_T", "gamma", "gamma_post"),
        predict=ratio,
        log_features=lambda N, D, P: np.column_stack([np.ones_like(N), np.log(D / N), -P]),
        initial={"C_T": 0.06, "gamma": 0.4, "gamma_post": 0.6},
    ),
    "no_data": LawForm(  # the null hypothesis that training tokens do not matter: γ_D = 0
        name="no_data",
        equation="C_T * N^-gamma_N * exp(-P / gamma_post)",
        params=("C_T", "gamma_N", "gamma_post"),
        predict=no_data,
        log_features=lambda N, D, P: np.column_stack([np.ones_like(N), -np.log(N), -P]),
        initial={"C_T": 100.0, "gamma_N": 0.35, "gamma_post": 0.6},
    ),
}


def params_from_theta(law: LawForm, theta: np.ndarray) -> dict[str, float]:
    log_c, *exponents, rate = (float(t) for t in theta)
    gamma_post = 1.0 / rate if rate != 0 else math.inf
    return dict(zip(law.params, [math.exp(min(max(log_c, -700.0), 700.0)), *exponents, gamma_post], strict=True))


def theta_from_params(law: LawForm, params: dict[str, float]) -> np.ndarray:
    values = [params[name] for name in law.params]
    return np.array([math.log(values[0]), *values[1:-1], 1.0 / values[-1]])


@dataclass
class Fit:
    """A fitted law. ``residuals`` are prediction minus observation in the fitted space (log δ or δ), in the order of
    the included points (``included_points``); r2 is the coefficient of determination in that space."""

    form: str
    space: str
    params: dict[str, float]
    r2: float
    rmse: float
    n_points: int
    n_excluded: int
    residuals: list[float]
    converged: bool

    def to_dict(self) -> dict:
        return asdict(self)


def included_points(points: list[Point], space: str, floor: float) -> list[Point]:
    """The points a fit in ``space`` uses: in log space those with δ above the floor, in linear space all."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, not {space!r}")
    return [p for p in points if p.delta > floor] if space == "log" else list(points)


def _arrays(points: list[Point]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    N, D, P, delta = np.array([(p.n_params, p.tokens, p.bits, p.delta) for p in points], dtype=float).reshape(-1, 4).T
    return N, D, P, delta


def why_unfittable(points: list[Point], form: str = "kumar") -> str | None:
    """Why the law cannot be fitted to these (already included) points, or None when it can: it needs more points
    than parameters, and enough distinct values to tell its exponents apart: the kumar form at least two N, two D and
    two bit widths, not confounded (a grid where D is always the same multiple of N cannot separate γ_D from γ_N);
    the ratio form two ratios D/N and two bit widths; the no_data form two N and two bit widths. Exactly: its log-space
    design matrix must have full column rank."""
    law = LAWS[form]
    if len(points) <= len(law.params):
        return f"{len(points)} points for the {len(law.params)} parameters of the {form} law"
    N, D, P, _ = _arrays(points)
    if np.linalg.matrix_rank(law.log_features(N, D, P)) < len(law.params):
        counts = f"{len(set(N))} distinct N, {len(set(D))} distinct D, {len(set(P))} bit widths"
        return f"{counts}: too few (or confounded) to determine {', '.join(law.params)}"
    return None


def _log_linear_start(law: LawForm, N: np.ndarray, D: np.ndarray, P: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """θ from the linear regression of log δ on the law's log features (points with δ > 0), or ``law.initial`` when
    those points cannot determine it."""
    positive = delta > 0
    X = law.log_features(N[positive], D[positive], P[positive])
    if positive.sum() > len(law.params) and np.linalg.matrix_rank(X) == len(law.params):
        theta, *_ = np.linalg.lstsq(X, np.log(delta[positive]), rcond=None)
        if np.all(np.isfinite(theta)):
            return theta
    return theta_from_params(law, law.initial)


def fit_law(
    points: list[Point], form: str = "kumar", space: str = "log", floor: float = 1e-4, max_nfev: int | None = None
) -> Fit:
    """Nonlinear least squares of the law ``form`` on the points, residuals in ``space`` (see the module docstring).
    Raises FitError when the points cannot determine the parameters (``why_unfittable``) or the fit is not finite."""
    from scipy.optimize import least_squares

    law = LAWS[form]
    used = included_points(points, space, floor)
    reason = why_unfittable(used, form)
    if reason:
        raise FitError(reason)
    N, D, P, delta = _arrays(used)
    X = law.log_features(N, D, P)
    observed = np.log(delta) if space == "log" else delta

    def residuals(theta: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", divide="ignore"):
            predicted = law.predict(params_from_theta(law, theta), N, D, P)
            return (np.log(predicted) if space == "log" else predicted) - observed

    def jacobian(theta: np.ndarray) -> np.ndarray:  # d(log δ)/dθ = X, dδ/dθ = δ X
        return X if space == "log" else np.exp(X @ theta)[:, None] * X

    start = _log_linear_start(law, N, D, P, delta)
    if not np.all(np.isfinite(residuals(start))):
        start = theta_from_params(law, law.initial)
    try:
        result = least_squares(residuals, start, jac=jacobian, method="trf", max_nfev=max_nfev)
    except ValueError as e:  # residuals not finite at the start
        raise FitError(str(e)) from e
    r = result.fun
    params = params_from_theta(law, result.x)
    if not (np.all(np.isfinite(r)) and all(math.isfinite(v) for k, v in params.items() if k != "gamma_post")):
        raise FitError(f"the {form} fit in {space} space did not reach finite parameters: {params}")
    total = float(np.sum((observed - observed.mean()) ** 2))
    return Fit(
        form=form,
        space=space,
        params=params,
        r2=1.0 - float(np.sum(r**2)) / total if total > 0 else math.nan,
        rmse=float(np.sqrt(np.mean(r**2))),
        n_points=len(used),
        n_excluded=len(points) - len(used),
        residuals=[float(x) for x in r],
        converged=bool(result.status > 0),
    )


def _bootstrap_thetas(
    points: list[Point], form: str, space: str, floor: float, samples: int, seed: int
) -> tuple[np.ndarray, int]:
    """θ of the refits on ``samples`` resamples (with replacement) of the points, and how many resamples were
    skipped: those that cannot determine the law (too few distinct N, D or bit widths among the points above the
    floor, see ``why_unfittable``) and those whose fit failed or did not converge within BOOTSTRAP_MAX_NFEV."""
    law = LAWS[form]
    rng = np.random.default_rng(seed)
    thetas, skipped = [], 0
    for _ in range(samples):
        resample = [points[i] for i in rng.integers(0, len(points), size=len(points))]
        try:
            fit = fit_law(resample, form, space, floor, max_nfev=BOOTSTRAP_MAX_NFEV)
        except FitError:
            skipped += 1
            continue
        if not fit.converged:
            skipped += 1
            continue
        thetas.append(theta_from_params(law, fit.params))  # 1/γ_post = 0 where γ_post is infinite
    return np.array(thetas, dtype=float).reshape(-1, len(law.params)), skipped


def _intervals(law: LawForm, thetas: np.ndarray, level: float) -> dict[str, tuple[float, float]]:
    """Percentile intervals, taken on θ and mapped to the parameters. 1/γ_post is decreasing in γ_post; when its
    interval reaches 0 the data do not exclude a δ that is independent of the bits, and γ_post's interval is
    unbounded above."""
    if len(thetas) == 0:
        return {name: (math.nan, math.nan) for name in law.params}
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(thetas, [tail, 100 - tail], axis=0)
    intervals = {law.params[0]: (math.exp(low[0]), math.exp(high[0]))}
    for i, name in enumerate(law.params[1:-1], start=1):
        intervals[name] = (float(low[i]), float(high[i]))
    rate_low, rate_high = float(low[-1]), float(high[-1])
    if rate_low <= 0 < rate_high:
        intervals[law.params[-1]] = (1 / rate_high, math.inf)
    else:
        intervals[law.params[-1]] = (_inverse(rate_high), _inverse(rate_low))
    return intervals


def _inverse(x: float) -> float:
    return 1 / x if x != 0 else math.inf


def bootstrap(
    points: list[Point],
    form: str = "kumar",
    space: str = "log",
    floor: float = 1e-4,
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of the law's parameters at ``level``: refits on resamples of the points drawn
    with replacement (numpy Generator seeded with ``seed``). Resamples that cannot determine the law or whose fit
    fails are skipped (``_bootstrap_thetas``); NaN intervals when none is left."""
    thetas, _ = _bootstrap_thetas(points, form, space, floor, samples, seed)
    return _intervals(LAWS[form], thetas, level)


def _finite(x: float) -> float | None:
    """JSON has no infinity or NaN: None stands for an unbounded or unavailable value."""
    return float(x) if math.isfinite(x) else None


def _fit_entry(
    points: list[Point], form: str, space: str, floor: float, samples: int, seed: int, level: float, residuals=True
) -> dict:
    """One fit with its bootstrap intervals and (``residuals``) each point's residual, or ``{"skipped": why}``."""
    try:
        fit = fit_law(points, form, space, floor)
    except FitError as e:  # too few points, or too few distinct N, D or bit widths (why_unfittable)
        return {"skipped": str(e)}
    law, used = LAWS[form], included_points(points, space, floor)
    thetas, skipped = _bootstrap_thetas(points, form, space, floor, samples, seed)
    N, D, P, delta = _arrays(used)
    predicted = law.predict(fit.params, N, D, P)
    per_point = [
        {
            "name": p.name, "method": p.method, "bits": p.bits, "n_params": p.n_params, "tokens": p.tokens,
            "schedule": p.schedule, "p_train": p.p_train, "delta": p.delta, "predicted": float(pred), "residual": r,
        }
        for p, pred, r in zip(used, predicted, fit.residuals, strict=True)
    ] if residuals else None  # fmt: skip
    return {
        "params": {k: _finite(v) for k, v in fit.params.items()},
        "intervals": {k: [_finite(lo), _finite(hi)] for k, (lo, hi) in _intervals(law, thetas, level).items()},
        "bootstrap_used": len(thetas),
        "bootstrap_skipped": skipped,
        "r2": _finite(fit.r2),
        "rmse": fit.rmse,
        "n_points": fit.n_points,
        "n_excluded": fit.n_excluded,
        "converged": fit.converged,
        "residuals": per_point,
    }


def _groups(points: list[Point]) -> dict[str, list[Point]]:
    """Each method's points (rtn first, then in order of appearance) and all of them ("pooled")."""
    methods = sorted(dict.fromkeys(p.method for p in points), key=lambda m: m != "rtn")
    return {m: [p for p in points if p.method == m] for m in methods} | {"pooled": list(points)}


def _comparison(entry: dict) -> dict:
    """The fitted kumar exponents beside the paper's, and whether the paper's value lies in the interval (None when
    the interval is unavailable; an unbounded end is null in the interval)."""
    out = {}
    for name in EXPONENTS:
        low, high = entry["intervals"][name]
        inside = None
        if entry["bootstrap_used"] > 0 and low is not None:
            inside = low <= PAPER[name] <= (math.inf if high is None else high)
        out[name] = {
            "fitted": entry["params"][name], "interval": [low, high], "paper": PAPER[name], "paper_inside": inside,
        }  # fmt: skip
    return out


def fit_study(
    records: list[dict],
    samples: int = 1000,
    seed: int = 0,
    floor: float = 1e-4,
    level: float = 0.95,
    spaces: tuple[str, ...] = SPACES,
    study: str | None = None,
) -> dict:
    """Everything fit.json holds. The main fits (``fits``: each method and "pooled", each law form, each space) use
    the integer-format points of checkpoints trained in full precision, every schedule together; ``by_schedule``
    (when there is more than one schedule) and ``by_p_train`` (when some checkpoints were trained in low precision)
    repeat the kumar fit in log space on each subset. A subset that cannot determine the law is ``{"skipped": why}``.
    Unbounded or unavailable numbers are null. ``study``: its name, kept in the result."""
    main = points_from_records(records, p_train=None)
    schedules = sorted({p.schedule for p in main})
    fits = {
        group: {form: {space: _fit_entry(pts, form, space, floor, samples, seed, level, form == "kumar")
                       for space in spaces} for form in LAWS}
        for group, pts in _groups(main).items()
    }  # fmt: skip
    comparison = {
        group: _comparison(forms["kumar"]["log"])
        for group, forms in fits.items()
        if "log" in forms["kumar"] and "skipped" not in forms["kumar"]["log"]
    }
    result = {
        "study": study,
        "paper": PAPER,
        "floor": floor,
        "samples": samples,
        "seed": seed,
        "level": level,
        "forms": {name: law.equation for name, law in LAWS.items()},
        "subset": {"format": "int", "p_train": None, "schedules": schedules},
        "fits": fits,
        "comparison": comparison,
    }
    if len(schedules) > 1:
        result["by_schedule"] = {
            schedule: {
                group: _fit_entry(pts, "kumar", "log", floor, samples, seed, level, residuals=False)
                for group, pts in _groups([p for p in main if p.schedule == schedule]).items()
            }
            for schedule in schedules
        }
    every_p_train = points_from_records(records, p_train="any")
    p_trains = sorted({p.p_train for p in every_p_train}, key=lambda b: math.inf if b is None else b)
    if any(b is not None for b in p_trains):
        result["by_p_train"] = {
            "full" if b is None else str(b): {
                group: _fit_entry(pts, "kumar", "log", floor, samples, seed, level, residuals=False)
                for group, pts in _groups([p for p in every_p_train if p.p_train == b]).items()
            }
            for b in p_trains
        }
    return result


def write_fit(records: list[dict], out_dir: str | Path, **kw) -> Path:
    """Write ``fit_study(records, **kw)`` to ``out_dir/fit.json``; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fit.json"
    path.write_text(json.dumps(fit_study(records, **kw), indent=2) + "\n")
    return path
