"""Saving quantized models in the compressed-tensors checkpoint format (``quant_method:
compressed-tensors``), which transformers loads through the compressed-tensors package and vLLM
serves with its own kernels.

A folder holds ``config.json`` (the model's config with a ``quantization_config``), the tokenizer
files and safetensors shards (with ``model.safetensors.index.json`` when there are several). Each
quantized linear ``<name>`` stores the tensors of its format (``tensors_for``); every other tensor is
stored under its own name in the model's dtype. The layouts are those of compressed-tensors 0.20's
compressors (``compressed_tensors/compressors/*/base.py``); compressed-tensors itself is not needed
to write them.

compressed-tensors' integer grid is signed: code q_ct = q - 2^(b-1) for ptq's unsigned code q, and
zero point z_ct = z - 2^(b-1) (symmetric grids store none: z = 2^(b-1) is z_ct = 0). Scales are the
same number in both (x = s * (q - z) = s * (q_ct - z_ct)).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ptq.errors import UserError
from ptq.quant.pack import WORD, pack_rows
from ptq.quant.spec import PER_CHANNEL, PER_TENSOR, ActSpec, WeightSpec
from ptq.quant.weight import QuantizedWeight


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
INDEX = "model.safetensors.index.json"
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


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 nibbles [out, in] -> uint8 [out, in / 2]: column 2j in the low nibble, 2j+1 in the high one
    (compressors/nvfp4/helpers.py, ``pack_fp4_to_uint8``)."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def e8m0_exponents(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two scales 2^e as biased exponents e + 127 in uint8 (compressors/mx_utils.py)."""
    _, exponent = torch.frexp(scale.float())  # 2^e = 0.5 * 2^(e + 1)
    return (exponent - 1 + 127).to(torch.uint8)


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
        tensors = {"weight": qw.qweight, "weight_scale": scale_and_zero(qw)[0].to(dtype)}
    elif fmt == NVFP4_PACK_QUANTIZED:
        # The E4M3 block scales times the global scale g, which is stored as g itself: compressed-tensors
        # dequantizes with weight_scale / weight_global_scale (quantization/lifecycle/forward_helpers.py).
        global_scale = qw.tensor_scale.float().reshape(1)
        tensors = {
            "weight_packed": pack_nibbles(qw.qweight),
            "weight_scale": (qw.scale * global_scale).to(torch.float8_e4m3fn),
            "weight_global_scale": global_scale,
        }
    elif fmt == MXFP4_PACK_QUANTIZED:
        tensors = {"weight_packed": pack_nibbles(qw.qweight), "weight_scale": e8m0_exponents(qw.scale)}
    else:
        tensors = {"weight": qw.qweight, "weight_scale": e8m0_exponents(qw.scale)}
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


