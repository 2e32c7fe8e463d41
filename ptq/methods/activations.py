"""The steps that follow a method's when the recipe quantizes activations (``QuantizeActivations``) or the
KV cache (``QuantizeKV``): both install run-time quantizers rather than change weights."""

from __future__ import annotations

import torch

from ptq.errors import UserError
from ptq.methods.base import Method
from ptq.methods.stats import reduce_named
from ptq.models import arch_for, get_submodule, head_dim_of
from ptq.pipeline import BlockContext
from ptq.quant.activations import InputQuantizer, attach_input_quantizer
from ptq.quant.hadamard import Rotation
from ptq.quant.kv import KVQuantizer, attach_kv_quantizer, use_quantized_attention
from ptq.quant.spec import ActSpec, WeightSpec


class QuantizeActivations(Method):
    """Attach an input quantizer to every quantized linear of the block. Calibrated scales (static
    per-tensor ones, NVFP4's global scale) come from max|x| over the block's calibration inputs, with
    its final (quantized) weights."""

    name = "act"
    installs_input_stages = True

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
            absmax = reduce_named(absmax, ctx.linears, "max", lambda name: torch.zeros((), device=ctx.device))
            scales = {name: self.act.static_scale(m) for name, m in absmax.items()}
        for name, linear in ctx.linears.items():
            attach_input_quantizer(linear, InputQuantizer(self.act, scales.get(name)))
            if name in scales:
                ctx.stats.setdefault(name, {})["act_scale"] = scales[name].item()

    def restore_block(self, ctx: BlockContext) -> None:
        for name, linear in ctx.linears.items():
            scale = ctx.stats.get(name, {}).get("act_scale") if self.act.calibrated else None
            scale = None if scale is None else torch.tensor(scale, dtype=torch.float32, device=ctx.device)
            attach_input_quantizer(linear, InputQuantizer(self.act, scale))


class QuantizeKV(Method):
    """Fake-quantize keys (after RoPE) and values per head and token wherever attention reads them
    (``ptq.quant.kv``). ``rotate``: multiply queries and keys by a Hadamard per head first (QuaRot)."""

    name = "kv"

    def __init__(self, kv: WeightSpec, rotate: bool = False) -> None:
        super().__init__(None)
        self.kv, self.rotate = kv, rotate

    def prepare(self, config) -> None:
        arch = arch_for(config.model_type)
        if arch.attention is None:
            raise UserError(
                f"kv_bits: KV-cache quantization needs the attention module of {config.model_type!r} in ptq's "
                "architecture table (Arch.attention in ptq/models.py); it supports the Llama family"
            )
        self.attention = arch.attention
        head_dim = head_dim_of(config)
        if self.kv.group_size > 0 and head_dim % self.kv.group_size:
            raise UserError(
                f"kv_format={self.kv.format}: blocks of {self.kv.group_size} do not tile head_dim={head_dim}"
            )
        self.rotation = Rotation.build(head_dim) if self.rotate else None

    def transform_model(self, model) -> dict:
        use_quantized_attention(model)
        per_row = self.kv.describe().replace("per-channel", "per head and token")
        return {"kv": per_row, "rotated_queries_and_keys": self.rotate}

    def quantize_block(self, ctx: BlockContext) -> None:
        attach_kv_quantizer(get_submodule(ctx.block, self.attention), KVQuantizer(self.kv, self.rotation))

    restore_block = quantize_block  # the quantizer holds no calibrated state
