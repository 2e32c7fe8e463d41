"""Experiment presets: each composes into a valid run config, and its published table names real
model presets and configurations that its sweep actually runs."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from ptq.config import ConfigError, check_experiment, from_dict

PRESETS = sorted(p.stem for p in (Path(__file__).parents[1] / "ptq" / "conf" / "experiment").glob("*.yaml"))
MODELS = {p.stem for p in (Path(__file__).parents[1] / "ptq" / "conf" / "model").glob("*.yaml")}


def composed(*overrides: str):
    with initialize_config_module("ptq.conf", version_base=None):
        cfg = compose("config", overrides=[*overrides, "output_dir=/tmp/unused"], return_hydra_config=True)
    sweep = dict(cfg.hydra.sweeper.params or {})
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra")
    container["paths"] = {"assets": None}
    return container, sweep


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_its_published_numbers_match_its_sweep(preset):
    container, sweep = composed(f"experiment={preset}")
    cfg = from_dict(container)
    exp = cfg.experiment
    assert exp["name"] == preset
    models = sweep["model"].split(",")
    assert set(models) <= MODELS
    assert set(exp["published"]) <= set(models)
    # method=gptq-reference is GPTQ in the reference's column order: its records say "gptq"
    methods = [m.removesuffix("-reference") for m in sweep["method"].split(",")]
    bits = sweep.get("bits", str(cfg.recipe.weights.bits)).split(",")
    act = f"a{cfg.recipe.activations.bits}" if cfg.recipe.activations else ""
    act += f"kv{cfg.recipe.kv.bits}" if cfg.recipe.kv else ""
    runs = {"fp16"} | {f"{m}-w{b}{act}" for m in methods for b in bits}
    for model, values in exp["published"].items():
        assert set(values) <= runs, (model, set(values) - runs)


def test_gptq_table3_holds_the_published_opt_125m_row():
    container, _ = composed("experiment=gptq-opt")
    row = container["experiment"]["published"]["opt-125m"]
    assert row == {"fp16": 27.65, "rtn-w4": 37.28, "gptq-w4": 31.12, "rtn-w3": 1300.0, "gptq-w3": 53.85}
    assert container["group_size"] == -1 and container["calib"]["name"] == "c4"


def test_bad_experiment_tables_are_clear_errors():
    with pytest.raises(ConfigError, match="missing"):
        check_experiment({"name": "x"})
    with pytest.raises(ConfigError, match=r"experiment.published.m.gptq-w4='31' must be a number"):
        check_experiment({"name": "x", "metric": "ppl.wikitext2", "published": {"m": {"gptq-w4": "31"}}})
