"""Round-to-nearest: every weight to its nearest grid point, no data needed (the baseline)."""

from ptq.methods.base import Method
from ptq.models import get_weight
from ptq.pipeline import BlockContext
from ptq.quant import WeightSpec, quantize_weight, shared_tensor_scale


def round_linears(ctx: BlockContext, spec: WeightSpec) -> None:
    """Round every linear of the block to its nearest grid point. Linears that read the same input
    (q/k/v, gate/up) share one NVFP4 global scale, as GPTQ's stacked solve does and as inference engines
    need for the fused layer they make of them (vLLM keeps one global scale per fused layer)."""
    grouped = {name for group in ctx.sequential for name in group}
    for group in [*ctx.sequential, *((name,) for name in ctx.linears if name not in grouped)]:
        round_group(ctx, group, spec)


def round_group(ctx: BlockContext, group: tuple[str, ...], spec: WeightSpec) -> None:
    """Round the linears of one group (one input), with one NVFP4 global scale between them."""
    weights = {name: get_weight(ctx.linears[name]) for name in group if name in ctx.linears}
    shared = shared_tensor_scale(list(weights.values()), spec)
    for name, weight in weights.items():
        ctx.set_quantized(name, quantize_weight(weight, spec, shared))


class RTN(Method):
    name = "rtn"

    def quantize_block(self, ctx: BlockContext) -> None:
        round_linears(ctx, self.spec)
