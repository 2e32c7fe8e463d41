"""Round-to-nearest: every weight to its nearest grid point, no data needed (the baseline)."""

from ptq.methods.base import Method
from ptq.models import get_weight, set_weight
from ptq.pipeline import BlockContext
from ptq.quant import quantize_weight


class RTN(Method):
    name = "rtn"

    def quantize_block(self, ctx: BlockContext) -> None:
        for linear in ctx.linears.values():
            weight = get_weight(linear)
            set_weight(linear, quantize_weight(weight, self.spec).dequantize().to(weight.dtype))
