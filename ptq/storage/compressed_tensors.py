"""Saving quantized models in the compressed-tensors checkpoint format (``quant_method:
compressed-tensors``), which transformers loads through the compressed-tensors package and vLLM
serves with its own kernels.

A folder holds ``config.json`` (the model's config with a ``quantization_config``), the tokenizer
files and safetensors shards (with ``model.safetensors.index.json`` when there are several), written
block by block as the pipeline finishes each (``ptq.storage.shards``). Each
quantized linear ``<name>`` stores the tensors of its format (``tensors_for``); every other tensor is
stored under its own name in the model's dtype. The layouts are those of compressed-tensors 0.20's
compressors (``compressed_tensors/compressors/*/base.py``); compressed-tensors itself is not needed
to write them.

compressed-tensors' integer grid is signed: code q_ct = q - 2^(b-1) for ptq's unsigned code q, and
zero point z_ct = z - 2^(b-1) (symmetric grids store none: z = 2^(b-1) is z_ct = 0). Scales are the
same number in both (x = s * (q - z) = s * (q_ct - z_ct)).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ptq.errors import UserError
from ptq.models import get_submodule
from ptq.moe import FUSED_WEIGHTS, moe_blocks
from ptq.quant.pack import WORD, pack_nibbles, pack_rows, stored_scale
from ptq.quant.spec import PER_CHANNEL, PER_TENSOR, ActSpec, WeightSpec
from ptq.quant.weight import QuantizedWeight
from ptq.storage.shards import BlockwiseStore


class SaveError(UserError):
    """compressed-tensors cannot hold this model as quantized; the message names what it can hold."""


QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
FLOAT_QUANTIZED = "float-quantized"
NAIVE_QUANTIZED = "naive-quantized"
NVFP4_PACK_QUANTIZED = "nvfp4-pack-quantized"
MXFP4_PACK_QUANTIZED = "mxfp4-pack-quantized"
MXFP8_QUANTIZED = "mxfp8-quantized"

SAVABLE = (
    "compressed-tensors holds int weights (2-8 bits, per channel, per tensor or in groups, sym or asym) alone "
    "or with int activations, fp8_e4m3 weights (per channel, per tensor or in groups) alone or with fp8_e4m3 "
    "activations (per token or per tensor), nvfp4 weights alone or with nvfp4 activations, and mxfp4 or mxfp8 "
    "weights alone"
)
PERMUTED_G_IDX = (
    "GPTQ act-order without static groups permutes g_idx, which compressed-tensors (0.20 on) cannot store: "
    "it removed actorder='group' and weight_g_idx; quantize with gptq static_groups=true (the default)"
)
CALIBRATED_INPUT_SCALES = ("input_scale", "input_global_scale")


def check_savable(weights: WeightSpec | None, activations: ActSpec | None) -> None:
    """A ValueError naming what can be saved unless compressed-tensors has a layout for these specs."""
    if weights is None:
        raise SaveError(f"a full-precision model has nothing to compress; {SAVABLE}")
    if weights.format == "fp8_e5m2":
        raise SaveError(f"format=fp8_e5m2 cannot be saved: compressed-tensors' 8-bit floats are E4M3; {SAVABLE}")
    if activations is not None and activations.format not in ("int", "fp8_e4m3", "nvfp4"):
        # compressed-tensors rounds MX activation scales its own way (quantization/utils/mxfp_utils.py,
        # round_to_power_2 rounds the block max up past a threshold; OCP MX rounds down).
        raise SaveError(f"act_format={activations.format} cannot be saved; {SAVABLE}")


def compression_format(weights: WeightSpec, activations: ActSpec | None) -> str:
    """The format compressed-tensors infers for this scheme: the first in its priority list whose
    compressor accepts it (compressors/format.py, COMPRESSION_FORMAT_PRIORITY)."""
    check_savable(weights, activations)
    by_format = {"nvfp4": NVFP4_PACK_QUANTIZED, "mxfp4": MXFP4_PACK_QUANTIZED, "mxfp8": MXFP8_QUANTIZED}
    if weights.format in by_format:
        return by_format[weights.format]
    if weights.is_int:
        return INT_QUANTIZED if activations is not None else PACK_QUANTIZED
    return FLOAT_QUANTIZED if activations is not None else NAIVE_QUANTIZED


def weight_args(weights: WeightSpec, actorder: str | None = None) -> dict:
    """The weights' QuantizationArgs as compressed-tensors serializes them (unset optional fields left out)."""
    args = {"num_bits": weights.bits, "type": "int" if weights.is_int else "float", "symmetric": weights.sym}
    if weights.format == "nvfp4":
        args |= {"group_size": 16, "strategy": "tensor_group", "dynamic": False}
    elif weights.group_size == PER_CHANNEL:
        args |= {"group_size": None, "strategy": "channel", "dynamic": False}
    elif weights.group_size == PER_TENSOR:
        args |= {"group_size": None, "strategy": "tensor", "dynamic": False}
    else:
        args |= {"group_size": weights.group_size, "strategy": "group", "dynamic": False}
    if actorder is not None:
        args["actorder"] = actorder
    if weights.format == "nvfp4":
        args["scale_dtype"] = "torch.float8_e4m3fn"
    elif weights.format.startswith("mx"):
        args["scale_dtype"] = "torch.uint8"  # E8M0 exponents (compressors/mx_utils.py)
    return args


