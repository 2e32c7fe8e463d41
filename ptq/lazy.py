"""Quantizing models larger than host memory: build the model on the meta device and materialize one
decoder block at a time from its safetensors shards.

With ``offload=true`` and a local safetensors checkpoint, ``run`` loads only the skeleton (parameters
on the meta device), the embeddings, the final norm and the LM head. The pipeline then reads each
block's tensors from the shards right before it quantizes the block (the next block's are read in a
background thread meanwhile, so disk reads overlap the work), and afterwards keeps the block's linears only
in compact form (``ptq.quant.linear.quantized_linear``): host memory holds two bf16 blocks (the current one
and the one read ahead) plus the packed model so far, not the bf16 model (a 70B model is ~140 GB in bf16,
~37 GB packed at 4 bits).
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from ptq.models import get_blocks, get_submodule, is_tied_head
from ptq.quant.activations import move_input_stages
from ptq.quant.linear import quantized_linear
from ptq.quant.pack import PackError
from ptq.quant.weight import QuantizedWeight
from ptq.storage.shards import INDEX, SINGLE


def has_safetensors(path: str) -> bool:
    folder = Path(path)
    return (folder / INDEX).is_file() or (folder / SINGLE).is_file()


class ShardedCheckpoint:
    """Where each tensor of a safetensors checkpoint lives; tensors are read one at a time on demand."""

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        self.folder = Path(path)
        if (self.folder / INDEX).is_file():
            self.weight_map = json.loads((self.folder / INDEX).read_text())["weight_map"]
        else:
            with safe_open(str(self.folder / SINGLE), framework="pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), SINGLE)
        self.bytes_read = 0

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor, each shard opened once (loading a whole quantized checkpoint)."""
        from safetensors.torch import load_file

        state = {}
        for file in sorted(set(self.weight_map.values())):
            state |= load_file(str(self.folder / file))
        self.bytes_read += sum(t.numel() * t.element_size() for t in state.values())
        return state

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.folder / self.weight_map[name]), framework="pt") as f:
            tensor = f.get_tensor(name)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


class LazyModel:
    """Materializes and releases modules of a meta-device model from a ``ShardedCheckpoint``."""

    def __init__(self, model: nn.Module, checkpoint: ShardedCheckpoint, dtype: torch.dtype) -> None:
        self.model, self.checkpoint, self.dtype = model, checkpoint, dtype
        self.names = {id(m): name for name, m in model.named_modules()}
        self.block_ids = {id(b) for b in get_blocks(model)}
        self.materialized_blocks = 0
        self.peak_materialized_blocks = 0
        self._reader: ThreadPoolExecutor | None = None
        self._ahead: dict[int, Future] = {}

    def _to_read(self, module: nn.Module) -> list[tuple[str, str]]:
        """(parameter name, checkpoint key) of the parameters of ``module`` still on the meta device."""
        prefix = self.names[id(module)]
        wanted = []
        for name, param in module.named_parameters():
            key = f"{prefix}.{name}" if prefix else name
            if param.is_meta and not is_tied_head(self.model.config, key):  # a tied head: tie_weights(), no read
                wanted.append((name, key))
        return wanted

    def read_ahead(self, module: nn.Module) -> None:
        """Start reading ``module``'s tensors in a background thread (file reads release the GIL), so that the
        next block is in host memory when the pipeline reaches it; ``load`` then takes them."""
        keys = [key for _, key in self._to_read(module) if key in self.checkpoint.weight_map]
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptq-read-ahead")
        self._ahead[id(module)] = self._reader.submit(lambda: {key: self.checkpoint.read(key) for key in keys})

    def load(self, module: nn.Module) -> None:
        from accelerate.utils import set_module_tensor_to_device

        ahead = self._ahead.pop(id(module), None)
        values = ahead.result() if ahead is not None else {}
        for name, key in self._to_read(module):
            if key not in self.checkpoint.weight_map:
                raise PackError(f"{self.checkpoint.folder}: no tensor {key!r} in the checkpoint")
            value = values.pop(key) if key in values else self.checkpoint.read(key)
            set_module_tensor_to_device(module, name, "cpu", value=value.to(self.dtype))
        if id(module) in self.block_ids:
            self.materialized_blocks += 1
            self.peak_materialized_blocks = max(self.peak_materialized_blocks, self.materialized_blocks)

    def release(self, block: nn.Module) -> None:
        """Back to the meta device (a block read only to be evaluated, before quantization)."""
        block.to("meta")
        self.materialized_blocks -= 1

    def load_all_but_blocks(self) -> None:
        in_blocks = {id(m) for b in get_blocks(self.model) for m in b.modules()}
        for module in self.model.modules():
            if id(module) not in in_blocks and not list(module.children()):
                self.load(module)
        self.model.tie_weights()

    def pack_block(self, block: nn.Module, quantized: dict[str, QuantizedWeight]) -> None:
        """Keep the block's quantized linears only in their compact form (``quantized_linear``: GPTQ-
        packed integers, or the stored form of other formats), with their activation quantizers, and
        count the block as released."""
        for name, qw in quantized.items():
            dense = get_submodule(block, name)
            packed = quantized_linear(qw, dense.bias, self.dtype)
            move_input_stages(dense, packed)  # W8A8 stays W8A8, rotated inputs stay rotated
            block.set_submodule(name, packed)
        self.materialized_blocks -= 1


def meta_model(config, dtype: torch.dtype) -> nn.Module:
    """The model of ``config`` with its parameters on the meta device (buffers such as rotary tables real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.config.use_cache = False
    return model


def lazy_model(model: nn.Module, checkpoint, dtype: torch.dtype) -> LazyModel:
    """A ``LazyModel`` of a meta-device model with everything outside the decoder blocks read now."""
    lazy = LazyModel(model, checkpoint, dtype)
    lazy.load_all_but_blocks()
    return lazy


def load_skeleton(path: str, dtype: torch.dtype) -> LazyModel:
    """The model on the meta device, with everything outside the decoder blocks read from the checkpoint."""
    from transformers import AutoConfig

    return lazy_model(meta_model(AutoConfig.from_pretrained(path), dtype), ShardedCheckpoint(path), dtype)
