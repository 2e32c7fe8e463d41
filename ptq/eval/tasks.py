"""Task scores through lm-eval (EleutherAI's harness), on the model in memory, online or offline.

Online, a task is lm-eval's own definition, data from the Hugging Face Hub. Offline, the same
definition (prompt, choices, target, metrics: lm-eval's YAML, loaded from the installed package)
reads local files instead: only the data loading is swapped, through the config's
``custom_dataset`` hook, and each local row is converted to the Hub dataset's schema. Where the
local file is not the Hub's data, the task says so in its ``note`` (and is named differently when
the prompts differ): see LOCAL_TASKS.
"""

from __future__ import annotations

import bz2
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ptq import hub
from ptq.bars import Bar
from ptq.errors import UserError

log = logging.getLogger(__name__)


class TaskError(UserError):
    """A task cannot run as asked; the message names the fix."""


# ---------------------------------------------------------------------------------------------
# Local files -> the Hub datasets' schemas


def file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _labels(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def piqa_rows(files: list[Path]) -> list[dict]:
    """baber/piqa, validation: goal, sol1, sol2, label (int)."""
    rows, labels = _jsonl(files[0]), _labels(files[1])
    return [
        {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)}
        for r, y in zip(rows, labels, strict=True)
    ]


def arc_rows(files: list[Path]) -> list[dict]:
    """allenai/ai2_arc ARC-Easy / ARC-Challenge, test: id, question, choices {text, label}, answerKey."""
    out = []
    for r in _jsonl(files[0]):
        choices = r["question"]["choices"]
        out.append(
            {
                "id": r["id"],
                "question": r["question"]["stem"],
                "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                "answerKey": r["answerKey"],
            }
        )
    return out


def winogrande_rows(files: list[Path]) -> list[dict]:
    """allenai/winogrande winogrande_xl, validation (= WinoGrande 1.1 dev): sentence, option1, option2, answer."""
    rows, labels = _jsonl(files[0]), _labels(files[1])
    return [
        {"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": y}
        for r, y in zip(rows, labels, strict=True)
    ]


