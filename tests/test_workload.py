"""Your own workload: perplexity on any text (file:, hub:), per-example losses and where quantization hurts,
and every calibration preset that ships."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from ptq.config import REPO_ROOT
from ptq.data import CALIB_SETS, DataError, calibration_text, check_eval_source, eval_name, load_eval_text
from ptq.eval.perplexity import per_example, perplexity_of
from tests.conftest import ASSETS, require_assets
from tests.test_cli import QUICK, ptq_run


def test_text_files_jsonl_fields_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "second"}) + "\n\n" + json.dumps({"body": "third"}) + "\n")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    assert load_eval_text(f"file:{tmp_path}/a.txt", ASSETS).rows == ["first document"]
    assert load_eval_text(f"file:{tmp_path}/b.jsonl#body", ASSETS).rows == ["second", "third"]
    folder = load_eval_text(f"file:{tmp_path}#body", ASSETS)
    assert folder.rows == ["first document", "second", "third"] and folder.joined == "first document\n\nsecond\n\nthird"
    with pytest.raises(DataError, match="line 1 is not a JSON object with a 'text' field"):
        load_eval_text(f"file:{tmp_path}/b.jsonl", ASSETS)
    with pytest.raises(DataError, match="does not exist"):
        check_eval_source(f"file:{tmp_path}/missing.txt")
    with pytest.raises(DataError, match="hub:<dataset>"):
        check_eval_source("hub:only-a-name")
    with pytest.raises(DataError, match="file:<path>"):
        check_eval_source("wikitext3")
    check_eval_source("hub:wikitext:wikitext-2-raw-v1:test:text")  # well-formed; read only when run


def test_a_file_is_named_by_its_content(tmp_path):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "notes.txt").write_text("the same notes")
    names = {eval_name(f"file:{p}", load_eval_text(f"file:{p}", ASSETS))
             for p in (tmp_path / "x" / "notes.txt", tmp_path / "y" / "notes.txt")}  # fmt: skip
    assert len(names) == 1 and next(iter(names)).startswith("file:notes.txt@")
    (tmp_path / "y" / "notes.txt").write_text("changed notes")
    changed = eval_name(f"file:{tmp_path}/y/notes.txt", load_eval_text(f"file:{tmp_path}/y/notes.txt", ASSETS))
    assert changed not in names and eval_name("wikitext2", None) == "wikitext2"


def test_per_example_losses_and_positions():
    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 3.0, 3.0, 3.0]])
    windows = torch.zeros(2, 5, dtype=torch.long)
    record = per_example(nll, windows)
    assert record["window_nll"] == [2.5, 3.0] and record["window_start"] == [0, 5]
    assert record["position_bucket"] == 1 and record["position_nll"] == [2.0, 2.5, 3.0, 3.5]
    assert perplexity_of(nll) == pytest.approx(torch.tensor(2.75).exp().item())


def test_every_calibration_preset_that_ships_loads():
    for preset in sorted((REPO_ROOT / "ptq" / "conf" / "calib").glob("*.yaml")):
        name = yaml.safe_load(preset.read_text())["name"]
        assert name is None or name in CALIB_SETS, preset.name  # None: calib=file, a path of the user's
        local = name and CALIB_SETS[name].local
        if local and (ASSETS / local).is_file():
            assert calibration_text(name, None, ASSETS).joined.strip(), preset.name
    require_assets("data/ptb/ptb.test.txt")
    assert calibration_text("ptb_test", None, ASSETS).source.endswith("ptb.test.txt")


def test_your_own_text_and_where_it_hurts(tmp_path):
    require_assets("models/stories260K", "data/wikitext-2-raw-v1/test.jsonl")
    notes = tmp_path / "notes.txt"
    notes.write_text(" ".join(f"Day {i}: the cat sat on the mat and looked at the dog." for i in range(400)))
    out = tmp_path / "run"
    proc = ptq_run(*QUICK, "method=rtn", "bits=3", f"eval.ppl=[wikitext2,file:{notes}]", "eval.per_example=true",
                   f"output_dir={out}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "result.json").read_text())
    name = next(k for k in record["metrics"]["ppl"] if k.startswith("file:notes.txt@"))
    assert record["eval"]["ppl"][name]["source"] == str(notes) and len(record["eval"]["ppl"][name]["digest"]) == 64
    for metrics in (record["metrics"], record["baseline"]["metrics"]):
        example = metrics["per_example"][name]
        assert len(example["window_nll"]) == record["eval"]["ppl"][name]["windows"] == 4
        assert perplexity_of(torch.tensor(example["window_nll"])[:, None]) == pytest.approx(metrics["ppl"][name])
    report = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "ptq.report", "--where-it-hurts", str(out), "--out", str(report),
                           "--top", "2"], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"### rtn w3 g128 asym: {name}" in proc.stdout and "Rise in mean NLL by position" in proc.stdout
    assert (report / "where_it_hurts.md").is_file() and (report / "where_it_hurts.png").is_file()
    bare = tmp_path / "bare"
    proc = ptq_run(*QUICK, "method=rtn", "eval.max_windows=2", f"output_dir={bare}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ptq.report", "--where-it-hurts", str(bare)], capture_output=True,
                          text=True, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "eval.per_example=true" in proc.stderr


def test_a_task_folder_of_ones_own_runs_offline(tmp_path):
    """eval.task_include: the user's YAML task (data in a local JSON file) runs through lm-eval's own task
    manager, offline, and the record names its definition."""
    require_assets("models/stories260K", "data/wikitext-2-raw-v1/test.jsonl")
    rows = [{"question": f"Is {i} even?", "choices": ["yes", "no"], "label": i % 2} for i in range(6)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data_files = {"test": str(tmp_path / "rows.jsonl")}
    (tasks / "parity.yaml").write_text(
        yaml.safe_dump(
            {"task": "my_parity", "dataset_path": "json", "dataset_kwargs": {"data_files": data_files},
             "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}} Answer:",
             "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]}
        )
    )  # fmt: skip
    out = tmp_path / "run"
    proc = ptq_run(*QUICK, "method=rtn", "eval.max_windows=2", "eval.baseline=false", f"eval.task_include={tasks}",
                   "eval.tasks=[my_parity]", "eval.task_source=local", f"output_dir={out}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    score = json.loads((out / "result.json").read_text())["metrics"]["tasks"]["my_parity"]
    assert score["source"] == "include" and score["data"].endswith("parity.yaml") and score["samples"] == 6
    assert 0 <= score["acc"] <= 1
    proc = ptq_run(*QUICK, "method=rtn", f"eval.task_include={tmp_path}/none", "eval.tasks=[my_parity]",
                   f"output_dir={tmp_path}/bad", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "eval.task_include" in proc.stderr and "Traceback" not in proc.stderr