def checkpoint_tensors(model: nn.Module, tensors_by_linear: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint by name: the quantized linears' own, then the model's other
    parameters and buffers in the model's dtype (tied ones once: transformers re-ties them)."""
    modules = dict(model.named_modules())
    state = {}
    for name, tensors in tensors_by_linear.items():
        if not isinstance(modules.get(name), nn.Linear):
            kind = type(modules[name]).__name__ if name in modules else "nothing"
            raise SaveError(f"{name} is {kind}, but compressed-tensors quantizes torch.nn.Linear modules")
        state |= {f"{name}.{key}": t for key, t in tensors.items()}
    replaced = {f"{name}.weight" for name in tensors_by_linear}
    dtype = model.dtype
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        if key in replaced or (t.numel() > 0 and t.data_ptr() in seen):
            continue
        seen.add(t.data_ptr())
        state[key] = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
    return state


def write_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({key: state[key] for key in keys}, folder / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / INDEX).write_text(json.dumps(index, indent=2))


def save(
    model: nn.Module,
    tensors_by_linear: dict[str, dict],
    config_dict: dict,
    tokenizer,
    out: Path,
    max_shard_size: int | str = "5GB",
) -> dict[str, int]:
    """Write the checkpoint folder ``out``; returns the bytes of each file. The files are written into a
    temporary folder next to ``out``, renamed to ``out`` only once complete: a failed save leaves none."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty folder; choose a new output folder")
    state = checkpoint_tensors(model, tensors_by_linear)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's folder is private; the checkpoint is not
        write_shards(state, tmp, max_shard_size)
        config = model.config.to_dict()
        config["quantization_config"] = config_dict
        config["dtype"] = config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
        config["use_cache"] = True  # ptq turns the KV cache off while it quantizes; generation wants it
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}


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
            raise SaveError(
                f"save=true: {name} has {in_features} input features, not a multiple of group_size="
                f"{weights.group_size}, and compressed-tensors stores whole groups only: {fix}, or save=false"
            )


class CompressedStore:
    """Collects each quantized linear's compressed-tensors tensors on the CPU as the pipeline finishes a
    block (``on_quantized``), then writes the folder (``save``)."""

    def __init__(self, model: nn.Module, recipe) -> None:
        check_savable(recipe.weights, recipe.activations)
        gptq_actorder(recipe)  # refuses a permuted g_idx before any work
        self.recipe = recipe
        self.modules = dict(model.named_modules())
        self.dtype = next(model.parameters()).dtype
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, qw: QuantizedWeight) -> None:
        from ptq.quant.activations import input_quantizer_of

        quantizer = input_quantizer_of(self.modules[name])
        input_scale = quantizer.scale if quantizer is not None and quantizer.spec.calibrated else None
        self.tensors[name] = tensors_for(name, qw, input_scale, activations=self.recipe.activations, dtype=self.dtype)

    def save(self, model: nn.Module, tokenizer, out: Path) -> dict[str, int]:
        self.config = quantization_config(self.recipe, unquantized_linears(model, self.tensors), act_order=False)
        return save(model, self.tensors, self.config, tokenizer, out)


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


def stored_tensors(path: str, keep) -> dict[str, dict[str, torch.Tensor]]:
    """The folder's tensors whose local name passes ``keep``, by module: {module: {local name: tensor}}."""
    from safetensors import safe_open

    found: dict[str, dict[str, torch.Tensor]] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                module, _, local = key.rpartition(".")
                if keep(local):
                    found.setdefault(module, {})[local] = f.get_tensor(key)
    return found


def load(path: str, dtype: torch.dtype) -> nn.Module:
    """A compressed-tensors checkpoint for evaluation: transformers (through compressed-tensors)
    dequantizes the weights on load, and ptq's own input quantizers are attached where the checkpoint
    quantizes activations (static ones with the stored ``input_scale``), so that the model computes
    what the run that wrote it measured."""
    try:
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    except ImportError as err:  # pragma: no cover - transformers without compressed-tensors support
        raise SaveError(f"loading {path} needs transformers with compressed-tensors support: {err}") from None
    from ptq.quant.activations import InputQuantizer, attach_input_quantizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
    except ImportError as err:
        raise SaveError(f"loading {path} needs the compressed-tensors package (pip install compressed-tensors): "
                         f"{err}") from None  # fmt: skip
    qc = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    weights, act = specs_from_config(qc)
    if act is not None:
        scales = stored_tensors(path, lambda local: local in CALIBRATED_INPUT_SCALES)
        ignore = set(qc.get("ignore") or [])
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name not in ignore and name != "lm_head":
                scale = next(iter(scales.get(name, {}).values()), None)
                attach_input_quantizer(module, InputQuantizer(act, None if scale is None else scale.float()))
    elif qc.get("format") == PACK_QUANTIZED:
        pack_into_quant_linears(model, path, weights)
    model.eval()
    model.config.use_cache = False
    return model


def pack_into_quant_linears(model: nn.Module, path: str, spec: WeightSpec) -> None:
    """Integer weight-only checkpoints: every linear whose shapes the GPTQ layout holds becomes ptq's
    ``QuantLinear`` (packed integers in memory; the int4 kernel on CUDA), built from the stored codes,
    scales and zero points; the others keep the dense weights transformers dequantized."""
    from ptq.quant.linear import QuantLinear
    from ptq.quant.pack import PACKED_BITS, PackError, unpack_rows
    from ptq.quant.weight import default_g_idx

    bits, sym = spec.bits, spec.sym
    if bits not in PACKED_BITS or spec.per_tensor:
        return
    for name, tensors in stored_tensors(path, lambda local: local.startswith("weight_")).items():
        out_features, in_features = tensors["weight_shape"].tolist()
        if out_features % WORD or in_features % WORD:
            continue  # the GPTQ layout cannot hold it: it stays dense
        # Unsigned codes and zero points are what compressed-tensors packs (its signed values + 2^(b-1)).
        codes = unpack_rows(tensors["weight_packed"].t().contiguous(), bits)[:in_features].t()
        scale = tensors["weight_scale"].float()
        if sym:
            zero = torch.full_like(scale, 2 ** (bits - 1))
        else:
            zero = unpack_rows(tensors["weight_zero_point"].contiguous(), bits)[:out_features].float()
        qw = QuantizedWeight(codes.to(torch.uint8).contiguous(), scale, zero, default_g_idx(in_features, spec), spec)
        dense = model.get_submodule(name)
        try:
            packed = QuantLinear.from_quantized(qw, dense.bias, dense.weight.dtype)
        except PackError:
            continue
        model.set_submodule(name, packed)


SAFETENSORS_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1,
                     "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


def stored_storage(path: str, model: nn.Module) -> dict:
    """The storage summary (``ptq.quant.pack.StorageCount``) of a compressed-tensors folder: the bytes of
    each quantized linear's stored tensors (those of a module that has a ``weight_scale``; bias aside)."""
    from safetensors import safe_open

    from ptq.quant.pack import StorageCount

    tensors: dict[str, dict[str, int]] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                module, _, local = key.rpartition(".")
                view = f.get_slice(key)
                tensors.setdefault(module, {})[local] = (
                    math.prod(view.get_shape()) * SAFETENSORS_BYTES[view.get_dtype()]
                )
    count = StorageCount()
    count.layouts.add("compressed-tensors")
    modules = dict(model.named_modules())
    for name, local in tensors.items():
        if "weight_scale" in local:
            module = modules[name]
            weights = module.in_features * module.out_features
            count.add_packed(name, weights, sum(b for k, b in local.items() if k != "bias"))
    return count.summary(model)
