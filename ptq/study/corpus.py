"""``python -m ptq.study prepare source=<folder of .txt books>``: a training corpus for small models.

Books in, token shards out: strip the Project Gutenberg header and footer, unwrap hard-wrapped paragraphs,
drop paragraphs seen before (repeated boilerplate, duplicate editions), hold out whole books for
validation, train a byte-level BPE tokenizer (the ``tokenizers`` library) on the training books, and
write the token ids as uint16 shards (``train_000.bin`` ..., ``val_000.bin``) with ``meta.json``.
Shards are small enough to ship to a GPU machine one by one. ``source`` may also be a bare git
repository (e.g. a mirror of ``rcdm-uga/Gutenberg_Text``): its ``.txt`` blobs are read one by one and
missing blobs are skipped and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ptq.errors import UserError

log = logging.getLogger("ptq.study")

EOS = "<|endoftext|>"
# Project Gutenberg's markers; older books say "*** START OF THIS PROJECT GUTENBERG EBOOK", newer "*** START OF
# THE PROJECT GUTENBERG EBOOK", some only "End of the Project Gutenberg EBook of ..." before the license.
_START = re.compile(r"^\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(
    r"^(\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*|End of Project Gutenberg's.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_PRODUCED_BY = re.compile(r"^(Produced by|This e-?text was prepared by|E-text prepared by)", re.IGNORECASE)


@dataclass(frozen=True)
class PrepareConfig:
    source: str
    out: str
    vocab_size: int = 4096
    val_fraction: float = 0.02  # of the books, chosen by seed; whole books, so no validation text is trained on
    shard_tokens: int = 16_000_000  # uint16 ids: 32 MB per shard
    tokenizer_sample_chars: int = 200_000_000  # train the tokenizer on the first this many characters of training text
    min_paragraph_chars: int = 1  # shorter paragraphs are dropped
    dedupe_min_chars: int = 40  # only paragraphs at least this long count as repeats (keeps "CHAPTER I" etc.)
    seed: int = 0


def check_prepare(cfg: PrepareConfig) -> None:
    if not Path(cfg.source).exists():
        raise UserError(f"source={cfg.source} does not exist; point it at a folder of .txt files (or a git repository)")
    if not 256 < cfg.vocab_size <= 65535:
        raise UserError(f"vocab_size={cfg.vocab_size}: ids are stored as uint16, so use 257..65535")
    if not 0 < cfg.val_fraction < 0.5:
        raise UserError(f"val_fraction={cfg.val_fraction} must be in (0, 0.5)")
    if cfg.shard_tokens < 1024:
        raise UserError(f"shard_tokens={cfg.shard_tokens} must be at least 1024")
    if (Path(cfg.out) / "meta.json").exists():
        raise UserError(f"out={cfg.out} already holds a prepared corpus (meta.json); choose another folder")


def _is_git_dir(path: Path) -> bool:
    return path.is_dir() and (path / "HEAD").is_file() and (path / "objects").is_dir()


def read_books(source: str | Path) -> Iterator[tuple[str, str]]:
    """(name, text) of every ``.txt`` file under ``source`` in name order; unreadable files are skipped."""
    source = Path(source)
    if _is_git_dir(source):
        yield from _read_git_books(source)
        return
    paths = [source] if source.is_file() else sorted(p for p in source.rglob("*.txt") if p.is_file())
    for path in paths:
        try:
            yield (
                str(path.relative_to(source) if path != source else path.name),
                path.read_bytes().decode("utf-8", errors="replace"),
            )
        except OSError as err:
            log.warning("skipped %s: %s", path, err)


def _read_git_books(repo: Path) -> Iterator[tuple[str, str]]:
    """Blobs of a (bare) git repository, through one ``git cat-file --batch``; missing blobs are skipped."""
    listing = subprocess.run(
        ["git", "--git-dir", str(repo), "ls-tree", "-r", "-z", "HEAD"], capture_output=True, check=True
    ).stdout
    entries = []
    for item in listing.split(b"\0"):
        if not item:
            continue
        meta, name = item.split(b"\t", 1)
        if name.lower().endswith(b".txt"):
            entries.append((name.decode("utf-8", errors="replace"), meta.split()[2].decode()))
    entries.sort()
    with subprocess.Popen(
        ["git", "--git-dir", str(repo), "cat-file", "--batch"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as proc:
        for name, sha in entries:
            proc.stdin.write(sha.encode() + b"\n")
            proc.stdin.flush()
            header = proc.stdout.readline().split()
            if len(header) < 3 or header[1] != b"blob":
                log.warning("skipped %s: blob %s is missing from the repository", name, sha)
                continue
            data = proc.stdout.read(int(header[2]))
            proc.stdout.read(1)  # the newline after each object
            yield name, data.decode("utf-8", errors="replace")
        proc.stdin.close()


def strip_boilerplate(text: str) -> str:
    """The book between Project Gutenberg's START and END markers, without its "Produced by" credit."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _START.search(text)
    if start:
        text = text[start.end() :]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    return text


