"""The GPTQ checkpoint layout: integer codes packed into int32 words, as AutoGPTQ, GPTQModel,
transformers and vLLM load them (``quant_method: gptq``, checkpoint format ``gptq``).

For a linear with weight [out, in], ``bits`` b and G groups:

    qweight  int32 [in * b / 32, out]   codes along the input dimension, 32 codes in b words
    qzeros   int32 [G, out * b / 32]    zero points minus one (the format's convention), along out
    scales   fp16  [G, out]
    g_idx    int32 [in]                 the group of each input column (act-order permutes it)

Codes form a little-endian bit stream: code i of a run of 32 occupies bits i*b .. i*b+b-1 of the
run's b words. For 2, 4 and 8 bits no code crosses a word; for 3 bits this is the reference's
layout, where codes 10 and 21 straddle two words. The stored zero is ``(zero - 1) mod 2^b``: it
decodes exactly as ``(stored + 1) mod 2^b``, including zero = 0 (readers that omit the modulo,
the "v1 zero-point" problem of older kernels, misread only that case).
"""

from __future__ import annotations

import math

import torch

from ptq.errors import UserError
from ptq.quant.spec import WeightSpec
from ptq.quant.weight import QuantizedWeight

PACKED_BITS = (2, 3, 4, 8)
WORD = 32


class PackError(UserError):
    """The weight has no representation in the packed format; the message names what does."""


