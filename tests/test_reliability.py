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
