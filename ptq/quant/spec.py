"""What to quantize to: a frozen, validated spec for weights and one for activations.

A spec is built once (``WeightSpec.build`` fills in each format's defaults) and handed down to the
methods, the storage accounting and the kernels; nothing below re-derives it from loose numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptq.errors import UserError
from ptq.quant.formats import FORMATS, NumberFormat, stat_dtype

PER_CHANNEL = -1  # group_size: one scale per output channel
PER_TENSOR = 0  # group_size: one scale for the whole tensor
INT_BITS = range(2, 9)


class FormatError(UserError):
    """A format setting is invalid or unsupported; the message names the setting and the fix."""


def _check_format(name: str, setting: str) -> NumberFormat:
    if name not in FORMATS:
        raise FormatError(f"{setting}={name!r} is unknown; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class WeightSpec:
    """format: a name in ``FORMATS``; bits: the element width (int: 2..8; floats: fixed by the format);
    group_size: columns per scale, -1 per output channel, 0 per tensor (block formats: their block);
    sym: symmetric grid (float formats are always symmetric)."""

    format: str = "int"
    bits: int = 4
    group_size: int = 128
    sym: bool = False

    def __post_init__(self) -> None:
        fmt = _check_format(self.format, "format")
        if fmt.name == "int":
            if not _is_int(self.bits) or self.bits not in INT_BITS:
                raise FormatError(
                    f"bits={self.bits!r} is outside 2..8 for integer weights; use method=none for full precision"
                )
        elif self.bits != fmt.element_bits:
            raise FormatError(
                f"bits={self.bits!r} does not fit format={self.format}, whose elements have {fmt.element_bits} "
                "bits: drop bits (the format sets it)"
            )
        if not isinstance(self.sym, bool):
            raise FormatError(f"sym={self.sym!r} must be true or false")
        if not self.sym and not fmt.supports_asym:
            raise FormatError(f"format={self.format} is symmetric (no zero point): drop sym=false or set sym=true")
        if not _is_int(self.group_size) or self.group_size < PER_CHANNEL:
            raise FormatError(
                f"group_size={self.group_size!r} is invalid: use a positive number of input columns per group, "
                "-1 for one scale per output channel, or 0 for one scale per tensor"
            )
        if fmt.block_size is not None and self.group_size != fmt.block_size:
            raise FormatError(
                f"format={self.format} uses blocks of {fmt.block_size}, not group_size={self.group_size}: "
                f"drop group_size or set group_size={fmt.block_size}"
            )

    @classmethod
    def build(
        cls, format: str = "int", bits: int | None = None, group_size: int | None = None, sym: bool | None = None
    ) -> WeightSpec:
        """The spec with each unset setting at the format's default: int 4-bit, groups of 128,
        asymmetric; FP8 per output channel; NVFP4/MX their blocks; floats symmetric."""
        fmt = _check_format(format, "format")
        if fmt.name == "int":
            defaults = (4, 128, False)
        else:
            defaults = (fmt.element_bits, fmt.block_size or PER_CHANNEL, True)
        given = (bits, group_size, sym)
        values = [default if value is None else value for value, default in zip(given, defaults, strict=True)]
        return cls(format, *values)

    @property
    def fmt(self) -> NumberFormat:
        return FORMATS[self.format]

    @property
    def is_int(self) -> bool:
        return self.format == "int"

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def per_tensor(self) -> bool:
        return self.group_size == PER_TENSOR

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size in (PER_CHANNEL, PER_TENSOR) else self.group_size

    def num_groups(self, in_features: int) -> int:
        g = self.group_size_for(in_features)
        return (in_features + g - 1) // g

    def describe(self) -> str:
        group = {PER_CHANNEL: "per-channel", PER_TENSOR: "per-tensor"}.get(self.group_size, f"g{self.group_size}")
        if self.is_int:
            return f"int{self.bits} {group} {'sym' if self.sym else 'asym'}"
        return self.format if self.fmt.block_size else f"{self.format} {group}"

    # The format's arithmetic, with this spec's settings.

    def tensor_scale(self, weight: torch.Tensor) -> torch.Tensor | None:
        return self.fmt.tensor_scale(weight)

    def params(self, rows: torch.Tensor, tensor_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point [rows, 1] of each row of ``rows`` [rows, g], fp32."""
        return self.fmt.group_params(rows, self.bits, self.sym, tensor_scale)

    def quantize(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return self.fmt.quantize(x, scale, zero, self.bits)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return self.fmt.dequantize(q, scale, zero)

    def fake_quantize(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return self.fmt.fake_quantize(x, scale, zero, self.bits)


ACT_GRANULARITIES = ("per_token", "per_tensor", "per_block")


@dataclass(frozen=True)
class ActSpec:
    """How each quantized linear's input is quantized: format, bits (int: 4..8) and granularity:
    ``per_token`` (dynamic, a scale per token), ``per_tensor`` (static, calibrated) or ``per_block``
    (NVFP4/MX blocks along the features, their scales dynamic; NVFP4's global scale is calibrated).
    Integer activations are symmetric and signed."""

    format: str = "int"
    bits: int = 8
    granularity: str = "per_token"

    def __post_init__(self) -> None:
        fmt = _check_format(self.format, "act_format")
        if fmt.name == "int":
            if not _is_int(self.bits) or not 4 <= self.bits <= 8:
                raise FormatError(f"act_bits={self.bits!r} is outside 4..8 for integer activations")
        elif self.bits != fmt.element_bits:
            raise FormatError(
                f"act_bits={self.bits!r} does not fit act_format={self.format} ({fmt.element_bits}-bit elements): "
                "drop act_bits"
            )
        if self.granularity not in ACT_GRANULARITIES:
            raise FormatError(
                f"act_granularity={self.granularity!r} is unknown; choose one of {', '.join(ACT_GRANULARITIES)}"
            )
        block = fmt.block_size is not None
        if block != (self.granularity == "per_block"):
            allowed = "per_block" if block else "per_token or per_tensor"
            raise FormatError(
                f"act_granularity={self.granularity} does not fit act_format={self.format}: use {allowed}"
            )

    @classmethod
    def build(cls, format: str = "int", bits: int | None = None, granularity: str | None = None) -> ActSpec:
        fmt = _check_format(format, "act_format")
        default_bits = 8 if fmt.name == "int" else fmt.element_bits
        default_granularity = "per_block" if fmt.block_size else "per_token"
        return cls(format, default_bits if bits is None else bits, granularity or default_granularity)

    @property
    def fmt(self) -> NumberFormat:
        return FORMATS[self.format]

    @property
    def static(self) -> bool:
        """One calibrated scale per tensor, fixed after calibration."""
        return self.granularity == "per_tensor"

    @property
    def calibrated(self) -> bool:
        """Whether calibration fixes a scale: the per-tensor one, or NVFP4's global scale, whose block
        scales stay dynamic (compressed-tensors' ``dynamic: local``, what NVFP4 engines run)."""
        return self.static or self.fmt.has_tensor_scale

    @property
    def qmax(self) -> float:
        """The largest code magnitude: 2^(bits-1) - 1 for signed integers, the element maximum for floats."""
        return 2 ** (self.bits - 1) - 1 if self.format == "int" else self.fmt.element.max

    def describe(self) -> str:
        name = f"int{self.bits}" if self.format == "int" else self.format
        return f"{name} {self.granularity.replace('_', '-')}"

    def check_weights(self, weights: WeightSpec) -> None:
        """Activation and weight formats a kernel can multiply together; anything else is an error."""
        if self.format == "int":
            if not weights.is_int or weights.group_size != PER_CHANNEL or not weights.sym:
                raise FormatError(
                    f"act_format=int needs integer weights with one symmetric scale per output channel (what "
                    f"integer matmuls use), not {weights.describe()}: set format=int group_size=-1 sym=true"
                )
        elif self.format.startswith("fp8"):
            if not weights.format.startswith("fp8") or weights.group_size not in (PER_CHANNEL, PER_TENSOR):
                raise FormatError(
                    f"act_format={self.format} needs FP8 weights per channel or per tensor (FP8 matmuls), not "
                    f"{weights.describe()}: set format=fp8_e4m3 group_size=-1 (or scheme=fp8)"
                )
        elif self.format == "nvfp4" and weights.format != "nvfp4":
            raise FormatError(f"act_format=nvfp4 needs format=nvfp4 weights, not {weights.describe()} (scheme=nvfp4)")
        elif self.format.startswith("mx") and not weights.format.startswith("mx"):
            raise FormatError(
                f"act_format={self.format} needs MX weights (format=mxfp4 or mxfp8), not {weights.describe()}"
            )

    def quantize_dynamic(self, x: torch.Tensor, tensor_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Fake-quantize x [..., features] with scales from x itself (per token or per block), fp32.
        ``tensor_scale``: NVFP4's calibrated global scale (``static_scale``)."""
        rows = stat_dtype(x).reshape(-1, x.shape[-1])
        if self.granularity == "per_token":
            scale = (rows.abs().amax(dim=1, keepdim=True) / self.qmax).clamp(min=ACT_SCALE_MIN)
            return self._round(rows, scale).reshape(x.shape)
        # Blocks along the features: each token's row quantized exactly as a weight row of this format.
        from ptq.quant.weight import fake_quantize_weight

        if self.fmt.has_tensor_scale and tensor_scale is None:
            raise ValueError(f"{self.format} activations need their calibrated global scale")
        return fake_quantize_weight(rows, WeightSpec.build(self.format), tensor_scale).reshape(x.shape)

    def quantize_static(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Fake-quantize x with a calibrated per-tensor scale; values beyond its range saturate."""
        return self._round(stat_dtype(x), scale)

    def _round(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.format == "int":
            return torch.clamp(torch.round(x / scale), -self.qmax, self.qmax) * scale
        return self.fmt.element.round(x / scale) * scale

    def static_scale(self, absmax: torch.Tensor) -> torch.Tensor:
        """The calibrated scale for inputs whose max|x| over the calibration tokens is ``absmax``: the
        per-tensor scale, or NVFP4's global scale 448 * 6 / absmax."""
        if self.fmt.has_tensor_scale:
            return self.fmt.tensor_scale(absmax)
        return (absmax.float() / self.qmax).clamp(min=ACT_SCALE_MIN)


# Smallest activation scale: an all-zero token gets this instead of 0 (no division by zero). The one
# clamp for activation scales, used by the fake quantizers and the INT8 kernel alike.
ACT_SCALE_MIN = 1e-12
