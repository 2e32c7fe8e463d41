"""The activation-quantization step that follows a method's steps when ``act_bits`` is set."""

from __future__ import annotations

import torch

from ptq.methods.base import Method
from ptq.pipeline import BlockContext
from ptq.quant.activations import ActSpec, InputQuantizer, attach_input_quantizer


class QuantizeActivations(Method):
    """Attach an input quantizer to every quantized linear of the block. Static (per-tensor) scales
    are calibrated here, on the block's calibration inputs with its final (quantized) weights."""

    name = "act"

    def __init__(self, act: ActSpec) -> None:
        super().__init__(None)
        self.act = act
        self.needs_calibration = act.static

    def quantize_block(self, ctx: BlockContext) -> None:
        scales: dict[str, torch.Tensor] = {}
        if self.act.static:
            absmax: dict[str, torch.Tensor] = {}

            def track(name: str, x: torch.Tensor) -> None:
                m = x.detach().abs().amax().float()
                absmax[name] = torch.maximum(absmax[name], m) if name in absmax else m

            ctx.forward_with_input_hooks(ctx.linears, track)
            scales = {name: (m / self.act.qmax).clamp(min=1e-8) for name, m in absmax.items()}
        for name, linear in ctx.linears.items():
            attach_input_quantizer(linear, InputQuantizer(self.act, scales.get(name)))
            if name in scales:
                ctx.stats.setdefault(name, {})["act_scale"] = scales[name].item()
