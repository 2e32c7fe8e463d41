"""Round-to-nearest: every weight to its nearest grid point, no data needed (the baseline)."""

from ptq.methods.base import Method
from ptq.models import get_weight
from ptq.pipeline import BlockContext
from ptq.quant import WeightSpec, quantize_weight


def round_linears(ctx: BlockContext, spec: WeightSpec) -> None:
    """Round every linear of the block to its nearest grid point."""
    for name, linear in ctx.linears.items():
        ctx.set_quantized(name, quantize_weight(get_weight(linear), spec))


class RTN(Method):
    name = "rtn"

    def quantize_block(self, ctx: BlockContext) -> None:
        round_linears(ctx, self.spec)
