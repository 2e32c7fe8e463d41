"""The command line as a user runs it, on stories260k from the assets folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ASSETS, require_assets


def ptq_run(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ptq.run", *args, f"paths.assets={ASSETS}"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env} if env else None,
    )


QUICK = ["model=stories260k", "eval.max_windows=4", "calib.nsamples=4", "calib.seqlen=64"]


def test_run_writes_a_complete_record_and_prints_its_path_last(tmp_path):
    require_assets("models/stories260K", "data/wikitext-2-raw-v1/test.jsonl")
    out = tmp_path / "run"
    proc = ptq_run(*QUICK, "method=rtn", "bits=4", "group_size=64", f"output_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert Path(last) == out / "result.json"
    record = json.loads(Path(last).read_text())
    assert record["status"] == "ok"
    assert (record["model"], record["method"], record["bits"], record["group_size"], record["sym"]) == (
        "stories260k",
        "rtn",
        4,
        64,
        False,
    )
    ppl = record["metrics"]["ppl"]["wikitext2"]
    base = record["baseline"]["metrics"]["ppl"]["wikitext2"]
    assert 50 < base < ppl < 2 * base
    for key in ("quantize_s", "eval_s"):
        assert record["timings"][key] >= 0
    assert record["memory"]["peak_gpu_bytes"] is None and record["memory"]["peak_rss_bytes"] > 0
    assert {"python", "torch", "transformers", "lm_eval", "ptq", "device_name"} <= set(record["env"])
    assert record["config"]["calib"]["nsamples"] == 4
    assert record["eval"]["ppl"]["wikitext2"]["windows"] == 4
    assert "full precision" in proc.stdout and "rtn w4 g64 asym" in proc.stdout
    assert record["calibration"]["used"] is False and record["calibration"]["offsets"] == []


def test_gptq_run_records_its_calibration_windows(tmp_path):
    require_assets("models/stories260K", "data/wikitext-2/valid.tokens.txt")
    out = tmp_path / "gptq"
    proc = ptq_run(
        *QUICK, "method=gptq", "bits=3", "group_size=32", "eval.baseline=false", f"output_dir={out}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "result.json").read_text())
    calib = record["calibration"]
    assert calib["used"] and calib["source"].endswith("valid.tokens.txt")
    assert (calib["nsamples"], calib["seqlen"], calib["seed"]) == (4, 64, 0) and len(calib["offsets"]) == 4
    layers = record["quantization"]["blocks"][0]["layers"]
    assert layers["self_attn.q_proj"]["loss"] > 0 and layers["self_attn.q_proj"]["percdamp"] == 0.01


def test_bad_setting_fails_before_work_and_writes_no_result(tmp_path):
    out = tmp_path / "bad"
    proc = ptq_run("model=stories260k", "group_size=-2", f"output_dir={out}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "group_size=-2 is invalid" in proc.stderr
    assert not (out / "result.json").exists()
    assert json.loads((out / "error.json").read_text())["status"] == "failed"


def test_missing_model_path_is_a_clear_error(tmp_path):
    proc = ptq_run("model=custom", f"model.path={tmp_path}/nothing", f"output_dir={tmp_path}/o", cwd=tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_seqlen_above_context_is_rejected(tmp_path):
    require_assets("models/stories260K")
    proc = ptq_run("model=stories260k", "eval.seqlen=4096", f"output_dir={tmp_path}/o", cwd=tmp_path)
    assert proc.returncode == 2 and "eval.seqlen=4096 is above the model's context of 512" in proc.stderr


@pytest.mark.parametrize("unknown", ["method=fancy", "model=gpt5"])
def test_unknown_preset_lists_the_options(tmp_path, unknown):
    proc = ptq_run(unknown, f"output_dir={tmp_path}/o", cwd=tmp_path)
    assert proc.returncode == 2 and "preset; choose one of:" in proc.stderr and "Traceback" not in proc.stderr


def test_multirun_sweep_writes_one_record_per_job(tmp_path):
    require_assets("models/stories260K", "data/wikitext-2-raw-v1/test.jsonl")
    proc = ptq_run(
        "-m",
        *QUICK,
        "method=none,rtn",
        "bits=3,4",
        "eval.baseline=false",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/result.json"))]
    assert sorted((r["method"], r["bits"]) for r in records) == [("none", 16), ("none", 16), ("rtn", 3), ("rtn", 4)]


def test_calibration_length_is_only_checked_for_methods_that_read_calibration(tmp_path):
    require_assets("models/stories260K")
    proc = ptq_run("model=stories260k", "method=gptq", "calib.seqlen=1024", f"output_dir={tmp_path}/o", cwd=tmp_path)
    assert proc.returncode == 2 and "calib.seqlen=1024 is above the model's context of 512" in proc.stderr
    proc = ptq_run(
        "model=stories260k",
        "method=rtn",
        "calib.seqlen=1024",
        "eval.max_windows=2",
        f"output_dir={tmp_path}/r",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("option,message", [("percdamp=0", "gptq.percdamp=0"), ("block_size=0", "gptq.block_size=0")])
def test_bad_gptq_option_is_one_clear_error(tmp_path, option, message):
    proc = ptq_run(
        "model=stories260k", "method=gptq", f"method.gptq.{option}", f"output_dir={tmp_path}/o", cwd=tmp_path
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "label"),
    [
        (["method=awq", "bits=3", "group_size=32"], "awq w3 g32 asym"),
        (["method=awq+gptq", "bits=3", "group_size=32"], "awq+gptq w3 g32 asym"),
        (
            ["method=smoothquant", "scheme=w8a8", "act_granularity=per_tensor"],
            "smoothquant w8a8 (per_tensor) per-channel sym",
        ),
    ],
)
def test_scaling_methods_from_the_command_line(tmp_path, args, label):
    require_assets("models/stories260K", "data/wikitext-2/valid.tokens.txt")
    out = tmp_path / "run"
    proc = ptq_run(*QUICK, *args, f"output_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert label in proc.stdout
    record = json.loads((out / "result.json").read_text())
    base = record["baseline"]["metrics"]["ppl"]["wikitext2"]
    assert base < record["metrics"]["ppl"]["wikitext2"] < 2 * base
    assert record["calibration"]["used"]


def test_smoothquant_without_activation_bits_is_one_clear_error(tmp_path):
    proc = ptq_run("model=stories260k", "method=smoothquant", f"output_dir={tmp_path}/o", cwd=tmp_path)
    assert (
        proc.returncode == 2
        and "set an activation format (e.g. scheme=w8a8" in proc.stderr
        and "Traceback" not in proc.stderr
    )


def test_awq_on_an_architecture_without_scaling_groups_fails_before_loading(tmp_path):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    proc = ptq_run("model=custom", f"model.path={gpt2}", "method=awq", f"output_dir={tmp_path}/o", cwd=tmp_path)
    assert proc.returncode == 2 and "'gpt2' has no scaling groups" in proc.stderr and "Traceback" not in proc.stderr


def test_aqlm_from_the_command_line_reports_exact_bits_and_refuses_save(tmp_path):
    require_assets("models/stories260K", "data/wikitext-2/valid.tokens.txt")
    out = tmp_path / "run"
    aqlm = ["method=aqlm", "bits=2", "method.aqlm.group=4", "method.aqlm.codebooks=1", "method.aqlm.codebook_bits=6",
            "method.aqlm.rounds=1", "method.aqlm.beam_size=2"]  # fmt: skip
    proc = ptq_run(*QUICK, *aqlm, f"output_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "aqlm 1x6 g4 (bits=2 nominal)" in proc.stdout
    record = json.loads((out / "result.json").read_text())
    storage = record["quantization"]["storage"]
    assert storage["format"] == "aqlm" and 1.5 < storage["bits_per_weight"] < 3  # 6-bit codes per 4 weights + tables
    base = record["baseline"]["metrics"]["ppl"]["wikitext2"]
    assert base < record["metrics"]["ppl"]["wikitext2"] < 10 * base
    proc = ptq_run(*QUICK, *aqlm, "save=true", f"output_dir={tmp_path}/saved", cwd=tmp_path)
    assert proc.returncode == 2 and "AQLM's codes and codebooks" in proc.stderr and "Traceback" not in proc.stderr
