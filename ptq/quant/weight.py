"""Quantized weights: a [out, in] matrix as codes with per-group scales, in any format of ptq.quant.

Groups run along the input dimension (``WeightSpec.group_size`` columns; a block for NVFP4/MX): a
weight is viewed as one row per group, [out * groups, group_size], and each row gets its own scale.
A partial last group is zero-padded: padding never changes a group's range (every format's scale
depends on max|x| or on [min(x, 0), max(x, 0)]), so it gets its parameters from its real columns.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ptq.quant.formats import check_finite, stat_dtype
from ptq.quant.spec import WeightSpec


def group_rows(weight: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """A [out, in] weight as one row per group, [out * num_groups, group_size] (fp32), zero-padded.

    Without padding an fp32 weight is only reshaped: the result shares its memory (do not write into it).
    """
    out_features, in_features = weight.shape
    g = spec.group_size_for(in_features)
    n = spec.num_groups(in_features)
    weight = stat_dtype(weight)
    if n * g != in_features:
        weight = torch.nn.functional.pad(weight, (0, n * g - in_features))
    return weight.reshape(out_features * n, g)


def row_params(
    rows: torch.Tensor, spec: WeightSpec, tensor_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point [rows, 1] of each group row; per-tensor specs share one over all rows."""
    if spec.per_tensor:
        scale, zero = spec.params(rows.reshape(1, -1), tensor_scale)
        return scale.expand(rows.shape[0], 1), zero.expand(rows.shape[0], 1)
    return spec.params(rows, tensor_scale)


def group_qparams(
    weight: torch.Tensor, spec: WeightSpec, tensor_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points for every group of a [out, in] weight: each [out, num_groups], fp32."""
    if tensor_scale is None:
        tensor_scale = spec.tensor_scale(weight)
    scale, zero = row_params(group_rows(weight, spec), spec, tensor_scale)
    return scale.reshape(weight.shape[0], -1), zero.reshape(weight.shape[0], -1)


def default_g_idx(in_features: int, spec: WeightSpec, device=None) -> torch.Tensor:
    return torch.arange(in_features, device=device, dtype=torch.int32) // spec.group_size_for(in_features)


@dataclass
class QuantizedWeight:
    """Codes in the format's storage dtype with their group parameters; ``g_idx[j]`` is the group of
    input column j. ``scale`` is what multiplies a code (for NVFP4: the E4M3 block scale divided by
    ``tensor_scale``, the global scale, kept for storage)."""

    qweight: torch.Tensor  # [out, in]: uint8 integers / E2M1 nibbles, or float8 values
    scale: torch.Tensor  # [out, groups], fp32
    zero: torch.Tensor  # [out, groups], fp32 (integers for int, zeros for float formats)
    g_idx: torch.Tensor  # [in], int32
    spec: WeightSpec
    tensor_scale: torch.Tensor | None = None  # NVFP4's global scale (fp32 scalar)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Output channels ``start:stop`` (one linear of a row-stacked group). The tensor scale is
        shared: linears solved as one stack have one global scale."""
        return QuantizedWeight(
            self.qweight[start:stop], self.scale[start:stop], self.zero[start:stop], self.g_idx, self.spec,
            self.tensor_scale,
        )  # fmt: skip

    def has_contiguous_groups(self) -> bool:
        """Whether column j belongs to group j // group_size (False after act-order reordering)."""
        return torch.equal(self.g_idx, default_g_idx(self.g_idx.numel(), self.spec, self.g_idx.device))

    def codes(self) -> torch.Tensor:
        """The codes as floats on the format's grid, [out, in]."""
        return self.spec.fmt.decode(self.qweight)

    def dequantize(self) -> torch.Tensor:
        out_features, in_features = self.qweight.shape
        codes = self.codes()
        if self.has_contiguous_groups():
            # Contiguous groups: broadcast each group's parameters over a reshape (no [out, in] gathers).
            q = group_rows(codes, self.spec).reshape(out_features, self.scale.shape[1], -1)
            w = self.spec.dequantize(q, self.scale[:, :, None], self.zero[:, :, None])
            return w.reshape(out_features, -1)[:, :in_features]
        cols = self.g_idx.long()
        return self.spec.dequantize(codes, self.scale[:, cols], self.zero[:, cols])


def shared_tensor_scale(weights: list[torch.Tensor], spec: WeightSpec) -> torch.Tensor | None:
    """One NVFP4 global scale for linears that read one input (the one that covers the largest amax), as
    inference engines need for the layer they join them into; None for formats without a global scale."""
    if not spec.fmt.has_tensor_scale or not weights:
        return None
    return torch.stack([spec.tensor_scale(w) for w in weights]).min()


def quantize_weight(
    weight: torch.Tensor, spec: WeightSpec, tensor_scale: torch.Tensor | None = None
) -> QuantizedWeight:
    """Round-to-nearest of a [out, in] weight: the RTN baseline and the reference grid for all methods.
    ``tensor_scale``: NVFP4's global scale when it is shared with other linears (default: the weight's)."""
    check_finite(weight, "the weight")
    out_features, in_features = weight.shape
    if tensor_scale is None:
        tensor_scale = spec.tensor_scale(weight)
    rows = group_rows(weight, spec)
    scale, zero = row_params(rows, spec, tensor_scale)
    n = spec.num_groups(in_features)
    q = spec.quantize(rows, scale, zero).reshape(out_features, -1)[:, :in_features]
    return QuantizedWeight(
        spec.fmt.encode(q), scale.reshape(out_features, n), zero.reshape(out_features, n),
        default_g_idx(in_features, spec, weight.device), spec, tensor_scale,
    )  # fmt: skip


def fake_quantize_weight(
    weight: torch.Tensor, spec: WeightSpec, tensor_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Round-to-nearest of a [out, in] weight, returned dequantized in the weight's dtype.

    The same values as ``quantize_weight(weight, spec, tensor_scale).dequantize()``, computed group by
    group with one reshape (no codes or column gathers): the inner loop of AWQ's searches.
    """
    out_features, in_features = weight.shape
    rows = group_rows(weight, spec)
    if tensor_scale is None:
        tensor_scale = spec.tensor_scale(weight)
    scale, zero = row_params(rows, spec, tensor_scale)
    rounded = spec.fake_quantize(rows, scale, zero).reshape(out_features, -1)
    return rounded[:, :in_features].to(weight.dtype)


# Every kind of quantized weight by class name (a method with its own layout registers its own: SpQR, AQLM), so
# that one written as its fields (``split_fields``: a run's progress files, a broadcast between ranks) comes back.
WEIGHT_KINDS: dict[str, type] = {"QuantizedWeight": QuantizedWeight}


def register_weight_kind(cls: type) -> type:
    WEIGHT_KINDS[cls.__name__] = cls
    return cls


def split_fields(qweight) -> tuple[type, dict, list[str]]:
    """(its class, its fields that are not tensors, the names of those that are) of a quantized weight."""
    values = {f.name: getattr(qweight, f.name) for f in fields(qweight)}
    tensors = [name for name, value in values.items() if isinstance(value, torch.Tensor)]
    return type(qweight), {k: v for k, v in values.items() if k not in tensors}, tensors
