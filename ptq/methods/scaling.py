"""Function-preserving channel scaling, shared by AWQ and SmoothQuant.

Linears W_i that all read x = prev(...) compute the same outputs for any positive per-channel s:

    W_i x = (W_i diag(s)) (x / s)

so 1/s is folded into ``prev`` (a norm's weight and bias, a previous linear's output rows, or a
wrapped activation) and s into the linears' input columns (AWQ Sec. 3.2; SmoothQuant Eq. 3).
Which modules form such groups is architecture knowledge: ``ScaleGroup`` entries in ptq/models.py.
The folding arithmetic is done in fp32 and written back in each parameter's own dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ptq.models import ModelLoadError, ScaleGroup, get_submodule, get_weight, is_linear, set_weight

log = logging.getLogger(__name__)


class ScaledActivation(nn.Module):
    """act(x) / s: how 1/s is folded into an activation that does not commute with scaling (GELU)."""

    def __init__(self, act: nn.Module, scales: torch.Tensor) -> None:
        super().__init__()
        self.act = act
        self.register_buffer("scales", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) / self.scales.to(x.dtype)


@dataclass
class BlockGroup:
    """One scaling group resolved to the modules of one block."""

    group: ScaleGroup
    prev: nn.Module
    linears: dict[str, nn.Module]
    inspect: nn.Module
    also_scaled: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return get_weight(next(iter(self.linears.values()))).shape[1]


def resolve_groups(block: nn.Module, groups: tuple[ScaleGroup, ...], block_index: int = -1) -> list[BlockGroup]:
    """The scaling groups that apply to ``block``. A group fed by a linear whose output size differs
    from the linears' input size (v -> o with grouped-query attention) does not apply and is left out,
    as in the AWQ reference."""
    resolved = []
    for group in groups:
        prev = get_submodule(block, group.prev)
        inspect = get_submodule(block, group.inspect)
        linears = {name: get_submodule(block, name) for name in group.linears}
        if prev is None or inspect is None or any(m is None for m in linears.values()):
            raise ModelLoadError(f"block {block_index} does not have the modules of scaling group {group}")
        widths = {get_weight(m).shape[1] for m in linears.values()}
        if len(widths) != 1:
            raise ModelLoadError(f"the linears of scaling group {group} read inputs of different sizes {widths}")
        if is_linear(prev) and get_weight(prev).shape[0] != widths.pop():
            log.debug(
                "block %d: scaling group %s -> %s skipped (shapes differ)", block_index, group.prev, group.linears
            )
            continue
        also_scaled = {name: get_submodule(block, name) for name in group.also_scaled}
        resolved.append(BlockGroup(group, prev, linears, inspect, also_scaled))
    return resolved


@torch.no_grad()
def fold_scales(block: nn.Module, group: BlockGroup, scales: torch.Tensor) -> None:
    """Divide ``group.prev``'s output by ``scales`` and multiply the linears' input columns by them."""
    s = scales.float()
    prev = group.prev
    if is_linear(prev):
        weight = get_weight(prev)
        set_weight(prev, (weight.float() / s[:, None].to(weight.device)).to(weight.dtype))
        if prev.bias is not None:
            prev.bias.data.copy_(prev.bias.data.float() / s.to(prev.bias.device))
    elif isinstance(prev, ScaledActivation):
        prev.scales.mul_(s.to(prev.scales.device))
    elif isinstance(getattr(prev, "weight", None), torch.Tensor) and prev.weight.dim() == 1:  # a norm
        prev.weight.data.copy_(prev.weight.data.float() / s.to(prev.weight.device))
        if getattr(prev, "bias", None) is not None:
            prev.bias.data.copy_(prev.bias.data.float() / s.to(prev.bias.device))
    elif len(list(prev.parameters())) == 0:  # a parameter-free activation: wrap it
        wrapped = ScaledActivation(prev, s.to(next(block.parameters()).device))
        block.set_submodule(group.group.prev, wrapped)
        group.prev = wrapped
    else:
        raise ModelLoadError(f"cannot fold scales into {group.group.prev} ({type(prev).__name__})")
    for linear in (*group.linears.values(), *group.also_scaled.values()):
        weight = get_weight(linear)
        set_weight(linear, (weight.float() * s[None, :].to(weight.device)).to(weight.dtype))
