"""Running a block from the middle: what one statistics pass keeps so that the next need not start over.

Under GPTQ's true-sequential order each stage needs the inputs of its linears with the stages before it
quantized. A pass from the block's start per stage repeats everything before the stage, and the pass that
gives the next block's inputs repeats the whole block. In a pre-norm residual block (``models.ResidualBlock``)

    h = x + o_proj(a)        y = mlp_norm(h)        d = mlp(y) up to down_proj        out = h + down_proj(d)

so a pass that stopped at o_proj's input a (keeping x) continues at the MLP once o_proj is quantized, one that
stopped at the MLP's input y (keeping h) continues at down_proj once gate/up are, and one that stopped at
down_proj's input d (keeping h) gives the block's outputs once down_proj is. These are the block's own
operations on the same tensors, so the values are those of a pass from the start, bit for bit (tested for each
architecture the table describes so).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ptq.models import ResidualBlock, get_submodule, get_weight

ATTENTION, MLP, OUTPUT = "attention", "mlp", "output"  # where a pass stopped: o_proj's, the MLP's, down_proj's input


@dataclass
class Kept:
    """Per calibration chunk (stored chunk, first, second) from a pass that stopped at ``point``: (x, a) at
    the attention's output, (h, y) at the MLP's input, (h, d) at down_proj's input. ``may_change``: the linears
    whose weights may change before it is used (those of the stage whose statistics the pass collected)."""

    point: str
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    may_change: frozenset[str]


def has_hooks(block: nn.Module) -> bool:
    """Whether running parts of ``block`` would skip code that running it whole runs: forward hooks or pre-hooks
    on it or any of its modules (or on every module), or accelerate's hooks (a model dispatched over devices)."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in block.modules())


def stop_point(parts: ResidualBlock, names: list[str]) -> str | None:
    """Where a pass that reads the inputs of ``names`` stops, if the block can be continued from there."""
    if len(names) != 1:
        return None
    return {parts.attention_out: ATTENTION, parts.mlp_in: MLP, parts.mlp_out: OUTPUT}.get(names[0])


def kept_bytes(parts: ResidualBlock, point: str, block: nn.Module, chunks: list[torch.Tensor]) -> int:
    """What keeping a pass that stops at ``point`` holds on the compute device."""
    tokens = sum(chunk.shape[0] * chunk.shape[1] for chunk in chunks)
    hidden = chunks[0].shape[-1]
    second = {
        ATTENTION: get_weight(get_submodule(block, parts.attention_out)).shape[1],
        MLP: hidden,
        OUTPUT: get_weight(get_submodule(block, parts.mlp_out)).shape[1],
    }[point]
    return tokens * (hidden + second) * chunks[0].element_size()


def keeping_hook(parts: ResidualBlock, point: str, block: nn.Module, firsts: list):
    """A hook that records, per chunk, the first tensor a pass stopping at ``point`` keeps: the block's input
    (attention), or the residual stream entering the MLP's norm (the MLP, down_proj). Returns its handle."""
    module = block if point == ATTENTION else get_submodule(block, parts.mlp_norm)
    return module.register_forward_pre_hook(lambda _module, args: firsts.append(args[0]))


def can_continue(kept: Kept, point: str) -> bool:
    return (kept.point, point) in ((ATTENTION, MLP), (MLP, OUTPUT))


class _Stop(Exception):
    pass


def continued(parts: ResidualBlock, block: nn.Module, kept: Kept) -> Iterator[tuple]:
    """The next pass from where ``kept`` stopped (``can_continue``): per chunk (stored chunk, first, second) at
    the next point, consuming ``kept`` as it goes."""
    if kept.point == ATTENTION:
        attention_out, norm = get_submodule(block, parts.attention_out), get_submodule(block, parts.mlp_norm)
        while kept.parts:
            chunk, x, a = kept.parts.pop(0)
            h = x + attention_out(a)
            yield chunk, h, norm(h)
        return
    mlp, mlp_out = get_submodule(block, parts.mlp), get_submodule(block, parts.mlp_out)
    inputs = []

    def stop(_module, args):
        inputs.append(args[0])
        raise _Stop

    handle = mlp_out.register_forward_pre_hook(stop)
    try:
        while kept.parts:
            chunk, h, y = kept.parts.pop(0)
            try:
                mlp(y)
            except _Stop:
                pass
            yield chunk, h, inputs.pop()
    finally:
        handle.remove()


def block_outputs(parts: ResidualBlock, block: nn.Module, kept: Kept) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(stored chunk, block output) per chunk from a pass that stopped at down_proj's input, consuming ``kept``."""
    mlp_out = get_submodule(block, parts.mlp_out)
    while kept.parts:
        chunk, h, d = kept.parts.pop(0)
        yield chunk, h + mlp_out(d)
