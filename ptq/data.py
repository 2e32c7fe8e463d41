"""Evaluation text and calibration windows, from the assets folder, any local file, or the hub.

A named data set resolves to its copy in the assets folder when that exists (the text is the same
as the hub's), otherwise to the hub through ``datasets``. Nothing is substituted: a data set that is
neither local nor reachable is an error that says how to point at a local file.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ptq import hub as ptq_hub
from ptq.errors import UserError

log = logging.getLogger(__name__)


class DataError(UserError):
    """A data set could not be found or read; the message names the fix."""


@dataclass(frozen=True)
class HubText:
    path: str
    name: str | None
    split: str
    field: str
    data_files: dict | None = None
    max_rows: int | None = None  # GPTQ's C4 evaluation uses the first 1100 validation documents


@dataclass(frozen=True)
class TextSet:
    """One named text: where it lives and how its rows become one string (the GPTQ protocol)."""

    description: str
    local: str | None  # file relative to the assets folder
    hub: HubText | None
    join: str  # separator between rows
    documents: bool = False  # calibrate on random windows of random long documents (GPTQ's C4)
    max_windows: int | None = None  # evaluation cap of the protocol (GPTQ's C4: 256 windows)


_C4_VAL = "en/c4-validation.00000-of-00008.json.gz"
_C4_TRAIN = "en/c4-train.00000-of-01024.json.gz"

EVAL_SETS: dict[str, TextSet] = {
    "wikitext2": TextSet(
        "WikiText-2 raw test, rows joined with '\\n\\n'",
        "data/wikitext-2-raw-v1/test.jsonl",
        HubText("wikitext", "wikitext-2-raw-v1", "test", "text"),
        "\n\n",
    ),
    "ptb": TextSet(
        "Penn Treebank test, sentences joined with ' '",
        "data/ptb/ptb.test.txt",
        HubText("ptb_text_only", "penn_treebank", "test", "sentence"),
        " ",
    ),
    "c4": TextSet(
        "C4 validation (first shard, first 1100 documents joined with ' ', as in the GPTQ code)",
        None,
        HubText("allenai/c4", None, "validation", "text", {"validation": _C4_VAL}, max_rows=1100),
        " ",
        max_windows=256,
    ),
}

CALIB_SETS: dict[str, TextSet] = {
    "wikitext2": TextSet(
        "WikiText-2 raw train (the GPTQ paper's WikiText-2 calibration)",
        None,
        HubText("wikitext", "wikitext-2-raw-v1", "train", "text"),
        "\n\n",
    ),
    "wikitext2_valid": TextSet(
        "WikiText-2 validation (tokenized variant with <unk>)",
        "data/wikitext-2/valid.tokens.txt",
        HubText("wikitext", "wikitext-2-v1", "validation", "text"),
        "",
    ),
    "ptb": TextSet("Penn Treebank train", None, HubText("ptb_text_only", "penn_treebank", "train", "sentence"), " "),
    "ptb_test": TextSet(  # what is offline in the assets: calibrating on the test set, so not for PTB scores
        "Penn Treebank test (in the assets; evaluating on PTB after calibrating on it overstates quality)",
        "data/ptb/ptb.test.txt",
        HubText("ptb_text_only", "penn_treebank", "test", "sentence"),
        " ",
    ),
    "c4": TextSet(
        "C4 train (first shard; random documents longer than seqlen, as in the GPTQ code)",
        None,
        HubText("allenai/c4", None, "train", "text", {"train": _C4_TRAIN}),
        " ",
        documents=True,
    ),
}


def _read_local_rows(path: Path, field: str = "text") -> list[str]:
    if path.suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line)[field])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(
                        f"{path}: line {number} is not a JSON object with a {field!r} field; give the field after "
                        f"'#' (file:{path}#<field>)"
                    ) from None
        return rows
    text = path.read_text(encoding="utf-8")
    if path.name.startswith("ptb."):
        return [line.strip() for line in text.splitlines()]  # as the hub's ptb_text_only sentences
    return [text]


def _read_hub_rows(name: str, hub: HubText, setting: str, alternatives: str) -> list[str]:
    import datasets

    try:
        with contextlib.nullcontext() if ptq_hub.reachable() else ptq_hub.offline():
            ds = datasets.load_dataset(hub.path, hub.name, split=hub.split, data_files=hub.data_files)
    except Exception as err:  # datasets raises many types for "offline" / "not found"
        reached = "the hub could not give" if ptq_hub.reachable() else "the hub cannot be reached, nor its cache give"
        raise DataError(
            f"{setting}: data set {name!r} has no local copy and {reached} {hub.path}/{hub.name or ''}:{hub.split} "
            f"({err.__class__.__name__}: {str(err)[:160]}). Offline, use {alternatives}"
        ) from err
    if hub.max_rows is not None:
        ds = ds.select(range(min(hub.max_rows, len(ds))))
    return list(ds[hub.field])


@dataclass
class Text:
    rows: list[str]
    source: str  # file path or hub id, for the record
    join: str

    @property
    def joined(self) -> str:
        return self.join.join(self.rows)


def load_text(name: str, sets: dict[str, TextSet], assets_root: Path, setting: str = "eval.ppl") -> Text:
    if name not in sets:
        raise DataError(f"{setting}: unknown data set {name!r}; choose one of: {', '.join(sorted(sets))}")
    spec = sets[name]
    if spec.local and (assets_root / spec.local).is_file():
        path = assets_root / spec.local
        return Text(_read_local_rows(path), str(path), spec.join)
    local = [n for n, s in sets.items() if s.local and (assets_root / s.local).is_file()]
    if setting == "calib":
        alternatives = " or ".join([f"calib={n}" for n in local] + ["calib=file calib.path=<file>"])
    else:
        alternatives = " or ".join([f"eval.ppl=[{n}]" for n in local] + ["eval.ppl=[file:<path>]"])
    alternatives += f" (sets with a local copy are read from paths.assets={assets_root})"
    if spec.hub is None:
        raise DataError(f"{setting}: data set {name!r} has no local copy under {assets_root}; use {alternatives}")
    rows = _read_hub_rows(name, spec.hub, setting, alternatives)
    return Text(rows, f"hub:{spec.hub.path}/{spec.hub.name or ''}:{spec.hub.split}", spec.join)


def load_text_file(path: str) -> Text:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"calib.path={path!r} does not exist; give a .txt file or a .jsonl file with a 'text' field")
    rows = _read_local_rows(p)
    if not any(row.strip() for row in rows):
        raise DataError(f"calib.path={path!r} holds no text; give a file with the calibration text in it")
    return Text(rows, str(p), "\n\n")


# ---------------------------------------------------------------------------------------------
# Evaluation text by name: a named set, file:<path>[#field] or hub:<dataset>[:config]:<split>:<field>

FILE, HUB = "file:", "hub:"
TEXT_SUFFIXES = (".txt", ".jsonl", ".md", ".text")


def check_eval_source(source: str) -> None:
    """Before any work: the name is a known set, an existing file or folder, or a well-formed hub id."""
    if source in EVAL_SETS:
        return
    if source.startswith(FILE):
        path = Path(source[len(FILE) :].partition("#")[0]).expanduser()
        if not path.exists():
            raise DataError(f"eval.ppl: {source!r}: {path} does not exist; give a text file, a .jsonl file or a folder")
        return
    if source.startswith(HUB):
        if not 3 <= len(source[len(HUB) :].split(":")) <= 4:
            raise DataError(f"eval.ppl: {source!r} is not hub:<dataset>[:<config>]:<split>:<field>")
        return
    raise DataError(
        f"eval.ppl has an unknown data set {source!r}; choose from {', '.join(sorted(EVAL_SETS))}, "
        "file:<path>[#field] or hub:<dataset>[:<config>]:<split>:<field>"
    )


def load_eval_text(source: str, assets_root: Path) -> Text:
    """The evaluation text of ``source`` (see ``check_eval_source``). Files and folders: plain text is one
    row per file, .jsonl one row per line (its ``text`` field, or the one after '#'); rows joined with
    blank lines, files in sorted order."""
    check_eval_source(source)
    if source in EVAL_SETS:
        return load_text(source, EVAL_SETS, assets_root, "eval.ppl")
    if source.startswith(HUB):
        parts = source[len(HUB) :].split(":")
        dataset, config, split, field = parts if len(parts) == 4 else (parts[0], None, *parts[1:])
        rows = _read_hub_rows(source, HubText(dataset, config, split, field), "eval.ppl", "eval.ppl=[file:<path>]")
        return Text(rows, source, "\n\n")
    location, _, field = source[len(FILE) :].partition("#")
    path = Path(location).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise DataError(f"eval.ppl: {path} holds no {', '.join(TEXT_SUFFIXES)} files")
    rows = [row for f in files for row in _read_local_rows(f, field or "text")]
    if not any(row.strip() for row in rows):
        raise DataError(f"eval.ppl: {source!r} holds no text")
    return Text(rows, str(path.resolve()), "\n\n")


def eval_name(source: str, text: Text) -> str:
    """The name a text's scores are recorded under: a named set's own name; a file's or folder's name
    with the digest of its content (the same text has the same name wherever it lives, a changed one
    another); a hub id as given."""
    if not source.startswith(FILE):
        return source
    from ptq.cache import digest

    return f"file:{Path(text.source).name}@{digest(text.joined)[:8]}"


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one row of token ids [1, T] (tokenized once, as in the GPTQ protocol; longer than
    the model's context by design, hence no warning about it)."""
    return tokenizer(text, return_tensors="pt", add_special_tokens=True, verbose=False).input_ids


