"""Number formats: how a row of values becomes scales and codes, and back.

Every format maps a row x (one quantization group, block or channel) to a scale s (and, for
asymmetric integers, a zero point z) and codes q on the format's grid:

    x_hat = s * (q - z)

- ``int``: integer codes 0 .. 2^bits - 1 with an integer zero point, the GPTQ reference's grid
  (IST-DASLab/gptq, quant.py), so RTN, GPTQ and AWQ agree bit for bit and pack into the GPTQ layout:
  asymmetric maps [min(x, 0), max(x, 0)] onto the grid; symmetric uses s = 2 max|x| / (2^bits - 1)
  and z = 2^(bits - 1). Every row's range contains 0, so zero padding never changes a row's scale.
- ``fp8_e4m3``, ``fp8_e5m2``: q is an FP8 value, s = max|x| / (the format's largest value), fp32.
  Rounding is a cast to ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` (round to nearest even),
  after clamping, so large values saturate at the format's maximum instead of becoming NaN.
- ``nvfp4`` (NVIDIA's NVFP4): q is an E2M1 value (+-{0, 0.5, 1, 1.5, 2, 3, 4, 6}) in blocks of 16;
  each block's scale is an FP8 E4M3 number times one fp32 global scale per tensor. With
  g = 448 * 6 / max|W| (the tensor's amax maps to the largest block scale), a block's stored scale is
  e4m3(max|x_block| / 6 * g) and its effective scale s = e4m3(...) / g.
- ``mxfp4``, ``mxfp8`` (OCP Microscaling Formats v1.0, Sec. 6.3): blocks of 32 share an E8M0 scale
  2^(floor(log2(max|x|)) - emax), emax the element format's largest exponent (2 for E2M1, 8 for E4M3);
  elements are E2M1 / E4M3, saturating (values just below 2^(emax+1) clamp to the largest element).

Codes are held as floats on the grid while computing (``quantize``) and in the format's own storage
dtype in ``QuantizedWeight`` (``encode``/``decode``): uint8 integers, float8 values, or E2M1 nibbles
(sign << 3 | magnitude index) in uint8. Scales and zero points are always computed in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def stat_dtype(x: torch.Tensor) -> torch.Tensor:
    """fp32 for everything, except that float64 stays float64 (for exact reference tests)."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass(frozen=True)
