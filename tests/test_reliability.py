"""What the Python API promises a caller: it leaves their random state alone and names what is missing."""

import pytest
import torch

import ptq
from tests.conftest import tiny_model

CALIB = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("method", "settings"),
    [("rtn", {}), ("gptq", {}), ("awq", {}), ("quarot+gptq", {"act_bits": 4, "group_size": -1, "sym": True}),
     ("smoothquant", {"act_bits": 8, "group_size": -1, "sym": True})],
)  # fmt: skip
def test_quantize_leaves_the_callers_random_state_alone(method, settings):
    model = tiny_model("llama")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    ptq.quantize(model, method=method, calib=CALIB, device="cpu", **settings)
    assert torch.equal(torch.get_rng_state(), before)


def test_missing_calibration_names_the_parameter():
    with pytest.raises(ValueError, match=r"gptq needs calibration data: pass calib="):
        ptq.quantize(tiny_model("llama"), method="gptq", device="cpu")


def test_a_finished_run_is_never_replaced_unless_asked(tmp_path):
    from tests.conftest import require_assets
    from tests.test_cli import QUICK, ptq_run

    require_assets("models/stories260K", "data/wikitext-2-raw-v1/test.jsonl")
    out = tmp_path / "run"
    args = [*QUICK, "method=rtn", "eval.max_windows=2", f"output_dir={out}"]
    assert ptq_run(*args, cwd=tmp_path).returncode == 0
    finished = (out / "result.json").read_text()
    proc = ptq_run(*args, "bits=3", cwd=tmp_path)
    assert proc.returncode == 2 and "holds a finished run" in proc.stderr and "overwrite=true" in proc.stderr
    assert (out / "result.json").read_text() == finished and not (out / "error.json").exists()
    proc = ptq_run(*args, "bits=3", "overwrite=true", cwd=tmp_path)
    assert proc.returncode == 0 and (out / "result.json").read_text() != finished
    proc = ptq_run(*QUICK, "method=rtn", "output_dir=/proc/ptq-cannot-write-here", cwd=tmp_path)
    assert proc.returncode == 2 and "is not writable" in proc.stderr and "Traceback" not in proc.stderr


