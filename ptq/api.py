"""The Python entry point: ``ptq.quantize(model, method="rtn", bits=4, ...)`` on a loaded model."""

from __future__ import annotations

import torch
from torch import nn

from ptq.methods import build_steps, parse_method
from ptq.methods.activations import QuantizeActivations
from ptq.pipeline import run_blocks
from ptq.quant import QuantSpec
from ptq.quant.activations import ActSpec, check_weight_format
from ptq.quant.pack import StorageCount

SMOOTHQUANT_NEEDS_ACT_BITS = (
    "smoothquant moves outliers from activations into weights, which only helps when activations are "
    "quantized: set act_bits (e.g. scheme=w8a8, or act_bits=8 bits=8 group_size=-1 sym=true)"
)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for, but torch sees no CUDA device; use device=cpu or auto")
    return device


def plan_steps(
    method: str,
    bits: int,
    group_size: int,
    sym: bool,
    options: dict | None = None,
    act_bits: int | None = None,
    act_granularity: str = "per_token",
) -> list:
    """The steps that ``quantize`` will run, with every setting checked (ValueError naming the fix)."""
    if method == "none" or bits == 16:
        parse_method(method)
        if act_bits is not None:
            raise ValueError("act_bits needs quantized weights: choose a method (e.g. rtn) and bits 2..8")
        return []
    spec = QuantSpec(bits, group_size, sym)
    steps = build_steps(method, spec, options)
    if act_bits is not None:
        act = ActSpec(act_bits, act_granularity)
        check_weight_format(spec, act)
        steps.append(QuantizeActivations(act))
    elif any(step.name == "smoothquant" for step in steps):
        raise ValueError(SMOOTHQUANT_NEEDS_ACT_BITS)
    return steps


def quantize(
    model: nn.Module,
    method: str = "rtn",
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    calib: torch.Tensor | None = None,
    device: str | torch.device | None = "auto",
    offload: bool = False,
    batch_size: int = 8,
    options: dict | None = None,
    act_bits: int | None = None,
    act_granularity: str = "per_token",
    on_quantized=None,
    lazy=None,
) -> dict:
    """Quantize a Hugging Face causal LM in place, block by block; returns the pipeline's report.

    ``calib``: token ids [nsamples, seqlen] for methods that need calibration data (e.g. GPTQ).
    ``options``: per-step options, e.g. ``{"gptq": {"act_order": True}}``.
    ``act_bits``: also quantize every quantized linear's input (``act_granularity``: per_token
    dynamic, or per_tensor static calibrated on ``calib``); needs group_size=-1 and sym=True.
    With ``offload`` the model stays where it is and only the current block visits ``device``.
    The report's ``storage`` gives the bytes and effective bits per weight of the GPTQ checkpoint
    layout (``ptq.quant.pack``). ``on_quantized(name, QuantizedWeight)`` also receives every quantized
    linear (e.g. ``ptq.checkpoint.PackedStore().add``, to save the model). ``lazy``: a
    ``ptq.lazy.LazyModel`` whose blocks are read from the checkpoint one at a time (needs ``offload``).
    """
    steps = plan_steps(method, bits, group_size, sym, options, act_bits, act_granularity)
    storage = StorageCount()
    if not steps:
        return {"blocks": [], "capture_s": 0.0, "storage": storage.summary(model)}

    def record(name, qweight) -> None:
        storage.add(name, qweight)
        if on_quantized is not None:
            on_quantized(name, qweight)

    report = run_blocks(model, steps, calib, resolve_device(device), offload, batch_size, record, lazy)
    report["storage"] = storage.summary(model)
    return report
