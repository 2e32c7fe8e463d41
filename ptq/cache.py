"""On-disk cache for the work a sweep would otherwise repeat in every job: tokenized evaluation text,
calibration windows, and the full-precision model's scores.

An entry's key is a hash of everything its value depends on: the text itself (not its file name),
the tokenizer's full definition, the sampling settings, the model files, dtype and device, the eval
settings and the library versions. Change any of them and the key changes; nothing is ever looked
up by name alone. Entries are written atomically next to a JSON file listing what the key covers.

``cache.dir`` (or ``PTQ_CACHE``) sets the folder, default ``~/.cache/ptq``; ``cache.enabled=false``
turns it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when what an entry means changes


def default_dir() -> Path:
    return Path(os.environ.get("PTQ_CACHE") or Path.home() / ".cache" / "ptq")


def digest(*parts) -> str:
    """sha256 of strings, bytes and tensors (by dtype, shape and contents)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(part, bytes):
            h.update(part)
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """The tokenizer's complete definition (vocabulary, merges, normalizer, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    settings = {
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
    }
    return digest(definition, settings)


def files_digest(path: str) -> str:
    """A local model folder by its files' names, sizes and modification times; a hub id by name."""
    p = Path(path)
    if not p.exists():
        return digest({"hub": path})
    files = sorted(f for f in p.rglob("*") if f.is_file())
    return digest([[str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns] for f in files])


class Cache:
    def __init__(self, root: Path | None, enabled: bool = True) -> None:
        self.root = Path(root) if root else default_dir()
        self.enabled = enabled
        self.hits: list[str] = []  # what this run took from the cache, for the record

    def key(self, kind: str, deps: dict) -> str:
        return f"{kind}/{digest(CACHE_VERSION, kind, deps)[:24]}"

    def _write(self, path: Path, write, deps: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write(tmp)
        os.replace(tmp, path)  # atomic: a concurrent job sees the old state or the whole entry
        path.with_suffix(".deps.json").write_text(json.dumps(deps, indent=1, sort_keys=True, default=str))

    def _get(self, kind: str, deps: dict, compute, suffix: str, read, write):
        if not self.enabled:
            return compute()
        key = self.key(kind, deps)
        path = self.root / f"{key}{suffix}"
        if path.is_file():
            try:
                value = read(path)
                self.hits.append(key)
                log.info("cache: %s from %s", kind, path)
                return value
            except Exception as err:  # a damaged entry is recomputed, never trusted
                log.warning("cache: ignoring unreadable %s (%s)", path, err)
        value = compute()
        self._write(path, lambda p: write(value, p), deps)
        return value

    def tensors(self, kind: str, deps: dict, compute) -> dict[str, torch.Tensor]:
        """``compute()`` -> dict of tensors (and JSON-able values), or the stored result for ``deps``."""
        return self._get(kind, deps, compute, ".pt", lambda p: torch.load(p, weights_only=True), torch.save)

    def json(self, kind: str, deps: dict, compute) -> dict:
        """``compute()`` -> a JSON-able dict, or the stored result for ``deps``."""
        return self._get(
            kind, deps, compute, ".json", lambda p: json.loads(p.read_text()), lambda v, p: p.write_text(json.dumps(v))
        )