def activation_args(activations: ActSpec) -> dict:
    """Input activations' QuantizationArgs: symmetric, per token (dynamic) or per tensor (static);
    NVFP4 in blocks of 16 with dynamic block scales and a calibrated global scale (``dynamic: local``)."""
    if activations.format == "nvfp4":
        return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
                "dynamic": "local", "scale_dtype": "torch.float8_e4m3fn"}  # fmt: skip
    return {
        "num_bits": activations.bits,
        "type": "int" if activations.format == "int" else "float",
        "symmetric": True,
        "group_size": None,
        "strategy": "tensor" if activations.static else "token",
        "dynamic": not activations.static,
    }


def gptq_actorder(recipe) -> str | None:
    """``static`` when GPTQ ordered columns by activation with groups fixed up front (llm-compressor's
    default, informational: the groups stay contiguous); None otherwise."""
    from ptq.methods.gptq import gptq_step

    gptq = gptq_step(recipe)
    if gptq is None or not gptq.act_order:
        return None
    if not gptq.static_groups and recipe.weights.group_size > 0:
        raise SaveError(PERMUTED_G_IDX)
    return "static"


def quantization_config(recipe, ignore: list[str], act_order: bool) -> dict:
    """The ``quantization_config`` of config.json. ``ignore``: the linears left in full precision
    (``unquantized_linears``); ``act_order``: whether any quantized weight has a permuted g_idx."""
    if act_order:
        raise SaveError(PERMUTED_G_IDX)
    weights, activations = recipe.weights, recipe.activations
    fmt = compression_format(weights, activations)
    scheme = {
        "targets": ["Linear"],
        "weights": weight_args(weights, gptq_actorder(recipe)),
        "input_activations": activation_args(activations) if activations is not None else None,
        "output_activations": None,
        "format": fmt,
    }
    return {
        "quant_method": QUANT_METHOD,
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": scheme},
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def unquantized_linears(model: nn.Module, quantized) -> list[str]:
    """Every ``nn.Linear`` of the model not in ``quantized`` (e.g. lm_head): the config's ignore list."""
    quantized = set(quantized)
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in quantized]


def pack_int32_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``values`` [n, m] packed along dim 0 into int32 [ceil(n * bits / 32), m]: a little-endian
    bit stream (value i at bits i*bits of each run of 32), zero-padded to whole runs and cut to the words
    that hold values, as compressed-tensors' ``pack_to_int32`` (compressors/pack_quantized/helpers.py)."""
    n = values.shape[0]
    padded = nn.functional.pad(values.to(torch.int64), (0, 0, 0, -n % WORD))
    return pack_rows(padded, bits)[: math.ceil(n * bits / WORD)]