def check_packable(bits: int, in_features: int, out_features: int) -> None:
    if bits not in PACKED_BITS:
        raise PackError(
            f"bits={bits} has no packed GPTQ layout; the formats that do are bits={', '.join(map(str, PACKED_BITS))}"
        )
    for name, n in (("input", in_features), ("output", out_features)):
        if n % WORD:
            raise PackError(f"{n} {name} features are not a multiple of {WORD}, which the GPTQ layout needs")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding 32-bit patterns -> int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``values`` [n, m] (0 <= v < 2^bits, n a multiple of 32) along dim 0 into int32
    words [n * bits / 32, m]."""
    n, m = values.shape
    runs = values.to(torch.int64).reshape(n // WORD, WORD, m)
    words = torch.zeros(n // WORD, bits + 1, m, dtype=torch.int64, device=values.device)  # +1: overflow slot
    for i in range(WORD):
        word, shift = divmod(i * bits, WORD)
        words[:, word] |= runs[:, i] << shift
        if shift + bits > WORD:  # the code straddles two words: its high bits start the next one
            words[:, word + 1] |= runs[:, i] >> (WORD - shift)
    return _to_int32(words[:, :bits].reshape(n // WORD * bits, m))


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: int32 [n * bits / 32, m] -> int64 values [n, m]."""
    rows, m = words.shape
    runs = (words.to(torch.int64) & 0xFFFFFFFF).reshape(rows // bits, bits, m)
    mask = 2**bits - 1
    values = torch.empty(rows // bits, WORD, m, dtype=torch.int64, device=words.device)
    for i in range(WORD):
        word, shift = divmod(i * bits, WORD)
        v = runs[:, word] >> shift
        if shift + bits > WORD:
            v = v | (runs[:, word + 1] << (WORD - shift))
        values[:, i] = v & mask
    return values.reshape(rows // bits * WORD, m)


def pack_gptq(qw: QuantizedWeight, pad: bool = False) -> dict[str, torch.Tensor]:
    """The four tensors a GPTQ checkpoint stores for one linear.

    ``pad``: zero-pad input and output features to multiples of 32 instead of refusing them (for
    counting the bytes of models whose shapes the layout cannot hold, such as stories260K's 172)."""
    if not qw.spec.is_int:
        raise PackError(f"format={qw.spec.format} has no GPTQ layout (integer codes only)")
    qweight, zero, scale, g_idx = qw.qweight, qw.zero, qw.scale, qw.g_idx
    bits = qw.spec.bits
    if pad:
        out_pad, in_pad = (-qweight.shape[0]) % WORD, (-qweight.shape[1]) % WORD
        qweight = torch.nn.functional.pad(qweight, (0, in_pad, 0, out_pad))
        zero = torch.nn.functional.pad(zero, (0, 0, 0, out_pad))
        scale = torch.nn.functional.pad(scale, (0, 0, 0, out_pad))
        g_idx = torch.nn.functional.pad(g_idx, (0, in_pad))
    out_features, in_features = qweight.shape
    check_packable(bits, in_features, out_features)
    zeros = (zero.round().to(torch.int64) - 1) % (2**bits)  # [out, G]
    return {
        "qweight": pack_rows(qweight.t(), bits),
        "qzeros": pack_rows(zeros, bits).t().contiguous(),
        "scales": scale.t().to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32),
    }


def unpack_gptq(tensors: dict[str, torch.Tensor], spec: WeightSpec) -> QuantizedWeight:
    """Codes, scales, zero points and g_idx back from the packed tensors (scales as stored, fp16 -> fp32)."""
    bits = spec.bits
    codes = unpack_rows(tensors["qweight"], bits).t()
    zeros = (unpack_rows(tensors["qzeros"].t().contiguous(), bits) + 1) % (2**bits)  # [out, G]
    return QuantizedWeight(
        codes.to(torch.uint8).contiguous(),
        tensors["scales"].float().t().contiguous(),
        zeros.float().contiguous(),
        tensors["g_idx"].to(torch.int32),
        spec,
    )


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def float_bytes(qw: QuantizedWeight) -> int:
    """Bytes of a float-format weight as compressed-tensors stores it: the elements (two E2M1 per
    byte), one scale per group (fp32 for FP8, E4M3 for NVFP4, E8M0 for MX) and NVFP4's fp32 global
    scale."""
    fmt = qw.spec.fmt
    out_features, in_features = qw.qweight.shape
    groups = 1 if qw.spec.per_tensor else qw.scale.numel()
    elements = out_features * math.ceil(in_features * fmt.element_bits / 8)
    return elements + math.ceil(groups * fmt.scale_bits / 8) + (4 if fmt.has_tensor_scale else 0)


# Float formats kept compact in memory (``ptq.quant.linear.CompactLinear``) and on disk (compressed-
# tensors): 4-bit elements two per byte, NVFP4 block scales in E4M3 times the global scale, MX scales as
# E8M0 exponents.


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [out, in] -> uint8 [out, ceil(in / 2)]: column 2j in the low nibble, 2j+1 in the high
    one (compressed-tensors' ``pack_fp4_to_uint8``); an odd last column is paired with 0."""
    codes = torch.nn.functional.pad(codes, (0, codes.shape[1] % 2))
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=2).reshape(packed.shape[0], -1)[:, :in_features]


def e8m0_exponents(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two scales 2^e as biased exponents e + 127 in uint8 (OCP MX's E8M0)."""
    _, exponent = torch.frexp(scale.float())  # 2^e = 0.5 * 2^(e + 1)
    return (exponent - 1 + 127).to(torch.uint8)


def from_e8m0(exponents: torch.Tensor) -> torch.Tensor:
    return torch.ldexp(torch.ones_like(exponents, dtype=torch.float32), exponents.to(torch.int32) - 127)


def stored_scale(qw: QuantizedWeight) -> torch.Tensor:
    """A float-format weight's block scales as stored: NVFP4's E4M3 values (scale * global scale), MX's
    E8M0 exponents, fp32 otherwise; [out, groups], or [1] per tensor."""
    if qw.spec.per_tensor:
        return qw.scale.reshape(-1)[:1].float()
    if qw.spec.fmt.has_tensor_scale:
        return (qw.scale * qw.tensor_scale.to(qw.scale.device)).to(torch.float8_e4m3fn)
    if qw.spec.fmt.scale_kind == "e8m0":
        return e8m0_exponents(qw.scale)
    return qw.scale.float()


def scale_from_stored(stored: torch.Tensor, spec: WeightSpec, out_features: int, tensor_scale=None) -> torch.Tensor:
    """The fp32 scales [out, groups] of ``stored_scale``'s output."""
    if spec.fmt.has_tensor_scale:
        scale = stored.float() / tensor_scale.float().to(stored.device)
    elif spec.fmt.scale_kind == "e8m0":
        scale = from_e8m0(stored)
    else:
        scale = stored.float()
    return scale.reshape(1, 1).expand(out_features, 1) if spec.per_tensor else scale


class StorageCount:
    """Bytes of a quantized model as a checkpoint would store it: each quantized linear in its format's
    layout (integers packed as in a GPTQ checkpoint, ``pack_gptq``; float formats as compressed-tensors
    stores them, ``float_bytes``), every other parameter in 16 bits (the checkpoint's fp16/bf16)."""

    def __init__(self) -> None:
        self.linear_weights = 0
        self.linear_bytes = 0
        self.padded = 0  # linears whose shapes the GPTQ layout can only hold zero-padded
        self.names: set[str] = set()
        self.layouts: set[str] = set()
        self._bytes: dict[tuple, int] = {}  # packed bytes by (shapes, spec): layers repeat in every block

    def add(self, name: str, qw: QuantizedWeight) -> None:
        out_features, in_features = qw.shape
        if hasattr(qw, "stored_bytes"):  # a method's own layout (SpQR's outliers, AQLM's codebooks)
            self.layouts.add(qw.layout)
            self.add_packed(name, out_features * in_features, qw.stored_bytes())
            return
        if not qw.spec.is_int:
            self.layouts.add("compressed-tensors")
            self.add_packed(name, out_features * in_features, float_bytes(qw))
            return
        if qw.spec.bits not in PACKED_BITS:
            # No checkpoint layout holds 5-7 bit integers; count them as densely packed codes, fp16 scales
            # and (asymmetric) zero points of the same width: the size a layout for them would need.
            self.layouts.add("int-dense")
            zero_bits = 0 if qw.spec.sym else qw.zero.numel() * qw.spec.bits
            stored = math.ceil((out_features * in_features * qw.spec.bits + zero_bits) / 8) + 2 * qw.scale.numel()
            self.add_packed(name, out_features * in_features, stored)
            return
        self.layouts.add("gptq")
        padded = bool(out_features % WORD or in_features % WORD)
        key = (tuple(qw.qweight.shape), tuple(qw.scale.shape), qw.spec)
        if key not in self._bytes:
            # Packed on the meta device: the same tensors' shapes and dtypes, without computing or
            # holding their contents (an 8B model's packing would cost GPU memory and time).
            meta = QuantizedWeight(*(t.to("meta") for t in (qw.qweight, qw.scale, qw.zero, qw.g_idx)), qw.spec)
            self._bytes[key] = nbytes(pack_gptq(meta, pad=padded))
        self.add_packed(name, out_features * in_features, self._bytes[key], padded)

    def add_packed(self, name: str, weights: int, stored_bytes: int, padded: bool = False) -> None:
        """Count a linear of ``weights`` weights stored in ``stored_bytes`` (e.g. a loaded checkpoint's)."""
        self.linear_weights += weights
        self.linear_bytes += stored_bytes
        self.padded += padded
        self.names.add(name)

    def summary(self, model: torch.nn.Module) -> dict:
        """Effective bits per quantized weight (scales, zero points and g_idx included), and per
        parameter of the whole model. A MoE model's fused expert parameters are their experts' linears."""
        from ptq.moe import fused_parameter_names

        covered = fused_parameter_names(model) if self.names else set()
        other = sum(
            p.numel()
            for name, p in model.named_parameters()
            if not (name.endswith(".weight") and name[: -len(".weight")] in self.names) and name not in covered
        )
        total_bytes = self.linear_bytes + 2 * other
        return {
            "format": "+".join(sorted(self.layouts)) or "gptq",
            "quantized_linears": len(self.names),
            "padded_linears": self.padded,
            "linear_weights": self.linear_weights,
            "linear_bytes": self.linear_bytes,
            "bits_per_weight": 8 * self.linear_bytes / self.linear_weights if self.linear_weights else None,
            "other_params": other,
            "model_bytes": total_bytes,
            "bits_per_param": 8 * total_bytes / (self.linear_weights + other),
        }
