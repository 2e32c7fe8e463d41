"""The activation-quantization step that follows a method's steps when the recipe quantizes activations."""

from __future__ import annotations

import torch

from ptq.methods.base import Method
from ptq.pipeline import BlockContext
from ptq.quant.activations import InputQuantizer, attach_input_quantizer
from ptq.quant.spec import ActSpec


class QuantizeActivations(Method):
    """Attach an input quantizer to every quantized linear of the block. Calibrated scales (static
    per-tensor ones, NVFP4's global scale) come from max|x| over the block's calibration inputs, with
    its final (quantized) weights."""

    name = "act"

    def __init__(self, act: ActSpec) -> None:
        super().__init__(None)
        self.act = act
        self.needs_calibration = act.calibrated

    def quantize_block(self, ctx: BlockContext) -> None:
        scales: dict[str, torch.Tensor] = {}
        if self.act.calibrated:
            absmax: dict[str, torch.Tensor] = {}

            def track(name: str, x: torch.Tensor) -> None:
                m = x.detach().abs().amax().float()
                absmax[name] = torch.maximum(absmax[name], m) if name in absmax else m

            ctx.forward_with_input_hooks(ctx.linears, track)
            scales = {name: self.act.static_scale(m) for name, m in absmax.items()}
        for name, linear in ctx.linears.items():
            attach_input_quantizer(linear, InputQuantizer(self.act, scales.get(name)))
            if name in scales:
                ctx.stats.setdefault(name, {})["act_scale"] = scales[name].item()
