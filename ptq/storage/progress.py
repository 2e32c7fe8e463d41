"""A run's finished blocks on disk, so that an interrupted run can continue (``resume=true``).

After each decoder block the pipeline hands its final state here (``Progress.save_block``): the block's
tensors other than the quantized weights, the quantized weights as codes and group parameters, and what
the steps reported. Each block is one safetensors file, written to a temporary name and renamed into
place, so a file that exists is complete. A resumed run restores the first ``done`` blocks from these
files (``restore_block``: a weight is set to its codes' dequantized values, as ``set_quantized`` does),
runs them forward to recompute the inputs of the next block, and quantizes the rest.

``run.json`` holds the settings that decide the quantized weights: a run resumes only with the same ones.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ptq.errors import UserError, disk_space_for
from ptq.quant.pack import pack_nibbles, unpack_nibbles
from ptq.quant.spec import WeightSpec
from ptq.quant.weight import WEIGHT_KINDS, QuantizedWeight, split_fields
from ptq.storage.shards import own_storage

FOLDER = "progress"
SETTINGS = "run.json"


class ResumeError(UserError):
    """The run folder's saved blocks cannot continue this run."""


def _nibbles(q: QuantizedWeight) -> bool:
    """Codes of at most 4 bits, kept one per byte in memory: stored two per byte."""
    return q.qweight.dtype == torch.uint8 and q.spec.bits <= 4


def _block_file(folder: Path, index: int) -> Path:
    return folder / f"block-{index:05d}.safetensors"


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)  # a reader sees the old file or the whole new one, never a part


class Progress:
    """The ``progress/`` folder of one run: ``done`` blocks are saved and will be restored."""

    def __init__(self, output_dir: Path, settings: dict) -> None:
        self.folder = Path(output_dir) / FOLDER
        self.settings = settings
        self.done = 0

    @staticmethod
    def blocks_saved(output_dir: Path) -> int | None:
        """How many consecutive blocks an interrupted run left in ``output_dir``, or None if none did."""
        folder = Path(output_dir) / FOLDER
        if not (folder / SETTINGS).is_file():
            return None
        done = 0
        while _block_file(folder, done).is_file():
            done += 1
        return done

    def start(self, resume: bool) -> int:
        """Prepare the folder; with ``resume`` keep the blocks an earlier run with the same settings saved.
        Returns the number of blocks that will be restored."""
        saved = self.blocks_saved(self.folder.parent)
        if resume and saved is not None:
            earlier = json.loads((self.folder / SETTINGS).read_text())
            changed = sorted(k for k in earlier.keys() | self.settings.keys() if earlier.get(k) != self.settings.get(k))
            if changed:
                detail = ", ".join(f"{k}: {earlier.get(k)!r} then, {self.settings.get(k)!r} now" for k in changed)
                raise ResumeError(
                    f"resume=true: the interrupted run in {self.folder.parent} used other settings ({detail}); "
                    "rerun with its settings, or overwrite=true to start over"
                )
            self.done = saved
            return saved
        self.discard()
        self.folder.mkdir(parents=True)
        _write_atomically(self.folder / SETTINGS, lambda p: p.write_text(json.dumps(self.settings, indent=1)))
        return 0

    def save_block(self, index: int, block: torch.nn.Module, quantized: dict[str, QuantizedWeight], entry: dict):
        """Write block ``index`` as the steps left it (before any packing), with its report ``entry``."""
        tensors = {}
        skip = {f"{name}.weight" for name in quantized}
        for key, value in block.state_dict().items():
            if key not in skip:
                tensors[f"state/{key}"] = own_storage(value)
        specs = {}
        for name, q in quantized.items():
            kind, plain, tensor_names = split_fields(q)
            plain["spec"] = asdict(plain["spec"])
            specs[name] = {"kind": kind.__name__, "fields": plain, "columns": q.shape[1]}
            for field in tensor_names:
                value = getattr(q, field)
                if field == "qweight" and _nibbles(q):  # two 4-bit codes a byte: half the disk
                    value = pack_nibbles(value)
                tensors[f"q/{name}/{field}"] = own_storage(value)
        metadata = {"entry": json.dumps(entry), "specs": json.dumps(specs)}
        with disk_space_for(self.folder):
            _write_atomically(_block_file(self.folder, index), lambda p: save_file(tensors, str(p), metadata=metadata))

    def restore_block(self, index: int, block: torch.nn.Module, device: torch.device) -> tuple[dict, dict]:
        """Put block ``index`` back as it was saved; returns (its quantized weights by linear name, its
        report entry)."""
        path = _block_file(self.folder, index)
        try:
            tensors = load_file(str(path), device=str(device))
            with open(path, "rb") as f:  # the metadata, without a second pass over the tensors
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
        except (OSError, SafetensorError, ValueError, KeyError) as err:
            raise ResumeError(
                f"resume=true: {path} cannot be read ({err}); rerun with overwrite=true to start over"
            ) from None
        import ptq.methods  # noqa: F401  (registers the methods' own kinds of quantized weight)

        specs = json.loads(header["specs"])
        if any("kind" not in spec for spec in specs.values()):
            raise ResumeError(f"resume=true: {path} was written by an older ptq; rerun with overwrite=true")
        quantized = {}
        for name, spec in specs.items():
            plain = spec["fields"]
            plain["spec"] = WeightSpec(**plain["spec"])
            prefix = f"q/{name}/"
            fields = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            q = WEIGHT_KINDS[spec["kind"]](**plain, **fields)
            if "qweight" in fields and _nibbles(q):
                q.qweight = unpack_nibbles(q.qweight, spec["columns"])
            quantized[name] = q
        state = {k.removeprefix("state/"): v for k, v in tensors.items() if k.startswith("state/")}
        expected_missing = {f"{name}.weight" for name in quantized} & set(block.state_dict())  # not MoE experts
        missing, unexpected = block.load_state_dict(state, strict=False)
        if unexpected or set(missing) != expected_missing:
            raise ResumeError(
                f"resume=true: {path} does not match block {index} of this model; rerun with overwrite=true"
            )
        return quantized, json.loads(header["entry"])

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
