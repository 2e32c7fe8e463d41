"""SmoothQuant (Xiao et al., 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models"), following mit-han-lab/smoothquant's ``smooth_ln_fcs``.

Activation outliers sit in a few input channels; weights are easy to quantize. Per scaling group,
with the per-channel maxima over the calibration tokens of the input (max|X_j|) and of the
group's weight columns (max|W_j|), Eq. 4:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

and x/s is folded into the previous op, s into the linears (ptq/methods/scaling.py), which moves
quantization difficulty from activations to weights. The paper smooths the inputs that come from
a norm (``scope=norms``); ``scope=all`` also smooths the groups fed by a linear (v -> o, up -> down).
All statistics of a block are read in one pass before any scale is folded: each fold preserves the
block's function and touches only its own group's channels, so the order does not matter.
Weights are then rounded to nearest (``method=smoothquant``), or by a later step (``smoothquant+gptq``).
"""

from __future__ import annotations

import logging
import time

import torch

from ptq.methods.base import Method
from ptq.methods.rtn import round_linears
from ptq.methods.scaling import fold_scales, resolve_groups
from ptq.methods.stats import reduce_named
from ptq.models import arch_for, block_scale_groups, get_submodule, get_weight, is_linear, scale_groups
from ptq.pipeline import BlockContext
from ptq.quant import WeightSpec

log = logging.getLogger(__name__)

SCOPES = ("norms", "all")


def _reader(group) -> str:
    """The module whose input is the group's (a MoE block's router: the experts each see only their tokens)."""
    return group.group.reader or group.group.linears[0]


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Eq. 4 of the paper, in fp32, clamped away from zero as the reference does."""
    weight_max = torch.cat([w.float().abs() for w in weights]).amax(dim=0).clamp(min=1e-5)
    return (act_max.float().clamp(min=1e-5).pow(alpha) / weight_max.pow(1 - alpha)).clamp(min=1e-5)


class SmoothQuant(Method):
    name = "smoothquant"
    needs_calibration = True
    transform = True

    def __init__(self, spec: WeightSpec, alpha: float = 0.5, scope: str = "norms") -> None:
        super().__init__(spec)
        if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(
                f"smoothquant.alpha={alpha!r} must lie in [0, 1] (default 0.5; the paper uses up to 0.8-0.9)"
            )
        if scope not in SCOPES:
            raise ValueError(f"smoothquant.scope={scope!r} is unknown; choose one of {', '.join(SCOPES)}")
        self.alpha = float(alpha)
        self.scope = scope
        self.groups = None

    def prepare(self, config) -> None:
        self.groups = scale_groups(config)
        self.arch = arch_for(config.model_type)

    def quantize_block(self, ctx: BlockContext) -> None:
        if self.groups is None:
            raise RuntimeError("SmoothQuant.prepare(config) must run before quantize_block")
        start = time.perf_counter()
        resolved = resolve_groups(ctx.block, block_scale_groups(self.arch, ctx.block), ctx.index)
        groups = [g for g in resolved if self.scope == "all" or not is_linear(g.prev)]
        readers = {_reader(g): get_submodule(ctx.block, _reader(g)) for g in groups}
        act_max: dict[str, torch.Tensor] = {}

        def track(name: str, x: torch.Tensor) -> None:
            m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            act_max[name] = torch.maximum(act_max[name], m) if name in act_max else m

        ctx.forward_with_input_hooks(readers, track)
        width = {_reader(g): get_weight(next(iter(g.linears.values()))).shape[1] for g in groups}
        act_max = reduce_named(act_max, readers, "max", lambda name: torch.zeros(width[name], device=ctx.device))
        for group in groups:
            if _reader(group) not in act_max:  # an expert the router never chose: nothing to smooth
                continue
            scales = smoothing_scales(
                act_max[_reader(group)], [get_weight(m) for m in group.linears.values()], self.alpha
            )
            fold_scales(ctx.block, group, scales)
            for name in group.linears:
                ctx.stats.setdefault(name, {}).update(
                    smooth_scale_max=scales.max().item(), smooth_scale_min=scales.min().item()
                )
        ctx.add_time("smooth_s", time.perf_counter() - start)
        if self.round_weights:
            round_linears(ctx, self.spec)