def unpack_int32_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of ``pack_int32_rows``: int32 [ceil(n * bits / 32), m] -> the first ``n`` values [n, m]."""
    from ptq.quant.pack import unpack_rows

    words = nn.functional.pad(words, (0, 0, 0, -words.shape[0] % bits))  # whole runs of 32 values
    return unpack_rows(words.contiguous(), bits)[:n]


def scale_and_zero(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point [out, groups]; per-tensor specs hold one value, shape [1]."""
    if qw.spec.per_tensor:
        return qw.scale.reshape(-1)[:1], qw.zero.reshape(-1)[:1]
    return qw.scale, qw.zero


def int_tensors(qw: QuantizedWeight, packed: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    bits = qw.spec.bits
    scale, zero = scale_and_zero(qw)
    zero = zero.round().to(torch.int16)
    out_features, in_features = qw.qweight.shape
    if packed:
        tensors = {
            "weight_packed": pack_int32_rows(qw.qweight.t(), bits).t(),
            "weight_scale": scale.to(dtype),
            "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
        }
    else:
        signed = qw.qweight.to(torch.int16) - 2 ** (bits - 1)
        tensors = {"weight": signed.to(torch.int8), "weight_scale": scale.to(dtype)}
    if not qw.spec.sym:
        if packed and not qw.spec.per_tensor:
            # Group and channel zero points are packed along the output dim (packed_dim=0), per-tensor
            # ones kept as int8 (compressors/pack_quantized/base.py, PACK_ZP_STRATS).
            tensors["weight_zero_point"] = pack_int32_rows(zero, bits)
        else:
            tensors["weight_zero_point"] = (zero - 2 ** (bits - 1)).to(torch.int8)
    return tensors


def tensors_for(
    name: str,
    qw: QuantizedWeight,
    input_scale: torch.Tensor | None = None,
    *,
    activations: ActSpec | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors stores for one linear, by local name (``weight_packed``,
    ``weight_scale``, ...), on the CPU with their own storage. ``activations``: the recipe's activation
    spec (it picks the format); ``input_scale``: the activations' calibrated scale (``ActSpec.calibrated``:
    stored as ``input_scale``, or as ``input_global_scale`` for NVFP4);
    ``dtype``: the model's dtype, which compressed-tensors stores scales in."""
    spec = qw.spec
    out_features, in_features = qw.qweight.shape
    if not qw.has_contiguous_groups():
        raise SaveError(f"{name}: {PERMUTED_G_IDX}")
    if spec.group_size > 0 and in_features % spec.group_size:
        raise SaveError(
            f"{name}: {in_features} input features are not a multiple of group_size={spec.group_size}, and "
            "compressed-tensors splits rows into whole groups; choose a group size that divides them"
        )
    fmt = compression_format(spec, activations)
    if fmt in (PACK_QUANTIZED, INT_QUANTIZED):
        tensors = int_tensors(qw, fmt == PACK_QUANTIZED, dtype)
    elif fmt in (FLOAT_QUANTIZED, NAIVE_QUANTIZED):
        tensors = {"weight": qw.qweight, "weight_scale": stored_scale(qw).to(dtype)}
    elif fmt == NVFP4_PACK_QUANTIZED:
        # The E4M3 block scales times the global scale g, which is stored as g itself: compressed-tensors
        # dequantizes with weight_scale / weight_global_scale (quantization/lifecycle/forward_helpers.py).
        tensors = {
            "weight_packed": pack_nibbles(qw.qweight),
            "weight_scale": stored_scale(qw),
            "weight_global_scale": qw.tensor_scale.float().reshape(1),
        }
    elif fmt == MXFP4_PACK_QUANTIZED:
        tensors = {"weight_packed": pack_nibbles(qw.qweight), "weight_scale": stored_scale(qw)}
    else:
        tensors = {"weight": qw.qweight, "weight_scale": stored_scale(qw)}
    calibrated = activations is not None and activations.calibrated
    if calibrated != (input_scale is not None):
        raise SaveError(
            f"{name}: static (per-tensor) and NVFP4 activations need their calibrated input_scale, and only they "
            "have one"
        )
    if input_scale is not None and activations.format == "nvfp4":
        tensors["input_global_scale"] = input_scale.detach().float().reshape(1)  # fp32, as the weight's
    elif input_scale is not None:
        tensors["input_scale"] = input_scale.detach().float().reshape(1).to(dtype)
    return {key: t.detach().cpu().clone(memory_format=torch.contiguous_format) for key, t in tensors.items()}


class PreparedStore(BlockwiseStore):
    """A folder from each linear's tensors made beforehand (``tensors_for``) and a ready config."""

    def __init__(self, out: Path, dtype: torch.dtype, tensors_by_linear: dict, config: dict, max_shard_size) -> None:
        super().__init__(out, dtype, max_shard_size)
        self.pending = {name: dict(tensors) for name, tensors in tensors_by_linear.items()}
        self.quantized = list(tensors_by_linear)
        self.prepared_config = config

    def quantization_config(self, model: nn.Module) -> dict:
        return self.prepared_config


def save(
    model: nn.Module,
    tensors_by_linear: dict[str, dict],
    config_dict: dict,
    tokenizer,
    out: Path,
    max_shard_size: int | str = "5GB",
) -> dict[str, int]:
    """Write the checkpoint folder ``out`` at once (the pipeline writes block by block instead:
    ``CompressedStore``); returns the bytes of each file. A failed save leaves no folder."""
    modules = dict(model.named_modules())
    for name in tensors_by_linear:
        if not isinstance(modules.get(name), nn.Linear):
            kind = type(modules[name]).__name__ if name in modules else "nothing"
            raise SaveError(f"{name} is {kind}, but compressed-tensors quantizes torch.nn.Linear modules")
    return PreparedStore(out, model.dtype, tensors_by_linear, config_dict, max_shard_size).save(model, tokenizer)


def check_linears(linears: dict[str, nn.Module], weights: WeightSpec) -> None:
    """Before any work: every linear to be saved is an ``nn.Linear`` whose input splits into whole groups."""
    for name, module in linears.items():
        if not isinstance(module, nn.Linear):
            raise SaveError(f"save=true: {name} is {type(module).__name__}; compressed-tensors stores nn.Linear only")
        in_features = module.weight.shape[1]
        if weights.group_size > 0 and in_features % weights.group_size:
            if weights.fmt.block_size:
                fix = f"{weights.format}'s blocks of {weights.group_size} cannot tile it: use another format"
            else:
                divisors = [g for g in (128, 64, 32, 16) if in_features % g == 0]
                fix = f"use group_size={divisors[0]} or -1" if divisors else "use group_size=-1"
                if weights.bits in (2, 3, 4, 8) and weights.is_int:
                    fix += " (or save_format=gptq, whose g_idx allows a partial last group)"
            raise SaveError(
                f"save=true: {name} has {in_features} input features, not a multiple of group_size="
                f"{weights.group_size}, and compressed-tensors stores whole groups only: {fix}, or save=false"
            )


class CompressedStore(BlockwiseStore):
    """The compressed-tensors folder ``out``, written as the pipeline finishes each block."""

    def __init__(self, model: nn.Module, recipe, out: Path, max_shard_size: int | str = "5GB") -> None:
        check_savable(recipe.weights, recipe.activations)
        gptq_actorder(recipe)  # refuses a permuted g_idx before any work
        super().__init__(out, next(model.parameters()).dtype, max_shard_size)
        self.recipe = recipe
        self.model = model
        experts, blocks = moe_blocks(model)
        self.routers = [f"{prefix}.{experts.router}" for prefix, _ in blocks]
        if experts is not None:  # experts are written one by one, as Hub checkpoints (and vLLM) have them
            if experts.layout != "gate_up":
                raise SaveError(f"save=true: ptq cannot write {model.config.model_type}'s experts yet; save=false")
            self.stored_as_linears = tuple(f"{experts.path}.{param}" for param in FUSED_WEIGHTS)
            self.checkpoint_name = experts.checkpoint_name
            for prefix, block in blocks:  # whole groups, as for every linear
                fused = get_submodule(block, experts.path)
                for what, width in (("hidden", fused.gate_up_proj.shape[-1]), ("expert", fused.down_proj.shape[-1])):
                    group = recipe.weights.group_size
                    if group > 0 and width % group:
                        raise SaveError(
                            f"save=true: the experts of {prefix} read {width} {what} features, not a multiple of "
                            f"group_size={group}, and compressed-tensors stores whole groups only: choose a divisor"
                        )

    def linear_tensors(self, name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        from ptq.quant.activations import input_quantizer_of

        # (an expert's linear exists only while its block is quantized, or in an activation-quantized MoE)
        module = get_submodule(self.model, name)
        quantizer = input_quantizer_of(module) if module is not None else None
        input_scale = quantizer.scale if quantizer is not None and quantizer.spec.calibrated else None
        return tensors_for(name, qw, input_scale, activations=self.recipe.activations, dtype=self.dtype)

    def quantization_config(self, model: nn.Module) -> dict:
        ignore = unquantized_linears(model, self.quantized) + self.routers  # routers: never quantized
        return quantization_config(self.recipe, [self.checkpoint_name(n) for n in ignore], act_order=False)


FORMAT_OF = {NVFP4_PACK_QUANTIZED: "nvfp4", MXFP4_PACK_QUANTIZED: "mxfp4", MXFP8_QUANTIZED: "mxfp8"}


def specs_from_config(qc: dict) -> tuple[WeightSpec, ActSpec | None]:
    """ptq's weight and activation specs for a single-group ``quantization_config``: the inverse of
    ``weight_args`` and ``activation_args``."""
    groups = list(qc["config_groups"].values())
    if len(groups) != 1:
        raise SaveError(f"ptq reads compressed-tensors configs with one config group, not {len(groups)}")
    w, a = groups[0]["weights"], groups[0].get("input_activations")
    fmt = "int" if w["type"] == "int" else FORMAT_OF.get(groups[0].get("format") or qc.get("format"), "fp8_e4m3")
    group_size = {"channel": PER_CHANNEL, "tensor": PER_TENSOR}.get(w.get("strategy"), w.get("group_size"))
    weights = WeightSpec(fmt, w["num_bits"], group_size, w["symmetric"])
    if not a:
        return weights, None
    if a["type"] == "float" and a.get("strategy") == "tensor_group":
        return weights, ActSpec("nvfp4", 4, "per_block")
    granularity = "per_token" if a.get("dynamic", True) else "per_tensor"
    return weights, ActSpec("int" if a["type"] == "int" else "fp8_e4m3", a["num_bits"], granularity)


def quantized_from_stored(
    tensors: dict[str, torch.Tensor], spec: WeightSpec, fmt: str, out_features: int, in_features: int
) -> QuantizedWeight:
    """One linear's stored tensors back into ptq's codes and fp32 scales: the inverse of ``tensors_for``."""
    from ptq.quant.pack import scale_from_stored, unpack_nibbles
    from ptq.quant.weight import default_g_idx

    bits, offset = spec.bits, 2 ** (spec.bits - 1)
    tensor_scale = tensors.get("weight_global_scale")
    if fmt == PACK_QUANTIZED:
        codes = unpack_int32_rows(tensors["weight_packed"].t(), bits, in_features).t()
    elif fmt == INT_QUANTIZED:
        codes = tensors["weight"].to(torch.int16) + offset  # signed int8 -> ptq's unsigned codes
    elif fmt in (NVFP4_PACK_QUANTIZED, MXFP4_PACK_QUANTIZED):
        codes = unpack_nibbles(tensors["weight_packed"], in_features)
    else:
        codes = tensors["weight"]  # float8 values
    if spec.is_int:
        stored = tensors["weight_scale"].float()
        scale = stored.reshape(1, 1).expand(out_features, 1) if spec.per_tensor else stored.reshape(out_features, -1)
        if spec.sym:
            zero = torch.full_like(scale, offset)
        elif fmt == PACK_QUANTIZED and not spec.per_tensor:  # packed along the output dim
            zero = unpack_int32_rows(tensors["weight_zero_point"], bits, out_features).float()
        else:  # signed int8, one per tensor or per channel
            zero = (tensors["weight_zero_point"].float() + offset).reshape(-1, 1).expand_as(scale)
        codes = codes.to(torch.uint8)
    else:
        scale = scale_from_stored(tensors["weight_scale"], spec, out_features, tensor_scale)
        zero = torch.zeros_like(scale)
    if tensor_scale is not None:
        tensor_scale = tensor_scale.float().reshape(())
    g_idx = default_g_idx(in_features, spec)
    return QuantizedWeight(codes.contiguous(), scale.contiguous(), zero.contiguous(), g_idx, spec, tensor_scale)


def load(path: str, dtype: torch.dtype) -> nn.Module:
    """A compressed-tensors checkpoint as ptq's own layers (``ptq.quant.linear.quantized_linear``:
    packed integers with the int4 kernel on CUDA, int8 or FP8 W8A8, or the stored form of float formats), read
    by ptq itself (the compressed-tensors package is not needed), with ptq's input quantizers where
    the checkpoint quantizes activations (its calibrated scales included): the model computes what
    the run that wrote it measured."""
    from transformers import AutoConfig

    from ptq.checkpoint import fill, quantization_config_of, skeleton
    from ptq.lazy import ShardedCheckpoint
    from ptq.quant.activations import InputQuantizer, attach_input_quantizer
    from ptq.quant.linear import quantized_linear, takes_own_activations

    config = AutoConfig.from_pretrained(path)
    qc = quantization_config_of(config)
    weights, act = specs_from_config(qc)
    fmt = qc.get("format") or next(iter(qc["config_groups"].values())).get("format")
    del config.quantization_config
    state = ShardedCheckpoint(path).read_all()
    quantized = {key.rpartition(".")[0] for key in state if key.endswith(".weight_scale")}
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key in list(state):
        module, _, local = key.rpartition(".")
        if module in quantized and local != "bias":  # weight or weight_packed, scales, input scales
            by_module.setdefault(module, {})[local] = state.pop(key)
    model = skeleton(config, dtype)
    for name, tensors in by_module.items():
        dense = model.get_submodule(name)
        if not isinstance(dense, nn.Linear):
            raise SaveError(f"{path}: {name} holds quantized tensors but the model has no linear layer there")
        qw = quantized_from_stored(tensors, weights, fmt, dense.out_features, dense.in_features)
        bias = state.pop(f"{name}.bias", None)
        layer = quantized_linear(qw, bias, dtype, act)
        if act is not None and not takes_own_activations(layer):
            scale = tensors.get("input_scale", tensors.get("input_global_scale"))
            attach_input_quantizer(layer, InputQuantizer(act, None if scale is None else scale.float().reshape(())))
        model.set_submodule(name, layer)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    fill(model, state, path, built=frozenset(by_module))
    model.config.quantization_config = qc  # kept for the record
    return model


SAFETENSORS_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1,
                     "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


def stored_storage(path: str, model: nn.Module) -> dict:
    """The storage summary (``ptq.quant.pack.StorageCount``) of a compressed-tensors folder: the bytes of
    each quantized linear's stored tensors (those of a module that has a ``weight_scale``; bias aside)."""
    from safetensors import safe_open

    from ptq.quant.pack import StorageCount

    tensors: dict[str, dict[str, int]] = {}
    weights: dict[str, int] = {}  # the weights each quantized linear stands for (its weight_shape, or weight)
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                module, _, local = key.rpartition(".")
                view = f.get_slice(key)
                tensors.setdefault(module, {})[local] = (
                    math.prod(view.get_shape()) * SAFETENSORS_BYTES[view.get_dtype()]
                )
                if local == "weight_shape":
                    weights[module] = math.prod(f.get_tensor(key).tolist())
                elif local == "weight":
                    weights.setdefault(module, math.prod(view.get_shape()))
    count = StorageCount()
    count.layouts.add("compressed-tensors")
    for name, local in tensors.items():
        if "weight_scale" in local:
            count.add_packed(name, weights[name], sum(b for k, b in local.items() if k != "bias"))
    return count.summary(model)
