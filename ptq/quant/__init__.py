"""Number formats: what "4-bit, group 128, asymmetric" means, once, for every method."""

from ptq.quant.format import (
    QuantizedWeight,
    QuantSpec,
    compute_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_weight,
    group_qparams,
    group_rows,
    quantize,
    quantize_weight,
)

__all__ = [
    "QuantSpec",
    "QuantizedWeight",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "fake_quantize_weight",
    "group_qparams",
    "group_rows",
    "quantize",
    "quantize_weight",
]
