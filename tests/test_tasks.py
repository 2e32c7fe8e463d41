"""lm-eval tasks: the offline definitions give the standard documents, prompts and targets."""

import json

import pytest

from ptq.eval.tasks import (
    LOCAL_TASKS,
    TaskError,
    local_task_config,
    resolve_tasks,
    standard_config,
    task_files,
    task_manager,
)
from tests.conftest import require_assets
from tests.test_cli import QUICK, ptq_run

# Rows as the Hub datasets that lm-eval's standard tasks read hold them (their schema, their values),
# for the first item of each local file.
HUB_ROWS = {
    "piqa": {
        "goal": "How do I ready a guinea pig cage for it's new occupants?",
        "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you "
        "will also need to supply it with a water bottle and a food dish.",
        "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, you "
        "will also need to supply it with a water bottle and a food dish.",
        "label": 0,
    },
    "arc_easy": {
        "id": "Mercury_417466",
        "question": "Which statement best explains why photosynthesis is the foundation of most food webs?",
        "choices": {
            "text": [
                "Sunlight is the source of energy for nearly all ecosystems.",
                "Most ecosystems are found on land instead of in water.",
                "Carbon dioxide is more available than other gases.",
                "The producers in all ecosystems are plants.",
            ],
            "label": ["A", "B", "C", "D"],
        },
        "answerKey": "A",
    },
    "winogrande": {
        "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
        "option1": "Sarah",
        "option2": "Maria",
        "answer": "2",
    },
    "boolq": {"question": "does ethanol take more energy make that produces", "passage": None, "idx": 0, "label": 0},
}


def build(config: dict):
    return task_manager().load([config])["tasks"][config["task"]]


def first_doc(task):
    return next(iter(task.test_docs() if task.has_test_docs() else task.validation_docs()))


def standard_task_on(row: dict, name: str, split: str):
    """lm-eval's standard definition of ``name``, fed one Hub-schema row instead of the download."""
    from datasets import Dataset, DatasetDict

    config = standard_config(name)
    config.pop("tag", None)
    splits = {"training_split": None, "validation_split": None, "test_split": None, f"{split}_split": split}
    return build({**config, **splits, "custom_dataset": lambda **_: DatasetDict({split: Dataset.from_list([row])})})


@pytest.mark.parametrize("name", sorted(HUB_ROWS))
def test_offline_tasks_give_the_standard_prompts_and_targets(name):
    assets = require_assets("data/piqa", "data/arc", "data/winogrande", "data/boolq")
    local = build(local_task_config(name, task_files(name, assets / "data")))
    doc = first_doc(local)
    row = dict(HUB_ROWS[name])
    if name == "boolq":  # the passage is long; it is the file's own text in both
        row["passage"] = doc["passage"]
    standard = standard_task_on(row, LOCAL_TASKS[name].standard, LOCAL_TASKS[name].split)
    hub_doc = first_doc(standard)
    assert local.doc_to_text(doc) == standard.doc_to_text(hub_doc)
    assert local.doc_to_choice(doc) == standard.doc_to_choice(hub_doc)
    assert local.doc_to_target(doc) == standard.doc_to_target(hub_doc)
    assert [m["metric"] for m in local.config.metric_list] == [m["metric"] for m in standard.config.metric_list]


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("piqa", 1838),
        ("arc_easy", 2376),
        ("arc_challenge", 1172),
        ("winogrande", 1267),
        ("boolq", 3270),
        ("lambada_standard", 5153),
        ("hellaswag_local", 10042),
    ],
)
def test_offline_tasks_have_every_document(name, count):
    assets = require_assets("data")
    assert len(LOCAL_TASKS[name].rows(task_files(name, assets / "data"))) == count


def test_offline_names_and_missing_files(tmp_path):
    assets = require_assets("data/lambada", "data/hellaswag")
    assert resolve_tasks(["lambada", "hellaswag"], "local", assets / "data") == [
        ("lambada_standard", "local"),
        ("hellaswag_local", "local"),
    ]
    with pytest.raises(TaskError, match="'mmlu' has no local data"):
        resolve_tasks(["mmlu"], "local", assets / "data")
    with pytest.raises(TaskError, match="needs .*/piqa/valid.jsonl.*eval.task_files.piqa=<file> or eval.task_data"):
        resolve_tasks(["piqa"], "local", tmp_path)


def test_a_task_run_is_recorded(tmp_path):
    require_assets("models/stories260K", "data/piqa", "data/lambada")
    out = tmp_path / "tasks"
    proc = ptq_run(
        *QUICK,
        "method=rtn",
        "eval.tasks=[piqa,lambada]",
        "eval.limit=16",
        "eval.task_source=local",
        "eval.batch_size=8",
        f"output_dir={out}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "result.json").read_text())
    tasks = record["metrics"]["tasks"]
    assert set(tasks) == {"piqa", "lambada_standard"}
    piqa = tasks["piqa"]
    assert 0 <= piqa["acc"] <= 1 and 0 <= piqa["acc_norm"] <= 1 and piqa["acc_stderr"] > 0
    assert piqa["samples"] == 16 and piqa["source"] == "local" and piqa["note"] is None
    assert tasks["lambada_standard"]["perplexity"] > 1 and "original LAMBADA" in tasks["lambada_standard"]["note"]
    assert set(record["baseline"]["metrics"]["tasks"]) == {"piqa", "lambada_standard"}
    assert "piqa acc" in proc.stdout and "lambada_standard ppl (lm-eval)" in proc.stdout


def test_a_local_task_reads_the_file_it_is_given(tmp_path):
    """eval.task_files: another split in the same schema (here: the first 5 ARC-Easy rows), not renamed."""
    assets = require_assets("data/arc")
    standard = task_files("arc_easy", assets / "data")
    mine = tmp_path / "my-arc-dev.jsonl"
    mine.write_text("".join(standard[0].read_text().splitlines(keepends=True)[:5]))
    chosen = {"arc_easy": str(mine)}
    assert task_files("arc_easy", assets / "data", chosen) == [mine]
    assert resolve_tasks(["arc_easy"], "local", tmp_path / "nowhere", chosen=chosen) == [("arc_easy", "local")]
    assert len(LOCAL_TASKS["arc_easy"].rows(task_files("arc_easy", assets / "data", chosen))) == 5
    with pytest.raises(TaskError, match="the task reads 2, in this order: valid.jsonl, valid-labels.lst"):
        task_files("piqa", assets / "data", {"piqa": str(mine)})
    with pytest.raises(TaskError, match="eval.task_files.arc_easy"):
        resolve_tasks(["arc_easy"], "local", assets / "data", chosen={"arc_easy": str(tmp_path / "missing.jsonl")})