# ---------------------------------------------------------------------------------------------
# Evaluation windows


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] from the start of the text; a partial tail is dropped."""
    n = ids.shape[1] // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"the evaluation text has {ids.shape[1]} tokens, fewer than one window of {seqlen}")
    return ids[0, : n * seqlen].reshape(n, seqlen)


# ---------------------------------------------------------------------------------------------
# Calibration


@dataclass
class Calibration:
    input_ids: torch.Tensor  # [nsamples, seqlen]
    source: str
    offsets: list  # start offset per window (or [document, offset] pairs)


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """``nsamples`` random windows of ``seqlen`` tokens from one long token row (GPTQ's sampling)."""
    total = ids.shape[1]
    if total <= seqlen:
        raise DataError(
            f"the calibration text has {total} tokens, not more than one window of calib.seqlen={seqlen}: give a "
            "longer text or lower calib.seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen, (nsamples,), generator=generator)
    index = starts[:, None] + torch.arange(seqlen)[None, :]
    return ids[0][index], starts.tolist()


def sample_document_windows(tokenizer, rows: list[str], nsamples: int, seqlen: int, seed: int):
    """GPTQ's C4 sampling: a random document longer than seqlen, then a random window inside it."""
    generator = torch.Generator().manual_seed(seed)
    windows, offsets = [], []
    for _ in range(100 * nsamples):
        if len(windows) == nsamples:
            break
        doc = int(torch.randint(0, len(rows), (1,), generator=generator))
        ids = tokenizer(rows[doc], return_tensors="pt", verbose=False).input_ids  # windows are cut from it
        if ids.shape[1] <= seqlen:
            continue
        start = int(torch.randint(0, ids.shape[1] - seqlen, (1,), generator=generator))
        windows.append(ids[0, start : start + seqlen])
        offsets.append([doc, start])
    if len(windows) < nsamples:
        raise DataError(
            f"found only {len(windows)} calibration documents longer than calib.seqlen={seqlen} tokens (of "
            f"calib.nsamples={nsamples}): lower calib.seqlen or calib.nsamples, or give longer documents"
        )
    return torch.stack(windows), offsets


def calibration_text(name: str | None, path: str | None, assets_root: Path) -> Text:
    return load_text_file(path) if path else load_text(name, CALIB_SETS, assets_root, "calib")


def sample_calibration(
    tokenizer, text: Text, documents: bool, nsamples: int, seqlen: int, seed: int
) -> tuple[torch.Tensor, list]:
    """Calibration windows [nsamples, seqlen] and where each starts. ``documents``: sample inside
    single documents (C4), else from the joined text."""
    if documents:
        return sample_document_windows(tokenizer, text.rows, nsamples, seqlen, seed)
    return sample_windows(tokenize(tokenizer, text.joined), nsamples, seqlen, seed)


def samples_documents(name: str | None, path: str | None) -> bool:
    return bool(name and not path and CALIB_SETS[name].documents)


def load_calibration(
    tokenizer, name: str | None, path: str | None, nsamples: int, seqlen: int, seed: int, assets_root: Path
) -> Calibration:
    text = calibration_text(name, path, assets_root)
    ids, offsets = sample_calibration(tokenizer, text, samples_documents(name, path), nsamples, seqlen, seed)
    return Calibration(ids, text.source, offsets)
