"""Resume: a run interrupted after some blocks continues from them and ends where an uninterrupted run ends."""

import json
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ptq.api import prepare_steps, run_steps
from ptq.recipe import Recipe
from ptq.storage.progress import Progress, ResumeError
from tests.conftest import tiny_model

CALIB = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
SETTINGS = {"method": "test"}


class Interrupted(Exception):
    pass


def _interrupt_after(progress: Progress, last: int) -> None:
    save = progress.save_block

    def save_then_stop(index, *args):
        save(index, *args)
        if index == last:
            raise Interrupted

    progress.save_block = save_then_stop


RECIPES = [
    {"method": "gptq", "bits": 4, "group_size": 16},
    {"method": "awq", "bits": 3},
    {"method": "smoothquant+rtn", "bits": 8, "group_size": -1, "sym": True, "act_bits": 8,
     "act_granularity": "per_tensor"},
    {"method": "quarot+gptq", "bits": 4, "group_size": -1, "sym": True, "act_bits": 4, "kv_bits": 4},
    {"method": "gptq", "format": "nvfp4", "act_format": "nvfp4"},
]  # fmt: skip


@pytest.mark.parametrize("settings", RECIPES, ids=lambda s: s["method"] + ("-" + s.get("format", "int")))
def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, settings):
    recipe = Recipe.build(**settings)
    reference = tiny_model("llama")
    expected_report = run_steps(reference, prepare_steps(recipe, reference.config), CALIB, "cpu")

    interrupted = tiny_model("llama")
    progress = Progress(tmp_path, SETTINGS)
    assert progress.start(resume=False) == 0
    _interrupt_after(progress, 0)
    with pytest.raises(Interrupted):
        run_steps(interrupted, prepare_steps(recipe, interrupted.config), CALIB, "cpu", progress=progress)

    resumed = tiny_model("llama")
    progress = Progress(tmp_path, SETTINGS)
    assert progress.start(resume=True) == 1
    report = run_steps(resumed, prepare_steps(recipe, resumed.config), CALIB, "cpu", progress=progress)

    expected_state, state = reference.state_dict(), resumed.state_dict()
    assert expected_state.keys() == state.keys()
    for key, value in expected_state.items():
        assert torch.equal(value, state[key]), key
    # Run-time stages (activation and KV quantizers, online rotations) are back too: same logits.
    assert torch.equal(reference(PROBE).logits, resumed(PROBE).logits)
    assert report["storage"] == expected_report["storage"]
    assert [b["layers"] for b in report["blocks"]] == [b["layers"] for b in expected_report["blocks"]]
    assert "restored_s" in report["blocks"][0] and "restored_s" not in report["blocks"][1]


def test_resume_refuses_other_settings_and_a_damaged_block(tmp_path):
    model = tiny_model("llama")
    recipe = Recipe.build(method="rtn", bits=4, group_size=16)
    progress = Progress(tmp_path, {"bits": 4, "seed": 0})
    progress.start(resume=False)
    _interrupt_after(progress, 0)
    with pytest.raises(Interrupted):
        run_steps(model, prepare_steps(recipe, model.config), None, "cpu", progress=progress)
    with pytest.raises(ResumeError, match=r"other settings \(bits: 4 then, 3 now\).*overwrite=true"):
        Progress(tmp_path, {"bits": 3, "seed": 0}).start(resume=True)

    block = tmp_path / "progress" / "block-00000.safetensors"
    block.write_bytes(block.read_bytes()[:100])
    progress = Progress(tmp_path, {"bits": 4, "seed": 0})
    assert progress.start(resume=True) == 1
    with pytest.raises(ResumeError, match=r"cannot be read.*overwrite=true"):
        run_steps(tiny_model("llama"), prepare_steps(recipe, model.config), None, "cpu", progress=progress)


KILL_AFTER_BLOCK = """
import os, signal, sys
from ptq.storage import progress

save = progress.Progress.save_block

def save_then_die(self, index, *args):
    save(self, index, *args)
    if index == {last}:
        os.kill(os.getpid(), signal.SIGKILL)

progress.Progress.save_block = save_then_die
sys.argv = ["ptq.run", *sys.argv[1:]]
from ptq.run import main
main()
"""


def test_a_run_killed_mid_way_resumes_to_the_same_record_and_checkpoint(tmp_path):
    from tests.conftest import require_assets
    from tests.test_cli import ASSETS, QUICK, ptq_run

    require_assets("models/stories260K", "data/wikitext-2-raw-v1/test.jsonl")
    args = [*QUICK, "method=gptq", "bits=4", "group_size=-1", "save=true", "eval.baseline=false",
            f"cache.dir={tmp_path / 'cache'}"]  # fmt: skip
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert ptq_run(*args, f"output_dir={whole}", cwd=tmp_path).returncode == 0

    script = tmp_path / "kill_after_block.py"
    script.write_text(KILL_AFTER_BLOCK.format(last=2))
    proc = subprocess.run(
        [sys.executable, str(script), *args, f"output_dir={killed}", f"paths.assets={ASSETS}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (killed / "result.json").exists() and not (killed / "model").exists()
    saved = sorted(p.name for p in (killed / "progress").glob("block-*"))
    assert saved == [f"block-0000{i}.safetensors" for i in range(3)]

    proc = ptq_run(*args, f"output_dir={killed}", cwd=tmp_path)  # without resume=true: refused, nothing lost
    assert proc.returncode == 2 and "interrupted run (3 finished block(s)" in proc.stderr
    assert "resume=true" in proc.stderr
    assert len(list((killed / "progress").glob("block-*"))) == 3

    proc = ptq_run(*args, f"output_dir={killed}", "resume=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = json.loads((whole / "result.json").read_text())
    record = json.loads((killed / "result.json").read_text())
    assert record["metrics"] == expected["metrics"]
    assert record["quantization"]["resumed_from_block"] == 3 and expected["quantization"]["resumed_from_block"] is None
    layers = [b["layers"] for b in record["quantization"]["blocks"]]
    assert layers == [b["layers"] for b in expected["quantization"]["blocks"]]
    assert not (killed / "progress").exists() and not list(killed.glob(".model.*.partial"))
    mode = (killed / "model" / "model.safetensors").stat().st_mode & 0o777
    assert mode == (killed / "model" / "config.json").stat().st_mode & 0o777  # not private like its siblings' files
    expected_tensors = load_file(whole / "model" / "model.safetensors")
    tensors = load_file(killed / "model" / "model.safetensors")
    assert expected_tensors.keys() == tensors.keys()
    assert all(torch.equal(expected_tensors[k], tensors[k]) for k in tensors)
