"""Integer weight formats (2-8 bits), per channel or per group, symmetric or asymmetric.

The grid follows the GPTQ reference (IST-DASLab/gptq, quant.py), so that RTN, GPTQ and AWQ agree
bit for bit and the result packs into the GPTQ checkpoint layout:

    q = clamp(round(x / scale) + zero, 0, 2^bits - 1),     x_hat = scale * (q - zero)

- asymmetric: the range [min(x, 0), max(x, 0)] is mapped onto [0, 2^bits - 1]; zero is an integer.
- symmetric:  scale = 2 * max|x| / (2^bits - 1), zero = 2^(bits - 1) (the midpoint of the grid).

The range always contains 0, so 0 is exactly representable; padding a partial last group with zeros
therefore leaves its scale and zero point unchanged. Scales and zero points are computed in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantSpec:
    """bits: 2..8; group_size: -1 = one scale per output channel, else columns per group."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits!r} is outside 2..8; use bits=16 (or method=none) for full precision")
        if not isinstance(self.group_size, int) or (self.group_size < 1 and self.group_size != -1):
            raise ValueError(
                f"group_size={self.group_size!r} is invalid: use a positive number of input columns "
                "per group, or -1 for one scale per output channel"
            )

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        g = self.group_size_for(in_features)
        return (in_features + g - 1) // g


def _stat_dtype(x: torch.Tensor) -> torch.Tensor:
    """fp32 for everything, except that float64 stays float64 (for exact reference tests)."""
    return x if x.dtype == torch.float64 else x.float()


def compute_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of ``x`` ([rows, cols]), in fp32. Both are [rows, 1]."""
    xmin, xmax = torch.aminmax(_stat_dtype(x), dim=1, keepdim=True)
    xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)  # an all-zero row: any positive scale represents it exactly
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / spec.maxq
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as float tensor, exact small integers) of ``x`` on the grid."""
    return torch.clamp(torch.round(_stat_dtype(x) / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round ``x`` to the nearest grid point and return it in ``x``'s dtype.

    The numbers of dequantize(quantize(x)), in fewer passes over x (AWQ's searches call this for
    every candidate): clamping round(x / scale) to [-zero, maxq - zero] equals clamping after adding
    the integer zero point and subtracting it again, since all of these are small integers in fp32."""
    q = torch.div(_stat_dtype(x), scale)
    q.round_().clamp_(-zero, maxq - zero).mul_(scale)
    return q.to(x.dtype)


def group_rows(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """A [out, in] weight as one row per group, [out * num_groups, group_size] (fp32), zero-padded.

    A partial last group (``in`` not a multiple of the group size) gets its own parameters from
    its real columns only: the zero padding never changes min(x, 0) or max(x, 0). Without padding
    an fp32 weight is only reshaped: the result shares its memory (do not write into it).
    """
    out_features, in_features = weight.shape
    g = spec.group_size_for(in_features)
    n = spec.num_groups(in_features)
    weight = _stat_dtype(weight)
    if n * g != in_features:
        weight = torch.nn.functional.pad(weight, (0, n * g - in_features))
    return weight.reshape(out_features * n, g)


def group_qparams(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points for every group of a [out, in] weight: each [out, num_groups], fp32."""
    scale, zero = compute_qparams(group_rows(weight, spec), spec)
    return scale.reshape(weight.shape[0], -1), zero.reshape(weight.shape[0], -1)


@dataclass
class QuantizedWeight:
    """Integer codes with their group parameters; ``g_idx[j]`` is the group of input column j."""

    qweight: torch.Tensor  # [out, in], integer values 0..maxq (uint8)
    scale: torch.Tensor  # [out, groups], fp32
    zero: torch.Tensor  # [out, groups], fp32 holding integers
    g_idx: torch.Tensor  # [in], int32
    spec: QuantSpec

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Output channels ``start:stop`` (one linear of a row-stacked group)."""
        return QuantizedWeight(
            self.qweight[start:stop], self.scale[start:stop], self.zero[start:stop], self.g_idx, self.spec
        )

    def has_contiguous_groups(self) -> bool:
        """Whether column j belongs to group j // group_size (False after act-order reordering)."""
        return torch.equal(self.g_idx, default_g_idx(self.g_idx.numel(), self.spec, self.g_idx.device))

    def dequantize(self) -> torch.Tensor:
        out_features, in_features = self.qweight.shape
        if self.has_contiguous_groups():
            # Contiguous groups: broadcast each group's parameters over a reshape (no [out, in] gathers).
            q = group_rows(self.qweight.float(), self.spec).reshape(out_features, self.scale.shape[1], -1)
            w = dequantize(q, self.scale[:, :, None], self.zero[:, :, None])
            return w.reshape(out_features, -1)[:, :in_features]
        cols = self.g_idx.long()
        return dequantize(self.qweight.float(), self.scale[:, cols], self.zero[:, cols])


def default_g_idx(in_features: int, spec: QuantSpec, device=None) -> torch.Tensor:
    return torch.arange(in_features, device=device, dtype=torch.int32) // spec.group_size_for(in_features)


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest of a [out, in] weight: the RTN baseline and the reference grid for all methods."""
    out_features, in_features = weight.shape
    rows = group_rows(weight, spec)
    scale, zero = compute_qparams(rows, spec)
    n = spec.num_groups(in_features)
    q = quantize(rows, scale, zero, spec.maxq).reshape(out_features, -1)[:, :in_features]
    return QuantizedWeight(
        q.to(torch.uint8), scale.reshape(out_features, n), zero.reshape(out_features, n),
        default_g_idx(in_features, spec, weight.device), spec,
    )  # fmt: skip


def fake_quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest of a [out, in] weight, returned dequantized in the weight's dtype.

    The same values as ``quantize_weight(weight, spec).dequantize()``, computed group by group with
    one reshape (no codes or column gathers): the inner loop of AWQ's searches.
    """
    out_features, in_features = weight.shape
    rows = group_rows(weight, spec)
    scale, zero = compute_qparams(rows, spec)
    rounded = fake_quantize(rows, scale, zero, spec.maxq).reshape(out_features, -1)
    return rounded[:, :in_features].to(weight.dtype)