class MiniFloat:
    """A small IEEE-like float without infinities: ``mbits`` mantissa bits, smallest normal exponent
    ``emin`` (subnormals below it, step 2^(emin - mbits)), largest finite value ``max``."""

    name: str
    bits: int
    mbits: int
    emin: int
    emax: int
    max: float
    torch_dtype: torch.dtype | None = None

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest representable value (ties to even), saturating at +-max; x fp32/fp64."""
        x = x.clamp(-self.max, self.max)
        if self.torch_dtype is not None and x.dtype == torch.float32:
            return x.to(self.torch_dtype).to(torch.float32)
        # The spacing of values in x's binade: 2^(e - mbits) with e = floor(log2|x|), at least emin
        # (subnormals). Rounding |x| / spacing to an integer, ties to even, is the format's rounding.
        _, exponent = torch.frexp(x)  # |x| = m * 2^exponent, m in [0.5, 1)
        spacing = torch.ldexp(torch.ones_like(x), (exponent - 1).clamp(min=self.emin) - self.mbits)
        return torch.round(x / spacing) * spacing

    @property
    def values(self) -> torch.Tensor:
        """Every non-negative value of the format, ascending (used to encode E2M1 nibbles)."""
        subnormal = [i * 2.0 ** (self.emin - self.mbits) for i in range(2**self.mbits)]
        normal = [
            (1 + m / 2**self.mbits) * 2.0**e for e in range(self.emin, self.emax + 1) for m in range(2**self.mbits)
        ]
        return torch.tensor([v for v in subnormal + normal if v <= self.max])


E4M3 = MiniFloat("e4m3", bits=8, mbits=3, emin=-6, emax=8, max=448.0, torch_dtype=torch.float8_e4m3fn)
E5M2 = MiniFloat("e5m2", bits=8, mbits=2, emin=-14, emax=15, max=57344.0, torch_dtype=torch.float8_e5m2)
E2M1 = MiniFloat("e2m1", bits=4, mbits=1, emin=0, emax=2, max=6.0)
E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT = -127, 127  # OCP MX v1.0, Table 6 (0xFF is NaN)


class NumberFormat:
    """One format's arithmetic. ``group_params`` works on rows [n, g] (one group or block per row)."""

    name = "base"
    element_bits = 0  # bits per stored element (int: set by the spec's bits)
    block_size: int | None = None  # fixed block length (nvfp4, mx); None: the spec's group_size
    scale_bits = 16  # bits per stored scale
    supports_asym = False
    has_tensor_scale = False

    def group_params(
        self, rows: torch.Tensor, bits: int, sym: bool, tensor_scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def quantize(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
        """Codes of x on the grid, as floats (exact small integers or format values)."""
        raise NotImplementedError

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return scale * (q - zero)

    def fake_quantize(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
        """dequantize(quantize(x)), in fp32 (fp64 stays fp64)."""
        return self.dequantize(self.quantize(x, scale, zero, bits), scale, zero)

    def tensor_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """A per-tensor scale computed before any group's (NVFP4's global scale); None for the others."""
        return None

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        """Codes (floats on the grid) -> the storage dtype kept in ``QuantizedWeight``."""
        raise NotImplementedError

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.float()


class IntFormat(NumberFormat):
    name = "int"
    supports_asym = True

    def group_params(self, rows, bits, sym, tensor_scale=None):
        xmin, xmax = torch.aminmax(stat_dtype(rows), dim=1, keepdim=True)
        xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        empty = (xmin == 0) & (xmax == 0)  # an all-zero row: any positive scale represents it exactly
        xmin = torch.where(empty, -1.0, xmin)
        xmax = torch.where(empty, 1.0, xmax)
        maxq = 2**bits - 1
        scale = (xmax - xmin) / maxq
        if sym:
            zero = torch.full_like(scale, (maxq + 1) / 2)
        else:
            zero = torch.round(-xmin / scale)
        return scale, zero

    def quantize(self, x, scale, zero, bits):
        return torch.clamp(torch.round(stat_dtype(x) / scale) + zero, 0, 2**bits - 1)

    def fake_quantize(self, x, scale, zero, bits):
        # The numbers of dequantize(quantize(x)) in fewer passes (AWQ's searches call this for every
        # candidate): clamping round(x / scale) to [-zero, maxq - zero] equals clamping after adding the
        # integer zero point and subtracting it again, since all of these are small integers in fp32.
        q = torch.div(stat_dtype(x), scale)
        return q.round_().clamp_(-zero, 2**bits - 1 - zero).mul_(scale)

    def encode(self, q):
        return q.to(torch.uint8)


class FloatFormat(NumberFormat):
    """Symmetric scaled minifloats: FP8 with free group sizes, NVFP4 and MX with fixed blocks."""

    supports_asym = False

    def __init__(
        self,
        name: str,
        element: MiniFloat,
        block_size: int | None = None,
        scale_kind: str = "fp32",
        scale_bits: int = 32,
    ) -> None:
        self.name = name
        self.element = element
        self.element_bits = element.bits
        self.block_size = block_size
        self.scale_kind = scale_kind  # fp32 | e4m3_global (NVFP4) | e8m0 (MX)
        self.scale_bits = scale_bits
        self.has_tensor_scale = scale_kind == "e4m3_global"

    def tensor_scale(self, x):
        if not self.has_tensor_scale:
            return None
        amax = stat_dtype(x).abs().amax()
        # global = 448 * 6 / amax (compressed-tensors' "global_scale"). An all-zero tensor, or one so
        # small that the quotient overflows fp32 (amax below ~8e-36), gets 1, as compressed-tensors does.
        scale = E4M3.max * self.element.max / amax
        return torch.where(torch.isfinite(scale), scale, torch.ones_like(amax))

    def group_params(self, rows, bits, sym, tensor_scale=None):
        amax = stat_dtype(rows).abs().amax(dim=1, keepdim=True)
        if self.scale_kind == "e8m0":
            # OCP MX v1.0 Sec. 6.3: X = 2^(floor(log2(amax)) - emax_elem), clamped to E8M0's range.
            _, exponent = torch.frexp(amax)
            shared = (exponent - 1 - self.element.emax).clamp(E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)
            shared = torch.where(amax > 0, shared, torch.full_like(shared, E8M0_MIN_EXPONENT))
            scale = torch.ldexp(torch.ones_like(amax), shared)
        elif self.scale_kind == "e4m3_global":
            if tensor_scale is None:
                raise ValueError(f"{self.name} needs the tensor's global scale")
            g = tensor_scale.to(amax)
            stored = E4M3.round(amax / self.element.max * g)
            # A block whose scale underflows E4M3 (its max below 2^-10 of the tensor's) gets the
            # smallest E4M3 scale instead of 0: no division by zero, and its values still get codes.
            stored = torch.where(stored > 0, stored, torch.full_like(stored, 2.0 ** (E4M3.emin - E4M3.mbits)))
            scale = stored / g
        else:
            scale = torch.where(amax > 0, amax / self.element.max, torch.ones_like(amax))
        return scale, torch.zeros_like(scale)

    def quantize(self, x, scale, zero, bits):
        return self.element.round(stat_dtype(x) / scale)

    def dequantize(self, q, scale, zero):
        return scale * q

    def encode(self, q):
        if self.element.torch_dtype is not None:
            return q.to(self.element.torch_dtype)
        # E2M1 nibble: sign bit, then the index of |q| among the format's 8 magnitudes.
        magnitudes = self.element.values.to(q.device)
        index = torch.searchsorted(magnitudes, q.abs().float().contiguous())
        return (index | (q < 0).to(index.dtype) << 3).to(torch.uint8)

    def decode(self, stored):
        if stored.dtype != torch.uint8:
            return stored.float()
        magnitudes = self.element.values.to(stored.device)
        value = magnitudes[(stored & 7).long()]
        return torch.where(stored >= 8, -value, value)


FORMATS: dict[str, NumberFormat] = {
    f.name: f
    for f in (
        IntFormat(),
        FloatFormat("fp8_e4m3", E4M3),
        FloatFormat("fp8_e5m2", E5M2),
        FloatFormat("nvfp4", E2M1, block_size=16, scale_kind="e4m3_global", scale_bits=8),
        FloatFormat("mxfp4", E2M1, block_size=32, scale_kind="e8m0", scale_bits=8),
        FloatFormat("mxfp8", E4M3, block_size=32, scale_kind="e8m0", scale_bits=8),
    )
}


def check_finite(x: torch.Tensor, what: str) -> None:
    """Infinities or NaNs have no code in any format: one clear error instead of a silent NaN."""
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{what} holds {bad} non-finite values (inf/NaN), which no number format can represent")
