"""Checkpoint folders written while the model is quantized, block by block, never all at once.

``ShardedFolder`` buffers tensors up to ``max_shard_size`` and writes each full buffer as a safetensors
shard into a temporary folder next to the destination; ``finish`` names the shards as transformers does
(``model.safetensors``, or ``model-00001-of-0000N.safetensors`` with ``model.safetensors.index.json``),
adds the config and tokenizer files and renames the folder into place. Until then nothing at the
destination looks like a checkpoint, and a failed run removes the temporary folder (``discard``).

``BlockwiseStore`` is what the pipeline feeds: each quantized linear's stored tensors (``add``, a
format's ``linear_tensors``) and, once a decoder block is final, the block's other tensors
(``block_done``); ``save`` writes what is outside the blocks (embeddings, final norm, LM head) and
finishes the folder. Host memory holds at most one shard of output at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ptq.errors import UserError, disk_space_for
from ptq.quant.weight import QuantizedWeight

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
UMASK = os.umask(0o022)
os.umask(UMASK)  # the process's file-creation mask (reading it means setting it)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


class OutputExistsError(UserError, FileExistsError):
    """The checkpoint's folder is already taken: nothing good is overwritten."""


def parse_size(size: int | str) -> int:
    """Bytes in ``5GB``, ``500MB``, ``2GiB`` or an integer (transformers' ``max_shard_size`` units)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not match or match.group(2) not in _UNITS:
        raise UserError(f"max_shard_size={size!r} is not a size such as 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy with its own storage: safetensors refuses tensors sharing memory (one g_idx
    serves q, k and v), and the copy cannot change under the writer once the model moves on."""
    return tensor.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)


class ShardedFolder:
    def __init__(self, out: Path, max_shard_size: int | str = "5GB") -> None:
        self.out = Path(out)
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise OutputExistsError(
                f"{self.out} already exists and is not an empty folder; choose a new output folder (output_dir)"
            )
        self.limit = parse_size(max_shard_size)
        self.tmp: Path | None = None
        self.shards: list[list[str]] = []  # the keys of each shard written so far
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.total_bytes = 0

    def _folder(self) -> Path:
        if self.tmp is None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".partial", dir=self.out.parent))
            self.tmp.chmod(0o755)  # mkdtemp's folder is private; the checkpoint is not
        return self.tmp

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + nbytes > self.limit:
            self._flush()
        self.buffer[key] = own_storage(tensor)
        self.buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self.buffer:
            return
        path = self._folder() / f"part-{len(self.shards)}.safetensors"
        with disk_space_for(self.out):
            save_file(self.buffer, path, metadata={"format": "pt"})
        path.chmod(0o666 & ~UMASK)  # as any other file the run writes (safetensors' own is private)
        self.shards.append(list(self.buffer))
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self, write_files) -> dict[str, int]:
        """Write the last shard, the index and ``write_files(folder)`` (config, tokenizer), then move the
        folder into place; returns the bytes of each file."""
        try:
            self._flush()
            folder, n = self._folder(), len(self.shards)
            names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            weight_map = {}
            for i, (name, keys) in enumerate(zip(names, self.shards, strict=True)):
                os.replace(folder / f"part-{i}.safetensors", folder / name)
                weight_map |= dict.fromkeys(keys, name)
            if n > 1:
                index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
                (folder / INDEX).write_text(json.dumps(index, indent=2))
            with disk_space_for(self.out):
                write_files(folder)
            if self.out.exists():
                self.out.rmdir()
            os.replace(folder, self.out)
        except BaseException:
            self.discard()
            raise
        self.tmp = None
        return {p.name: p.stat().st_size for p in sorted(self.out.iterdir()) if p.is_file()}

    def discard(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


class BlockwiseStore:
    """A checkpoint in the making. Subclasses give a quantized linear's stored tensors
    (``linear_tensors``, replacing its ``weight``) and the ``quantization_config``; every other tensor
    is stored under its own name in ``dtype``."""

    def __init__(self, out: Path, dtype: torch.dtype, max_shard_size: int | str = "5GB") -> None:
        self.folder = ShardedFolder(out, max_shard_size)
        self.dtype = dtype
        self.pending: dict[str, dict[str, torch.Tensor]] = {}  # quantized linears not written yet
        self.quantized: list[str] = []
        self.written_blocks: list[str] = []  # prefixes ("model.layers.3.") of the blocks already written
        # A block's parameters that its quantized linears stand for (a MoE block's fused experts, stored
        # expert by expert): not written themselves.
        self.stored_as_linears: tuple[str, ...] = ()
        self.checkpoint_name = lambda key: key  # the name a tensor is stored under (see models.Experts)

    def linear_tensors(self, name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def quantization_config(self, model: nn.Module) -> dict:
        raise NotImplementedError

    def add(self, name: str, qw: QuantizedWeight) -> None:
        self.pending[name] = self.linear_tensors(name, qw)  # copied to the CPU when written (``ShardedFolder.add``)
        self.quantized.append(name)

    def block_done(self, prefix: str, block: nn.Module) -> None:
        """Write the finished block ``prefix`` (its quantized linears were ``add``-ed)."""
        self._write(block.state_dict(), prefix)
        self.written_blocks.append(prefix + ".")

    def _write(self, state: dict[str, torch.Tensor], prefix: str = "") -> None:
        inside = prefix + "." if prefix else ""
        linears = [name for name in self.pending if name.startswith(inside)]
        replaced = {f"{name}.weight" for name in linears}
        for key, tensor in state.items():
            if prefix and key in self.stored_as_linears:
                continue
            key = inside + key
            if key not in replaced:
                tensor = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
                self.folder.add(self.checkpoint_name(key), tensor)
        for name in linears:
            for local, tensor in self.pending.pop(name).items():
                self.folder.add(self.checkpoint_name(f"{name}.{local}"), tensor)

    def save(self, model: nn.Module, tokenizer) -> dict[str, int]:
        """Write everything not written yet (tied tensors once: transformers re-ties them) and finish."""
        rest, seen = {}, set()
        for key, tensor in model.state_dict().items():
            if key.startswith(tuple(self.written_blocks)) or (tensor.numel() > 0 and tensor.data_ptr() in seen):
                continue
            seen.add(tensor.data_ptr())
            rest[key] = tensor
        self._write(rest)
        self.config = self.quantization_config(model)
        config = model.config.to_dict()
        config["quantization_config"] = self.config
        config["dtype"] = config["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        config["use_cache"] = True  # ptq turns the KV cache off while it quantizes; generation wants it

        def write_files(folder: Path) -> None:
            (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
            generation_config = getattr(model, "generation_config", None)
            if generation_config is not None:
                generation_config.save_pretrained(folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)

        return self.folder.finish(write_files)

    def discard(self) -> None:
        """Remove what was written (the run failed)."""
        self.folder.discard()
