"""The precision-scaling fit: known laws recovered from synthetic points, the floor, the null hypothesis, fit.json."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest

from ptq.study.fit import (
    LAWS,
    FitError,
    Point,
    bootstrap,
    fit_law,
    fit_study,
    load_points,
    params_from_theta,
    points_from_records,
    theta_from_params,
    write_fit,
)
from ptq.study.plots import write_study_plots

TRUE = {"C_T": 0.06, "gamma_D": 0.5, "gamma_N": 0.35, "gamma_post": 0.6}
SIZES, TOKENS, BITS = (5e5, 2e6, 8e6), (1e7, 3e7, 1e8, 3e8), (3, 4, 5, 6)


def synthetic(form: str, params: dict, sigma: float = 0.05, seed: int = 0, bits=BITS) -> list[Point]:
    """The law on the grid, times log-normal noise."""
    rng = np.random.default_rng(seed)
    points = []
    for N, D, P in itertools.product(SIZES, TOKENS, bits):
        delta = float(LAWS[form].predict(params, np.array(N), np.array(D), np.array(P)) * np.exp(rng.normal(0, sigma)))
        points.append(Point(N, D, P, delta, "rtn", "int", "constant", None, f"N{N:g}-D{D:g}"))
    return points


def test_predict_is_exp_of_the_log_features():
    rng = np.random.default_rng(0)
    N, D, P = 10 ** rng.uniform(5, 8, 20), 10 ** rng.uniform(6, 9, 20), rng.integers(2, 9, 20).astype(float)
    for law in LAWS.values():
        params = {name: float(rng.uniform(0.2, 0.9)) for name in law.params}
        theta = theta_from_params(law, params)
        assert params_from_theta(law, theta) == pytest.approx(params)
        np.testing.assert_allclose(law.predict(params, N, D, P), np.exp(law.log_features(N, D, P) @ theta), rtol=1e-10)


@pytest.mark.parametrize("space", ["log", "linear"])
def test_kumar_recovered(space):
    # floor 0: every synthetic δ counts (the smallest, N = 8e6, D = 1e7 at 6 bits, is 3e-5)
    hits = dict.fromkeys(TRUE, 0)
    for seed in range(5):
        points = synthetic("kumar", TRUE, seed=seed)
        fit = fit_law(points, "kumar", space, floor=0)
        assert fit.converged and fit.r2 > 0.99 and fit.n_points == len(points) and fit.n_excluded == 0
        assert len(fit.residuals) == len(points)
        assert fit.rmse == pytest.approx(np.sqrt(np.mean(np.square(fit.residuals))))
        for name in ("gamma_D", "gamma_N", "gamma_post"):  # linear space: the few largest δ decide
            assert fit.params[name] == pytest.approx(TRUE[name], rel=0.05 if space == "log" else 0.15), name
        if space == "log":  # C_T is the law at N = D = 1: 0.01 off in gamma_D moves it by 3e8^0.01 - 1 = 20 %
            assert fit.params["C_T"] == pytest.approx(TRUE["C_T"], rel=0.35)
        for name, (low, high) in bootstrap(points, "kumar", space, floor=0, samples=200, seed=seed).items():
            hits[name] += low < TRUE[name] < high
    assert all(count >= 4 for count in hits.values()), hits  # 95 % intervals: in at least 4 of 5 noise draws


def test_bootstrap_width_matches_least_squares_theory():
    # In log space the kumar law is a linear regression: its 95 % interval is about ±1.96 standard errors.
    points = synthetic("kumar", TRUE, seed=1)
    fit = fit_law(points, "kumar", "log", floor=0)
    N, D, P = (np.array([getattr(p, k) for p in points]) for k in ("n_params", "tokens", "bits"))
    X = LAWS["kumar"].log_features(N, D, P)
    variance = np.sum(np.square(fit.residuals)) / (len(points) - X.shape[1])
    standard_errors = np.sqrt(np.diag(variance * np.linalg.inv(X.T @ X)))
    intervals = bootstrap(points, "kumar", "log", floor=0, samples=400, seed=0)
    for name, se in zip(("gamma_D", "gamma_N"), standard_errors[1:3], strict=True):
        low, high = intervals[name]
        assert high - low == pytest.approx(2 * 1.96 * se, rel=0.3), name


def test_linear_space_minimizes_absolute_errors():
    points = synthetic("kumar", TRUE, sigma=0.3, seed=2)
    N, D, P, delta = (np.array([getattr(p, k) for p in points]) for k in ("n_params", "tokens", "bits", "delta"))
    law = LAWS["kumar"]

    def squared_error(params: dict) -> float:
        return float(np.sum((law.predict(params, N, D, P) - delta) ** 2))

    linear, log = fit_law(points, "kumar", "linear", floor=0), fit_law(points, "kumar", "log", floor=0)
    assert sum(r**2 for r in linear.residuals) == pytest.approx(squared_error(linear.params))
    assert squared_error(linear.params) < 0.9 * squared_error(log.params)
    theta = theta_from_params(law, linear.params)
    for i, step in itertools.product(range(len(theta)), (-1e-3, 1e-3)):  # a minimum: no nearby θ does better
        assert squared_error(params_from_theta(law, theta + step * np.eye(len(theta))[i])) >= squared_error(
            linear.params
        )


def test_delta_independent_of_bits_leaves_gamma_post_unbounded():
    points = synthetic("kumar", TRUE | {"gamma_post": 1e9}, seed=1)
    low, high = bootstrap(points, "kumar", "log", samples=200)["gamma_post"]
    assert low > 10 and high == np.inf  # 1/gamma_post's interval holds 0


def test_floor_excludes_noise_in_log_space_only():
    points = synthetic("kumar", TRUE, bits=(3, 4, 5, 6, 8, 10))  # δ at 10 bits: ~1e-5 for the largest N
    points[0] = replace(points[0], delta=-0.002)  # noise can make δ negative
    floor = 1e-4
    below = sum(p.delta <= floor for p in points)
    assert below > 1
    fit = fit_law(points, "kumar", "log", floor=floor)
    assert fit.n_excluded == below and fit.n_points == len(points) - below == len(fit.residuals)
    assert fit.params["gamma_D"] == pytest.approx(TRUE["gamma_D"], rel=0.05)
    linear = fit_law(points, "kumar", "linear", floor=floor)
    assert linear.n_excluded == 0 and linear.n_points == len(points)


def test_too_few_distinct_values_raise():
    one_size = [p for p in synthetic("kumar", TRUE) if p.n_params == SIZES[0]]
    with pytest.raises(FitError, match="distinct N"):
        fit_law(one_size, "kumar")
    fit_law(one_size, "ratio")  # D/N still varies: the ratio law is determined


@pytest.mark.parametrize(
    "form, params",
    [
        ("ratio", {"C_T": 0.5, "gamma": 0.4, "gamma_post": 0.6}),
        ("no_data", {"C_T": 200.0, "gamma_N": 0.35, "gamma_post": 0.6}),
    ],
)
def test_other_forms_recover_their_own_law(form, params):
    fit = fit_law(synthetic(form, params), form, "log", floor=0)
    assert fit.r2 > 0.99
    for name, value in params.items():  # C_T: the law extrapolated to N = 1 (and D = 1)
        assert fit.params[name] == pytest.approx(value, rel=0.35 if name == "C_T" else 0.05), name


def test_tokens_that_do_not_matter_look_like_it():
    params = {"C_T": 200.0, "gamma_N": 0.35, "gamma_post": 0.6}
    points = synthetic("no_data", params, seed=3)
    null, full = fit_law(points, "no_data"), fit_law(points, "kumar")
    assert full.r2 - null.r2 < 0.002
    assert abs(full.params["gamma_D"]) < 0.03
    low, high = bootstrap(points, "kumar", "log", samples=300, seed=2)["gamma_D"]
    assert low < 0 < high
    # and on data where tokens do matter, the null hypothesis fits worse
    assert fit_law(synthetic("kumar", TRUE), "no_data").r2 < fit_law(synthetic("kumar", TRUE), "kumar").r2 - 0.05


def records() -> list[dict]:
    """Records as the study writes them: two methods, two schedules, a low-precision-trained arm."""
    rng = np.random.default_rng(4)
    out = []
    arms = [("constant", None), ("wsd", None), ("constant", 8)]
    for (schedule, p_train), N, D, P, (method, scale) in itertools.product(
        arms, SIZES, TOKENS, (3, 5, 8), [("rtn", 1.0), ("gptq", 0.5)]
    ):
        law = TRUE | {"C_T": TRUE["C_T"] * scale * (1.3 if schedule == "wsd" else 1.0)}
        delta = float(LAWS["kumar"].predict(law, np.array(N), np.array(D), np.array(P)) * np.exp(rng.normal(0, 0.1)))
        name = f"N{N:g}-{schedule}-p{p_train}-t{D:g}"
        out.append({
            "kind": "precision-point", "study": "synthetic",
            "checkpoint": {
                "name": name, "n_params": N, "tokens": D, "schedule": schedule, "p_train": p_train, "seed": 0,
            },
            "method": method, "format": "int", "bits": P, "bits_per_weight": P + 0.03, "group_size": None,
            "metrics": {"val_loss": 3.8 + delta, "val_loss_fp": 3.8, "delta_loss": delta},
        })  # fmt: skip
    out.append(out[0] | {"format": "nvfp4"})  # not the law's integer bits: filtered out by default
    return out


def test_points_from_records_filters():
    recs = records()
    assert len(points_from_records(recs, format=None)) == len(recs)
    assert {p.format for p in points_from_records(recs)} == {"int"}
    assert {p.p_train for p in points_from_records(recs, p_train=None)} == {None}
    assert {p.p_train for p in points_from_records(recs, p_train=8)} == {8}
    assert {p.method for p in points_from_records(recs, method="gptq")} == {"gptq"}
    assert {p.schedule for p in points_from_records(recs, schedule="wsd")} == {"wsd"}


def test_fit_study_writes_fit_and_plots(tmp_path):
    recs = records()
    (tmp_path / "points" / "a").mkdir(parents=True)
    for i, r in enumerate(recs):
        (tmp_path / "points" / "a" / f"{i}.json").write_text(json.dumps(r))
    (tmp_path / "points" / "other.json").write_text(json.dumps({"kind": "precision-checkpoint"}))
    loaded = load_points(tmp_path / "points")
    assert len(loaded) == len(recs)

    path = write_fit(loaded, tmp_path / "out", samples=20)
    fit = json.loads(path.read_text())
    assert set(fit["fits"]) == {"rtn", "gptq", "pooled"}
    assert set(fit["fits"]["rtn"]) == set(LAWS) and set(fit["fits"]["rtn"]["kumar"]) == {"log", "linear"}
    rtn = fit["fits"]["rtn"]["kumar"]["log"]
    assert rtn["n_points"] == 2 * len(SIZES) * len(TOKENS) * 3 - rtn["n_excluded"]  # two schedules, three widths
    assert rtn["residuals"][0].keys() >= {"name", "bits", "method", "residual"}
    assert fit["comparison"]["pooled"]["gamma_N"]["paper"] == 0.3439
    assert set(fit["by_schedule"]) == {"constant", "wsd"} and set(fit["by_p_train"]) == {"full", "8"}
    constant, wsd = (fit["by_schedule"][s]["rtn"]["params"] for s in ("constant", "wsd"))
    middle = np.array(2e6), np.array(1e8), np.array(4.0)
    assert LAWS["kumar"].predict(wsd, *middle) / LAWS["kumar"].predict(constant, *middle) == pytest.approx(1.3, rel=0.1)
    assert fit["by_schedule"]["wsd"]["gptq"]["params"]["gamma_D"] == pytest.approx(TRUE["gamma_D"], rel=0.05)

    one_size = [r for r in recs if r["checkpoint"]["n_params"] == SIZES[0]]
    assert fit_study(one_size, samples=5)["fits"]["pooled"]["kumar"]["log"]["skipped"].startswith("1 distinct N")

    plots = write_study_plots(loaded, fit, tmp_path / "out")
    names = {p.name for p in plots}
    assert names == {"delta_vs_tokens.png", "delta_vs_bits.png", "exponents.png", "schedule.png"}
    assert all(p.stat().st_size > 10_000 for p in plots)
    one_schedule = [r for r in loaded if r["checkpoint"]["schedule"] == "constant"]
    assert "schedule.png" not in {p.name for p in write_study_plots(one_schedule, fit, tmp_path / "one")}
