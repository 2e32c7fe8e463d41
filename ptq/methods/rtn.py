"""Round-to-nearest: every weight to its nearest grid point, no data needed (the baseline)."""

from torch import nn

from ptq.methods.base import Method
from ptq.models import get_weight, set_weight
from ptq.pipeline import BlockContext
from ptq.quant import QuantSpec, fake_quantize_weight


def round_linears(linears: dict[str, nn.Module], spec: QuantSpec) -> None:
    """Replace each linear's weight by its round-to-nearest value (dequantized, same dtype)."""
    for linear in linears.values():
        set_weight(linear, fake_quantize_weight(get_weight(linear), spec))


class RTN(Method):
    name = "rtn"

    def quantize_block(self, ctx: BlockContext) -> None:
        round_linears(ctx.linears, self.spec)