def boolq_rows(files: list[Path]) -> list[dict]:
    """aps/super_glue boolq, validation: question, passage, idx, label (0 = no, 1 = yes)."""
    rows = _jsonl(files[0])
    return [
        {"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
        for i, r in enumerate(rows)
    ]


def lambada_rows(files: list[Path]) -> list[dict]:
    """The original LAMBADA test passages (what lm-eval's lambada_standard reads): text."""
    lines = files[0].read_text(encoding="utf-8").splitlines()
    return [{"text": line.strip()} for line in lines if line.strip()]


def hellaswag_rows(files: list[Path]) -> list[dict]:
    """HellaSwag validation from the assets' text file (6 lines per item: "activity_label: ctx",
    label, 4 endings), with lm-eval's bracket cleanup applied: query, choices, label."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    with bz2.open(files[0], "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    out = []
    for i in range(0, len(lines) - 5, 6):
        query, label, *endings = lines[i : i + 6]
        out.append({"query": preprocess(query), "choices": [preprocess(e) for e in endings], "label": int(label)})
    return out


def wikitext_rows(files: list[Path]) -> list[dict]:
    """EleutherAI/wikitext_document_level wikitext-2-raw-v1, test: one ``page`` per article,
    rebuilt from the raw rows by starting a page at each top-level heading (" = Title = ")."""
    rows = [json.loads(line)["text"] for line in files[0].read_text().splitlines()]
    pages: list[list[str]] = []
    for i, row in enumerate(rows):
        is_title = row.startswith(" = ") and not row.startswith(" = = ") and row.rstrip().endswith(" =")
        if is_title and (i == 0 or rows[i - 1] == ""):
            pages.append([])
        if pages:
            pages[-1].append(row)
    return [{"page": "".join(p)} for p in pages]


@dataclass(frozen=True)
class LocalTask:
    standard: str  # lm-eval's task whose definition (prompts, metrics) is used
    split: str  # the split of that definition that the rows fill
    rows: Callable[[list[Path]], list[dict]]  # from the task's files, in the order of ``files``
    files: tuple[str, ...]  # relative to the data folder; eval.task_files.<task> may name others
    note: str | None = None  # how the local data differs from the standard source, if it does
    drop: tuple[str, ...] = ()  # config keys not to take over from the standard definition


LOCAL_TASKS: dict[str, LocalTask] = {
    "piqa": LocalTask("piqa", "validation", piqa_rows, ("piqa/valid.jsonl", "piqa/valid-labels.lst")),
    "arc_easy": LocalTask("arc_easy", "test", arc_rows, ("arc/ARC-Easy-Test.jsonl",)),
    "arc_challenge": LocalTask("arc_challenge", "test", arc_rows, ("arc/ARC-Challenge-Test.jsonl",)),
    "winogrande": LocalTask(
        "winogrande", "validation", winogrande_rows, ("winogrande/dev.jsonl", "winogrande/dev-labels.lst")
    ),
    "boolq": LocalTask("boolq", "validation", boolq_rows, ("boolq/dev.jsonl",)),
    "lambada_standard": LocalTask(
        "lambada_standard",
        "test",
        lambada_rows,
        ("lambada/lambada_test_plain_text.txt",),
        note="original LAMBADA test release (5153 passages, tokenized, lower-cased); lambada_openai's "
        "detokenized text is not available offline",
    ),
    "hellaswag_local": LocalTask(
        "hellaswag",
        "validation",
        hellaswag_rows,
        ("hellaswag/hellaswag_val_full.txt.bz2",),
        note="HellaSwag validation from a preprocessed text file: the context is 'activity_label: ctx' with "
        "ctx_b not capitalized (lm-eval capitalizes it), so prompts differ slightly from lm-eval's hellaswag",
        drop=("process_docs",),
    ),
    "wikitext": LocalTask(
        "wikitext",
        "test",
        wikitext_rows,
        ("wikitext-2-raw-v1/test.jsonl",),
        note="documents rebuilt from the raw WikiText-2 test rows (one page per top-level heading)",
    ),
}
# Names that offline resolve to a local task with another name (the record keeps the local name).
LOCAL_ALIASES = {"lambada": "lambada_standard", "hellaswag": "hellaswag_local"}


def task_data_dir(assets_root: Path, data_dir: str | None) -> Path:
    return Path(data_dir) if data_dir else assets_root / "data"


def task_files(name: str, data_dir: Path, chosen: dict | None = None) -> list[Path]:
    """The files a local task reads: ``eval.task_files.<task>`` (one path, or a list in the order of the
    task's ``files``) where given, else the standard names under the data folder."""
    spec = LOCAL_TASKS[name]
    given = (chosen or {}).get(name)
    if given is None:
        return [data_dir / f for f in spec.files]
    paths = [Path(p).expanduser() for p in ([given] if isinstance(given, str) else given)]
    if len(paths) != len(spec.files):
        raise TaskError(
            f"eval.task_files.{name} names {len(paths)} file(s); the task reads {len(spec.files)}, in this order: "
            f"{', '.join(Path(f).name for f in spec.files)}"
        )
    return paths


def included_tasks(include: str | None) -> dict[str, str]:
    """{task: its YAML file} defined in the user's folder ``eval.task_include`` (lm-eval's include_path)."""
    if not include:
        return {}
    folder = Path(include).expanduser()
    if not folder.is_dir():
        raise TaskError(f"eval.task_include={include!r} is not a folder of lm-eval task YAML files")
    builtin = set(task_manager().task_index)
    return {name: str(entry.yaml_path) for name, entry in task_manager(str(folder)).task_index.items()
            if name not in builtin}  # fmt: skip


def resolve_tasks(
    names: list[str], source: str, data_dir: Path, include: str | None = None, chosen: dict | None = None
) -> list[tuple[str, str]]:
    """(task name as it will be recorded, "hub" | "local" | "include") for each requested name; checks
    that local files exist before anything expensive runs. Tasks defined in ``include`` (the user's own
    YAML files) run as defined there, whatever ``source`` says."""
    own = included_tasks(include)
    if include and not own:
        raise TaskError(f"eval.task_include={include!r} defines no lm-eval task (no YAML file with a 'task:' name)")
    if source == "auto" and any(name not in own for name in names):
        source = "hub" if hub.reachable() else "local"
        log.info("lm-eval tasks: %s data (eval.task_source=auto)", source)
    resolved = []
    for name in names:
        if name in own:
            resolved.append((name, "include"))
            continue
        if source == "hub":
            resolved.append((name, "hub"))
            continue
        local = LOCAL_ALIASES.get(name, name)
        if local not in LOCAL_TASKS:
            raise TaskError(
                f"eval.tasks: {name!r} has no local data; offline tasks are {', '.join(sorted(LOCAL_TASKS))} "
                f"(plus the aliases {', '.join(sorted(LOCAL_ALIASES))}); run with the hub reachable for others"
            )
        missing = [str(f) for f in task_files(local, data_dir, chosen) if not f.is_file()]
        if missing:
            raise TaskError(
                f"eval.tasks: {name!r} needs {', '.join(missing)}; set eval.task_files.{local}=<file> or "
                "eval.task_data=<folder> (or paths.assets) to where the task files are, or eval.task_source=hub"
            )
        if local != name:
            log.warning("eval.tasks: %r runs offline as %r (%s)", name, local, LOCAL_TASKS[local].note)
        resolved.append((local, "local"))
    return resolved


@functools.cache
def task_manager(include: str | None = None):
    """lm-eval's index of its task definitions, with the user's folder ``include`` (building it scans
    every YAML: once per folder)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include)


def standard_config(name: str) -> dict:
    """lm-eval's YAML definition of task ``name``, includes resolved."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(task_manager().task_index[name].yaml_path, resolve_func=True)


def local_task_config(name: str, files: list[Path]) -> dict:
    """lm-eval's own definition of the standard task, reading the local rows instead of the Hub."""
    from datasets import Dataset, DatasetDict

    spec = LOCAL_TASKS[name]
    config = standard_config(spec.standard)
    for key in ("tag", "group", "dataset_path", "dataset_name", *spec.drop):
        config.pop(key, None)
    rows = spec.rows(files)

    def load(**_kwargs):
        return DatasetDict({spec.split: Dataset.from_list(rows)})

    # Only the evaluated split exists locally (few-shot examples, if asked for, come from it too).
    splits = {"training_split": None, "validation_split": None, "test_split": None, "fewshot_split": None}
    splits[f"{spec.split}_split"] = spec.split
    return {**config, **splits, "task": name, "custom_dataset": load}


# ---------------------------------------------------------------------------------------------
# Running


def _metrics(result: dict) -> dict:
    """lm-eval's "acc,none" / "acc_stderr,none" keys -> {"acc": .., "acc_stderr": ..}."""
    out = {}
    for key, value in result.items():
        if "," not in key or isinstance(value, str):
            continue
        metric, _filter = key.split(",", 1)
        out[metric] = value if value != "N/A" else None
    return out


def evaluate_tasks(
    model,
    tokenizer,
    resolved: list[tuple[str, str]],
    data_dir: Path,
    batch_size: int | str,
    limit: int | float | None,
    num_fewshot: int | None,
    device,
    seed: int = 0,
    max_length: int | None = None,
    include: str | None = None,
    chosen: dict | None = None,
) -> dict:
    """Score ``model`` (in memory, as it is) on each task of ``resolved`` (from ``resolve_tasks``);
    returns {task: metrics + provenance}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device), max_length=max_length)
    scores = {}
    with Bar(len(resolved), "lm-eval tasks", "task") as bar:
        for name, where in resolved:
            files = task_files(name, data_dir, chosen) if where == "local" else []
            spec = local_task_config(name, files) if where == "local" else name
            start = time.perf_counter()
            try:
                out = simple_evaluate(
                    model=lm,
                    tasks=[spec],
                    num_fewshot=num_fewshot,
                    limit=limit,
                    log_samples=False,
                    bootstrap_iters=100000,
                    random_seed=seed,
                    numpy_random_seed=seed,
                    torch_random_seed=seed,
                    fewshot_random_seed=seed,
                    task_manager=task_manager(str(Path(include).expanduser()) if include else None),
                )
            except AssertionError as err:  # lm-eval asserts (without a message) when an answer outgrows the context
                raise TaskError(
                    f"lm-eval stopped on task {name!r} ({err!r}); the usual cause is an answer longer than the "
                    f"model's context of {lm.max_length} tokens: set eval.max_length=<tokens> (positions beyond the "
                    "trained context are extrapolated) or leave the task out"
                ) from err
            seconds = time.perf_counter() - start
            result = out["results"][name]
            entry = _metrics(result)
            own = included_tasks(include) if where == "include" else {}
            entry.update(
                source=where,
                data=[str(f) for f in files] if where == "local" else own.get(name, "hub"),
                data_digest=[file_digest(f) for f in files] if where == "local" else None,
                standard_definition=LOCAL_TASKS[name].standard if where == "local" else name,
                note=LOCAL_TASKS[name].note if where == "local" else None,
                samples=out.get("n-samples", {}).get(name, {}).get("effective"),
                num_fewshot=num_fewshot or 0,
                seconds=seconds,
            )
            scores[name] = entry
            bar.step()
            accuracy = {k: v for k, v in entry.items() if k in ("acc", "acc_norm")}
            log.info("task %d/%d %s: %s (%.1f s; %s)", bar.done, len(resolved), name, accuracy, seconds, bar.eta())
    return scores
