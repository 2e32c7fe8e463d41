"""Number formats: what "4-bit, group 128, asymmetric" or "NVFP4" means, once, for every method."""

from ptq.quant.formats import FORMATS
from ptq.quant.spec import ActSpec, FormatError, WeightSpec
from ptq.quant.weight import (
    QuantizedWeight,
    fake_quantize_weight,
    group_qparams,
    group_rows,
    quantize_weight,
    row_params,
    shared_tensor_scale,
)

__all__ = [
    "FORMATS",
    "ActSpec",
    "FormatError",
    "QuantizedWeight",
    "WeightSpec",
    "fake_quantize_weight",
    "group_qparams",
    "group_rows",
    "quantize_weight",
    "row_params",
    "shared_tensor_scale",
]