def test_broken_model_files_are_one_sentence(tmp_path):
    from tests.conftest import require_assets
    from tests.test_cli import ptq_run

    assets = require_assets("models/stories260K", "models/smollm2-135m-instruct")
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in (assets / "models" / "stories260K").iterdir():
        data = f.read_bytes()
        (cut / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    gguf = next((assets / "models" / "smollm2-135m-instruct").glob("*.gguf"))
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.gguf").write_bytes(gguf.read_bytes()[:200_000])
    cases = {
        "safetensors": ([f"model.path={cut}"], "incomplete or corrupt"),
        "gguf": ([f"model.path={tmp_path}/g", "model.gguf_file=m.gguf"], "incomplete or corrupt"),
        "gguf-as-path": ([f"model.path={gguf}"], f"model.path={gguf.parent} model.gguf_file={gguf.name}"),
    }
    for name, (args, message) in cases.items():
        proc = ptq_run("model=custom", *args, "method=rtn", f"output_dir={tmp_path}/{name}", cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (name, proc.stderr)
        assert not (tmp_path / name / "result.json").exists()


def test_non_finite_weights_and_activations_are_named_by_block_and_layer():
    from ptq.pipeline import NonFiniteError

    model = tiny_model("llama")
    model.model.layers[1].mlp.up_proj.weight.data[3, 4] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj\.weight holds 1 non-finite"):
        ptq.quantize(model, method="rtn", device="cpu")
    model = tiny_model("llama")
    model.model.layers[0].mlp.register_forward_hook(lambda _m, _i, out: out * float("inf"))  # an overflow
    with pytest.raises(NonFiniteError, match=r"block 0 \(model\.layers\.0\) produced non-finite activations"):
        ptq.quantize(model, method="gptq", calib=CALIB, device="cpu")


BAD_INPUT = [
    (["bitz=4"], "bitz is not a ptq setting; did you mean bits?"),
    (["calib.nsampels=8"], "calib.nsampels is not a ptq setting; did you mean calib.nsamples?"),
    (["method=gptqq"], "method=gptqq is not a method preset; choose one of:"),
    (["bits=3,4"], "needs -m (a sweep over them)"),
    (["bits=9"], "bits=9 is outside 2..8"),
    (["group_size=-3"], "group_size=-3 is invalid"),
    (["method=gptq", "calib=file", "calib.path=/nonexistent/c.txt"], "calib.path='/nonexistent/c.txt' does not exist"),
    (["method=gptq", "calib=file", "calib.path={empty}"], "holds no text"),
    (["method=gptq", "calib=file", "calib.path={short}"], "not more than one window of calib.seqlen=64"),
    (["method=gptq", "calib.nsamples=100000000"], "GiB of host memory for a block's inputs, more than"),
    (["eval.tasks=[piqa,no_such_task]"], "eval.tasks: 'no_such_task' has no local data"),
    (["device=cuda:7"], "device=cuda:7"),
    (["method=gptq", "calib=wikitext2"], "Offline, use calib=wikitext2_valid"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), BAD_INPUT, ids=lambda v: v[0] if isinstance(v, list) else None)
def test_bad_input_is_one_sentence_before_any_work(tmp_path, args, message):
    """Exit 2, the sentence on stderr, no traceback, no result.json, and what the folder held before kept."""
    from tests.conftest import require_assets
    from tests.test_cli import QUICK, ptq_run

    require_assets("models/stories260K")
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "short.txt").write_text("Too short for a window.")
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = [a.format(empty=tmp_path / "empty.txt", short=tmp_path / "short.txt") for a in args]
    proc = ptq_run(*QUICK, *args, f"output_dir={out}", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert not (out / "result.json").exists() and (out / "notes.txt").read_text() == "mine"


def test_settings_a_method_does_not_use_are_named(tmp_path):
    from tests.conftest import require_assets
    from tests.test_cli import QUICK, ptq_run

    require_assets("models/stories260K", "data/wikitext-2-raw-v1/test.jsonl")
    args = [*QUICK, "method=rtn", "calib=file", "calib.path=/nonexistent", "eval.max_windows=1", "eval.baseline=false"]
    proc = ptq_run(*args, f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warning = next(line for line in (proc.stdout + proc.stderr).splitlines() if "reads no calibration data" in line)
    assert "method=rtn reads no calibration data:" in warning and "calib.path" in warning and "ignored" in warning


DISK_FILLS = """
import errno, sys
from ptq.storage import shards

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

shards.save_file = no_space
sys.argv = ["ptq.run", *sys.argv[1:]]
from ptq.run import main
main()
"""


def test_a_disk_that_fills_during_save_is_one_sentence_and_keeps_the_finished_blocks(tmp_path):
    import subprocess
    import sys

    from tests.conftest import require_assets
    from tests.test_cli import ASSETS, QUICK

    require_assets("models/stories260K", "data/wikitext-2-raw-v1/test.jsonl")
    script = tmp_path / "disk_fills.py"
    script.write_text(DISK_FILLS)
    out = tmp_path / "run"
    args = [*QUICK, "method=rtn", "group_size=-1", "save=true", "eval.max_windows=1", f"output_dir={out}"]
    proc = subprocess.run([sys.executable, str(script), *args, f"paths.assets={ASSETS}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"no space left on the disk while writing {out / 'model'}" in proc.stderr
    assert not (out / "result.json").exists() and not (out / "model").exists() and not list(out.glob(".model.*"))
    assert len(list((out / "progress").glob("block-*.safetensors"))) == 5  # stories260K's blocks, for resume=true


def test_a_failing_job_of_a_sweep_leaves_its_error_and_the_others_go_on(tmp_path):
    import json

    from tests.conftest import require_assets
    from tests.test_cli import QUICK, ptq_run

    require_assets("models/stories260K", "data/wikitext-2-raw-v1/test.jsonl")
    sweep = tmp_path / "sweep"
    proc = ptq_run("-m", *QUICK, "method=rtn", "bits=4,9,3", "eval.max_windows=1", "eval.baseline=false",
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "1 job(s) of the sweep failed" in proc.stderr and "Traceback" not in proc.stderr
    bits = sorted(json.loads(p.read_text())["bits"] for p in sweep.glob("*/result.json"))
    assert bits == [3, 4]
    (failed,) = sweep.glob("*/error.json")
    assert "bits=9 is outside 2..8" in json.loads(failed.read_text())["error"]


DETERMINISM = [
    ("gptq", {}),
    ("awq", {}),
    ("smoothquant+gptq", {"act_bits": 8, "group_size": -1, "sym": True}),
    ("quarot+gptq", {"act_bits": 4, "group_size": -1, "sym": True}),
    ("gptq", {"format": "nvfp4"}),
]


@pytest.mark.parametrize(("method", "settings"), DETERMINISM)
def test_the_same_settings_and_seed_give_bit_identical_weights_on_cpu(method, settings):
    states = []
    for _ in range(2):
        model = tiny_model("llama")
        ptq.quantize(model, method=method, calib=CALIB, device="cpu", **settings)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_the_same_command_twice_gives_the_same_record(tmp_path):
    import json

    from tests.conftest import require_assets
    from tests.test_cli import QUICK, ptq_run

    require_assets("models/stories260K", "data/wikitext-2-raw-v1/test.jsonl")
    records = []
    for name in ("a", "b"):
        args = [*QUICK, "method=gptq", "group_size=-1", "cache.enabled=false", f"output_dir={tmp_path / name}"]
        proc = ptq_run(*args, cwd=tmp_path)
        assert proc.returncode == 0 and "Token indices sequence length" not in proc.stderr  # windows are cut later
        records.append(json.loads((tmp_path / name / "result.json").read_text()))
    a, b = records
    assert a["metrics"] == b["metrics"] and a["baseline"]["metrics"] == b["baseline"]["metrics"]
    assert [x["layers"] for x in a["quantization"]["blocks"]] == [x["layers"] for x in b["quantization"]["blocks"]]
    assert a["calibration"]["offsets"] == b["calibration"]["offsets"]


def test_long_work_reports_where_it_is(caplog):
    import logging

    from ptq.bars import Bar

    with caplog.at_level(logging.INFO, logger="ptq"), Bar(8, "perplexity", "window", quarters=True) as bar:
        for _ in range(8):
            bar.step()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" (")[0] for line in lines] == [f"perplexity: {n}/8 windows" for n in (2, 4, 6, 8)]
    assert "left)" in lines[0] and lines[-1].endswith("elapsed)")