def paragraphs(text: str, min_chars: int = 1) -> list[str]:
    """Hard-wrapped lines joined: blank lines separate paragraphs; whitespace inside one collapses."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        if len(para) >= min_chars and not _PRODUCED_BY.match(para):
            out.append(para)
    return out


def _choose_validation(names: list[str], fraction: float, seed: int) -> set[str]:
    count = max(1, round(len(names) * fraction))
    return set(random.Random(seed).sample(sorted(names), count))


def _train_tokenizer(texts: Iterator[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_hf_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer as transformers loads it (``AutoTokenizer.from_pretrained(folder)``)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    fast.save_pretrained(folder)


class ShardWriter:
    """uint16 token ids into ``<prefix>_NNN.bin`` files of ``shard_tokens`` ids each."""

    def __init__(self, folder: Path, prefix: str, shard_tokens: int):
        self.folder, self.prefix, self.shard_tokens = folder, prefix, shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.files: list[str] = []
        self.tokens = 0

    def add(self, ids: list[int]) -> None:
        self.buffer.append(np.asarray(ids, dtype=np.uint16))
        self.buffered += len(ids)
        self.tokens += len(ids)
        while self.buffered >= self.shard_tokens:
            self._write(self.shard_tokens)

    def _write(self, count: int) -> None:
        flat = np.concatenate(self.buffer)
        name = f"{self.prefix}_{len(self.files):03d}.bin"
        tmp = self.folder / (name + ".tmp")
        flat[:count].tofile(tmp)
        tmp.rename(self.folder / name)
        self.files.append(name)
        self.buffer = [flat[count:]]
        self.buffered = len(flat) - count

    def close(self) -> None:
        if self.buffered:
            self._write(self.buffered)


def prepare(cfg: PrepareConfig) -> dict:
    """Write the corpus (tokenizer, shards, ``meta.json``) to ``cfg.out``; returns the metadata."""
    check_prepare(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # Pass 1: clean every book, drop repeated paragraphs, keep the result in memory (about a gigabyte of text
    # for the whole Gutenberg mirror) so the tokenizer and the encoder read it without cleaning twice.
    seen: set[bytes] = set()
    books: dict[str, list[str]] = {}
    stats = {"files": 0, "empty": 0, "duplicate_books": 0, "paragraphs": 0, "repeated_paragraphs": 0, "chars": 0}
    book_hashes: set[bytes] = set()
    for name, raw in read_books(cfg.source):
        stats["files"] += 1
        paras = paragraphs(strip_boilerplate(raw), cfg.min_paragraph_chars)
        book_hash = hashlib.blake2b("\n".join(paras).encode(), digest_size=16).digest()
        if not paras:
            stats["empty"] += 1
            continue
        if book_hash in book_hashes:
            stats["duplicate_books"] += 1
            continue
        book_hashes.add(book_hash)
        kept = []
        for para in paras:
            if len(para) >= cfg.dedupe_min_chars:
                key = hashlib.blake2b(para.encode(), digest_size=12).digest()
                if key in seen:
                    stats["repeated_paragraphs"] += 1
                    continue
                seen.add(key)
            kept.append(para)
        stats["paragraphs"] += len(kept)
        stats["chars"] += sum(map(len, kept))
        books[name] = kept
    if not books:
        raise UserError(f"source={cfg.source} holds no readable .txt books; point it at a folder of .txt files")
    validation = _choose_validation(list(books), cfg.val_fraction, cfg.seed)
    train_names = [n for n in books if n not in validation]
    log.info(
        "%d books (%d held out), %d paragraphs, %.0fM characters",
        len(books),
        len(validation),
        stats["paragraphs"],
        stats["chars"] / 1e6,
    )

    def tokenizer_texts() -> Iterator[str]:
        budget = cfg.tokenizer_sample_chars
        for name in random.Random(cfg.seed).sample(train_names, len(train_names)):
            text = "\n".join(books[name])
            yield text
            budget -= len(text)
            if budget <= 0:
                return

    tokenizer = _train_tokenizer(tokenizer_texts(), cfg.vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    save_hf_tokenizer(tokenizer, out / "tokenizer")
    eos = tokenizer.token_to_id(EOS)

    shards = {}
    for split, names in (("train", train_names), ("val", sorted(validation))):
        writer = ShardWriter(out, split, cfg.shard_tokens)
        for start in range(0, len(names), 64):
            batch = names[start : start + 64]
            for encoding in tokenizer.encode_batch(["\n".join(books[n]) for n in batch]):
                writer.add(encoding.ids + [eos])  # each book ends with the end-of-text token
        writer.close()
        shards[split] = {"files": writer.files, "tokens": writer.tokens, "books": len(names)}
    meta = {
        "kind": "precision-corpus",
        "config": asdict(cfg),
        "stats": stats,
        "dtype": "uint16",
        "eos_id": eos,
        "vocab_size": tokenizer.get_vocab_size(),
        "tokenizer_sha256": hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest(),
        "shards": shards,
        "validation_books": sorted(validation),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info(
        "train %d tokens in %d shards, val %d tokens",
        shards["train"]["tokens"],
        len(shards["train"]["files"]),
        shards["val"]["tokens"],
    )
    return meta


@dataclass
class Corpus:
    """A prepared corpus: its folder and metadata; token ids are memory-mapped shard by shard."""

    folder: Path
    meta: dict

    @classmethod
    def open(cls, folder: str | Path) -> Corpus:
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise UserError(
                f"data={folder} is not a prepared corpus (no meta.json); run python -m ptq.study prepare "
                f"source=<folder of .txt files> out={folder}"
            )
        return cls(folder, json.loads(meta_path.read_text()))

    def tokens(self, split: str, limit: int | None = None) -> np.ndarray:
        """The split's ids as one uint16 array (the shards present, in order), at most ``limit`` of them."""
        arrays, total = [], 0
        for name in self.meta["shards"][split]["files"]:
            path = self.folder / name
            if not path.is_file():
                if split == "train" and arrays:
                    break  # a partial copy of the training shards (the first ones) is enough
                raise UserError(f"data={self.folder}: shard {name} is missing; copy it or prepare the corpus again")
            arrays.append(np.fromfile(path, dtype=np.uint16))
            total += len(arrays[-1])
            if limit is not None and total >= limit:
                break
        if not arrays:
            raise UserError(f"data={self.folder} has no {split} shards")
        flat = np.concatenate(arrays)
        return flat[:limit] if limit is not None else flat

    def tokenizer_folder(self) -> Path:
        return self.folder / "tokenizer"
