"""Saving and loading quantized models in the GPTQ checkpoint layout (``quant_method: gptq``).

``<dir>/`` holds ``config.json`` (with a ``quantization_config`` as AutoGPTQ / GPTQModel /
transformers write it), the tokenizer files, and safetensors shards (``model.safetensors`` or several
with an index, written block by block: ``ptq.storage.shards``): for every quantized linear
``<name>.qweight/.qzeros/.scales/.g_idx`` (and ``.bias``), every other tensor in fp16.

ptq loads such a folder itself (``model.path=<dir>``) into ``QuantLinear`` modules, without the
optional GPTQ kernels packages transformers would need.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ptq.lazy import ShardedCheckpoint
from ptq.methods.gptq import gptq_step
from ptq.models import get_submodule, get_weight, is_linear, is_tied_head
from ptq.quant.linear import QUANTIZED_LAYERS, QuantLinear
from ptq.quant.pack import PACKED_BITS, WORD, PackError, StorageCount, check_packable, nbytes, pack_gptq
from ptq.quant.spec import WeightSpec
from ptq.quant.weight import QuantizedWeight
from ptq.recipe import spec_fields
from ptq.storage.shards import BlockwiseStore

SAVED_DTYPE = torch.float16  # the GPTQ format's activations/scales dtype


class PackedStore(BlockwiseStore):
    """The GPTQ-layout folder ``out``, written as the pipeline finishes each block."""

    def __init__(self, recipe, out: Path, max_shard_size: int | str = "5GB") -> None:
        super().__init__(out, SAVED_DTYPE, max_shard_size)
        self.recipe = recipe
        self.act_order = False

    def linear_tensors(self, name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        self.act_order |= not qw.has_contiguous_groups()
        return pack_gptq(qw)

    def quantization_config(self, model: nn.Module) -> dict:
        return quantization_config(self.recipe, self.act_order)


def check_savable(bits: int, linears: dict[str, nn.Module]) -> None:
    """Fail before quantizing if these linears could not be saved in the GPTQ layout (bit widths and
    activation quantization are checked with the other settings, in ``ptq.config``)."""
    for name, module in linears.items():
        out_features, in_features = get_weight(module).shape
        try:
            check_packable(bits, in_features, out_features)
        except PackError as err:
            raise PackError(f"save=true: {name}: {err}") from None


def quantization_config(recipe, act_order: bool) -> dict:
    """The ``quantization_config`` GPTQ loaders read, with this run's settings. ``desc_act`` says whether
    g_idx is permuted (the reference's act-order without static groups); GPTQ's own settings are
    written only when GPTQ made the weights."""
    spec = recipe.weights
    config = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "sym": spec.sym,
        "desc_act": act_order,
        "ptq_method": recipe.method,
    }
    gptq = gptq_step(recipe)
    if gptq is not None:
        config |= {"static_groups": gptq.static_groups, "true_sequential": gptq.true_sequential,
                   "damp_percent": gptq.percdamp}  # fmt: skip
    return config


def quantization_config_of(config) -> dict | None:
    """The config's ``quantization_config`` as a dict (transformers may hold it as an object)."""
    qc = getattr(config, "quantization_config", None)
    return qc if isinstance(qc, dict) or qc is None else qc.to_dict()


def checkpoint_kind(config) -> str | None:
    """``gptq`` or ``compressed-tensors`` for a quantized checkpoint ptq loads, None for a dense one."""
    qc = quantization_config_of(config)
    method = (qc or {}).get("quant_method")
    return method if method in ("gptq", "compressed-tensors") else None


def loaded_recipe_fields(qc: dict) -> dict:
    """What a loaded checkpoint holds, as a record's recipe fields (``method: loaded``)."""
    if qc.get("quant_method") == "compressed-tensors":
        from ptq.storage.compressed_tensors import specs_from_config

        return {"method": "loaded", **spec_fields(*specs_from_config(qc))}
    spec = WeightSpec("int", qc["bits"], qc["group_size"], qc.get("sym", False))
    return {"method": "loaded", **spec_fields(spec, None)}


def skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The model of ``config`` with its parameters on the meta device (buffers such as rotary tables real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def fill(model: nn.Module, state: dict[str, torch.Tensor], path: str, built: frozenset[str] = frozenset()) -> nn.Module:
    """Assign ``state`` to a ``skeleton``, re-tie the head and check that every parameter got a value
    and every tensor a home; ``built``: layers put in place complete, which ``state`` does not cover."""
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in result.missing_keys
               if not is_tied_head(model.config, k) and k.rpartition(".")[0] not in built]  # fmt: skip
    if missing or result.unexpected_keys:
        raise PackError(f"{path}: checkpoint does not match the model: missing {missing}, unexpected "
                        f"{result.unexpected_keys}")  # fmt: skip
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise PackError(f"{path}: no values for {still_meta}")
    model.eval()
    model.config.use_cache = False
    return model


def load_quantized(path: str, dtype: torch.dtype) -> nn.Module:
    """A model whose linears are ``QuantLinear`` modules holding the checkpoint's packed tensors."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    qc = quantization_config_of(config)
    if qc.get("checkpoint_format", "gptq") != "gptq" or qc["bits"] not in PACKED_BITS:
        raise PackError(f"{path}: only GPTQ-format checkpoints with bits in {PACKED_BITS} load in ptq; got {qc}")
    spec = WeightSpec("int", qc["bits"], qc["group_size"], qc.get("sym", False))
    del config.quantization_config
    state = ShardedCheckpoint(path).read_all()
    model = skeleton(config, dtype)
    for name in sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".qweight")}):
        old = get_submodule(model, name)
        if old is None or not is_linear(old):
            raise PackError(f"{path}: {name} holds packed weights but the model has no linear layer there")
        out_features, in_features = get_weight(old).shape
        if in_features % WORD or out_features % WORD:
            raise PackError(f"{path}: {name} is {out_features}x{in_features}, not packable")
        has_bias = f"{name}.bias" in state
        model.set_submodule(name, QuantLinear(in_features, out_features, spec, has_bias, dtype))
    state = {k: v.to(dtype) if v.is_floating_point() and not k.endswith(".scales") else v for k, v in state.items()}
    fill(model, state, path)
    model.config.quantization_config = qc  # kept for the record (not used by transformers from here on)
    return model


def layer_kinds(model: nn.Module) -> dict[str, int]:
    """How many linears of each kind the model holds (``Linear`` for dense ones): what a load made."""
    kinds: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, (nn.Linear, *QUANTIZED_LAYERS)):
            kinds[type(module).__name__] = kinds.get(type(module).__name__, 0) + 1
    return dict(sorted(kinds.items()))


def module_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (tied tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or t.is_meta or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def loaded_storage(model: nn.Module) -> dict:
    """The storage summary (``ptq.quant.pack.StorageCount``) of a loaded checkpoint, from its buffers."""
    count = StorageCount()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            count.add_packed(name, m.in_features * m.out_features, nbytes(m.packed()))
    return count.summary(model)
