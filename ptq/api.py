"""The Python entry point: ``ptq.quantize(model, method="rtn", bits=4, ...)`` on a loaded model."""

from __future__ import annotations

import torch
from torch import nn

from ptq.methods import build_steps, parse_method
from ptq.pipeline import run_blocks
from ptq.quant import QuantSpec


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for, but torch sees no CUDA device; use device=cpu or auto")
    return device


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
) -> dict:
    """Quantize a Hugging Face causal LM in place, block by block; returns the pipeline's report.

    ``calib``: token ids [nsamples, seqlen] for methods that need calibration data (e.g. GPTQ).
    ``options``: per-step options, e.g. ``{"gptq": {"act_order": True}}``.
    With ``offload`` the model stays where it is and only the current block visits ``device``.
    """
    if method == "none" or bits == 16:
        parse_method(method)
        return {"blocks": [], "capture_s": 0.0}
    steps = build_steps(method, QuantSpec(bits, group_size, sym), options)
    return run_blocks(model, steps, calib, resolve_device(device), offload, batch_size)
