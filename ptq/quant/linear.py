"""Linear layers that hold real low-bit weights, and the kernels that compute with them.

On CUDA with bf16/fp16 activations the layers below compute with ``ptq.quant.kernels`` by default: a
fused Triton kernel that reads the stored weight for up to ``SKINNY_ROWS`` tokens (decode), cuBLAS after
one dequantize or activation-quantize kernel for more (prefill). Elsewhere they dequantize and call
``F.linear`` (or the exact CPU product).

- ``QuantLinear``: GPTQ-packed weights (``ptq.quant.pack``), what a saved checkpoint holds; the kernels
  take 4-bit ones (any group, act-order too). ``use_int4_kernel()`` switches a layer to PyTorch's int4
  weight-only matmul instead (``aten._weight_int4pack_mm``, "tinygemm"; measured against ours in
  ``ptq.bench.infer``); ``sort_groups()`` stores an act-order layer's inputs in group order for inference.
- ``Int8Linear``: W8A8. int8 weights with one scale per output channel, activations quantized per
  token on the fly; for prefill ``torch._int_mm`` (int8 x int8 -> int32) or ptq's one-pass int8 GEMM,
  whichever is faster for the shape.
- ``Fp8Linear``: FP8 W8A8. E4M3 weights per output channel, activations quantized per token on the
  fly; for prefill ``torch._scaled_mm`` with row-wise scales or ptq's FP8 GEMM (FP8 tensor cores on Hopper),
  whichever is faster per shape; fp32 on the CPU.
- ``CompactLinear``: any format's weight as stored (FP8 bytes, NVFP4/MX nibbles with their E4M3 / E8M0
  scales, integers the GPTQ layout cannot hold), dequantized per call; NVFP4 and MXFP4 take the kernels.

- ``LayoutLinear``: a method's own layout (SpQR, AQLM), rebuilt per call.

``quantized_linear`` picks one of them for a quantized weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptq.quant import kernels
from ptq.quant.pack import (
    PackError,
    pack_gptq,
    pack_nibbles,
    scale_from_stored,
    stored_scale,
    unpack_gptq,
    unpack_nibbles,
)
from ptq.quant.spec import ACT_SCALE_MIN, PER_CHANNEL, ActSpec, WeightSpec
from ptq.quant.weight import QuantizedWeight, default_g_idx, quantize_weight, split_fields


class StoredLayer(nn.Module):
    """A layer whose buffers (bias aside) are stored numbers: codes and scales in the precision their
    format defines. ``model.to(dtype)``, ``.half()``, ``.bfloat16()`` move them between devices but keep
    their dtypes (a cast would round fp32 or fp16 scales to bf16 and turn FP8 codes into bf16); the bias
    follows the model's dtype."""

    def _apply(self, fn, recurse=True):
        stored = {name: t for name, t in self._buffers.items() if t is not None and name != "bias"}
        super()._apply(fn, recurse)
        for name, before in stored.items():
            if self._buffers[name].dtype != before.dtype:  # the old tensor is intact: move it instead
                self._buffers[name] = before.to(self._buffers[name].device)
        return self


class QuantLinear(StoredLayer):
    PACKED = ("qweight", "qzeros", "scales", "g_idx")  # the GPTQ layout's buffers (ptq.quant.pack)

    def __init__(self, in_features: int, out_features: int, spec: WeightSpec, bias: bool, dtype=torch.float16):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        groups = spec.num_groups(in_features)
        words = spec.bits * in_features // 32
        self.register_buffer("qweight", torch.zeros(words, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, spec.bits * out_features // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.register_buffer("k_order", None)  # set by sort_groups(): the input features' stored order
        self.int4_group = 0  # > 0 once use_int4_kernel() ran: int4_weight, int4_scales_zeros hold the weight
        self._plain_groups = None  # found at the first Triton call (the buffers are filled after __init__)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None, dtype=torch.float16) -> QuantLinear:
        out_features, in_features = qw.qweight.shape
        layer = cls(in_features, out_features, qw.spec, bias is not None, dtype)
        for name, tensor in pack_gptq(qw).items():
            setattr(layer, name, tensor)
        if bias is not None:
            layer.bias = bias.detach().to(dtype).clone()
        return layer

    def packed(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.PACKED}

    def quantized_weight(self) -> QuantizedWeight:
        """The layer's codes and group parameters, input features in the model's order (also after
        ``sort_groups``)."""
        qw = unpack_gptq(self.packed(), self.spec)
        if self.k_order is None:
            return qw
        restore = torch.argsort(self.k_order)
        return QuantizedWeight(qw.qweight[:, restore].contiguous(), qw.scale, qw.zero, qw.g_idx[restore], qw.spec)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """[out, in]: scale * (code - zero), with the fp16 scales the checkpoint stores."""
        return self.quantized_weight().dequantize().to(dtype)

    def sort_groups(self) -> bool:
        """For inference: store the input features in group order, so that an act-order layer (whose g_idx
        scatters each group over the input) computes through the contiguous-group kernels, and gather each
        input into that order instead (Marlin's reordering). The buffers then hold that order, not the
        checkpoint's: the persistent ``k_order`` buffer marks it in a state dict. False (nothing done) where
        the groups are contiguous already or do not hold group_size features each."""
        if self.k_order is not None or self.int4_group:
            return False
        group = self.spec.group_size_for(self.in_features)
        plain = torch.arange(self.in_features, device=self.g_idx.device) // group
        order = torch.argsort(self.g_idx.long(), stable=True)
        if torch.equal(self.g_idx.long(), plain) or not torch.equal(self.g_idx.long()[order], plain):
            return False
        qw = unpack_gptq(self.packed(), self.spec)
        stored = QuantizedWeight(qw.qweight[:, order].contiguous(), qw.scale, qw.zero, plain.to(torch.int32), qw.spec)
        for name, tensor in pack_gptq(stored).items():
            setattr(self, name, tensor.to(getattr(self, name).dtype))
        self.k_order = order.to(torch.int32)
        self._plain_groups = None
        return True

    def use_int4_kernel(self) -> None:
        """Repack for ``aten._weight_int4pack_mm`` (CUDA, 4-bit, contiguous groups of 32..256) and
        drop the GPTQ-packed copy. tinygemm computes w = (q - 8) * scale + offset per group, so an
        integer zero point z becomes the float offset scale * (8 - z)."""
        if not self.qweight.is_cuda:
            raise ValueError("the int4 kernel runs on CUDA: move the layer to the GPU first")
        qw = unpack_gptq(self.packed(), self.spec)  # in the stored order (sort_groups: the groups' order)
        g = qw.spec.group_size_for(self.in_features)
        if qw.spec.bits != 4 or g not in (32, 64, 128, 256) or self.in_features % g:
            raise ValueError(f"the int4 kernel needs 4 bits and groups of 32..256 dividing the input, not {qw.spec}")
        if not torch.equal(qw.g_idx.long(), torch.arange(self.in_features, device=qw.g_idx.device) // g):
            raise ValueError("the int4 kernel needs contiguous groups: call sort_groups() first (act-order)")
        codes = qw.qweight.to(torch.int32)  # [out, in]
        packed_bytes = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # [out, in / 2]
        weight = torch.ops.aten._convert_weight_to_int4pack(packed_bytes.contiguous(), 8)
        scale = qw.scale.t()  # [groups, out]
        offset = scale * (8 - qw.zero.t())
        scales_and_zeros = torch.stack([scale, offset], dim=2).to(torch.bfloat16).contiguous()
        self.register_buffer("int4_weight", weight)
        self.register_buffer("int4_scales_zeros", scales_and_zeros)
        self.int4_group = g
        for name in self.PACKED:
            setattr(self, name, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.k_order is not None:  # sort_groups(): the weight's input features are stored in group order
            x = x.index_select(-1, self.k_order)
        if self.int4_group:
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch.ops.aten._weight_int4pack_mm(flat, self.int4_weight, self.int4_group, self.int4_scales_zeros)
            y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
            return y + self.bias if self.bias is not None else y
        if self.spec.bits == 4 and kernels.available(x):
            y = self._int4_triton(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, unpack_gptq(self.packed(), self.spec).dequantize().to(x.dtype), self.bias)

    def _int4_triton(self, flat: torch.Tensor) -> torch.Tensor:
        group = self.spec.group_size_for(self.in_features)
        if self._plain_groups is None:  # once: whether column j is in group j // group (not act-order)
            plain = torch.arange(self.in_features, device=self.g_idx.device) // group
            tiles_fit = group % 64 == 0 or group >= self.in_features  # a kernel tile lies in one group
            self._plain_groups = bool(torch.equal(self.g_idx.long(), plain)) and tiles_fit
        if flat.shape[0] <= kernels.SKINNY_ROWS:
            strides = (self.qweight.stride(0), self.scales.stride(0))
            return kernels.skinny_matmul(flat, self.qweight, self.scales, self.out_features, self.in_features, strides,
                                         group, kernels.INT4, zero=self.qzeros,
                                         g_idx=None if self._plain_groups else self.g_idx)  # fmt: skip
        weight_t = kernels.dequantize_int4(self.qweight, self.scales, self.qzeros, self.g_idx, flat.dtype,
                                           group if self._plain_groups else 0)  # fmt: skip
        return flat @ weight_t

    def extra_repr(self) -> str:
        kernel = "tinygemm" if self.int4_group else "triton on CUDA (4 bits)" if self.spec.bits == 4 else "dequantize"
        order = ", inputs in group order" if self.k_order is not None else ""
        return f"in={self.in_features}, out={self.out_features}, {self.spec}, kernel={kernel}{order}"


# Per-token activation rounding in torch ops: the reference the kernels' rounding matches (IEEE division, ties to
# even), the CPU's path, and the one torch.compile sees, fusing it into the kernel that wrote x. Compiled, fp32
# division may be inductor's approximate one (torch._inductor.config.eager_numerics.division_rounding makes it
# IEEE), which can move a code by one where x / scale lies within two ulps of a rounding boundary.
def int8_rows(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 codes, fp32 scales [M, 1] = max|x| / 127)."""
    x_scale = (flat.abs().amax(dim=1, keepdim=True).float() / 127).clamp(min=ACT_SCALE_MIN)
    return torch.round(flat.float() / x_scale).to(torch.int8), x_scale


def fp8_rows(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (E4M3 codes, fp32 scales [M, 1] = max|x| / 448)."""
    x_scale = (flat.abs().amax(dim=1, keepdim=True).float() / 448.0).clamp(min=ACT_SCALE_MIN)
    return (flat.float() / x_scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), x_scale


# How compiled W8A8 layers take up to kernels.SKINNY_ROWS tokens (PTQ_W8A8_COMPILED_ROUNDING): "torch" rounds the
# activations with torch ops, which inductor fuses into the norm or activation that wrote x, and the kernels multiply
# codes; "kernel" hands x over as it is and the tuned tile rounds it, as in eager calls (no rounding kernel where
# inductor has nothing to fuse it into, e.g. after attention, or splits a long reduction into several kernels).
# A layer whose ``rounds_own_input`` is set (``ptq.fuse`` sets it on the attention's output projection, whose input
# the attention kernel writes) takes "kernel" whatever the setting.
COMPILED_ROUNDING = kernels.env_choice("PTQ_W8A8_COMPILED_ROUNDING", {"torch": "", "kernel": ""})


def few_tokens_w8a8(layer, flat: torch.Tensor, act: int, dtype: torch.dtype) -> torch.Tensor:
    """An Int8Linear's or Fp8Linear's product for up to ``kernels.SKINNY_ROWS`` tokens on the kernels. Under
    torch.compile (with ``COMPILED_ROUNDING`` "torch") the activations are rounded by torch ops (fused by inductor
    into what wrote x) and the codes multiplied by ``codes_matmul``; eagerly, the tuned tile rounds them itself or
    quantizes them first."""
    args = (layer.weight, layer.weight_scale, layer.out_features, layer.in_features)
    if torch.compiler.is_compiling() and COMPILED_ROUNDING == "torch" and not layer.rounds_own_input:
        qx, x_scale = (int8_rows if act == kernels.ACT_INT8 else fp8_rows)(flat)
        return kernels.codes_matmul(qx, x_scale, *args, act, dtype)
    return kernels.skinny_matmul(flat, *args, (layer.in_features, 0), 0, kernels.W8, act=act)


def int8_product(qx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """qx [M, K] int8 times w [N, K] int8 -> [M, N] int32, exactly, by ``torch._int_mm`` for any shape: it takes more
    than 16 rows and (on CUDA) K and N in multiples of 8, so the operands are padded with zero codes, which add
    nothing to the sums."""
    rows, k = qx.shape
    n = w.shape[0]
    pad_k, pad_n = -k % 8, -n % 8
    qx = F.pad(qx, (0, pad_k, 0, max(0, 17 - rows)))
    if pad_k or pad_n:
        w = F.pad(w, (0, pad_k, 0, pad_n))
    return torch._int_mm(qx, w.t())[:rows, :n]


class W8A8Layer(StoredLayer):
    """A layer that quantizes its input per token at each call (``Int8Linear``, ``Fp8Linear``)."""

    rounds_own_input = False  # under torch.compile, a few tokens' rounding left to the tile (see COMPILED_ROUNDING)


class Int8Linear(W8A8Layer):
    """y = (q_x q_w^T) * s_x * s_w: W8A8 with the int8 grid evaluation uses (``WeightSpec("int", 8, -1,
    True)``: codes 0..255 around the zero point 128, i.e. signed int8 codes - 128 with one scale per
    output channel), activations quantized per token (max|x| / 127) at each call."""

    SPEC = WeightSpec("int", 8, PER_CHANNEL, True)
    ACT_FORMAT = "int"  # the per-token activations it quantizes itself

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__()
        if qw.spec != self.SPEC:
            raise ValueError(f"Int8Linear holds {self.SPEC.describe()} weights, not {qw.spec.describe()}")
        signed = (qw.qweight.to(torch.int16) - qw.zero.to(torch.int16)).to(torch.int8)  # [out, in]
        self.out_features, self.in_features = signed.shape
        self.register_buffer("weight", signed.contiguous())  # [out, in]: .t() is the column-major B cuBLASLt wants
        self.register_buffer("weight_scale", qw.scale[:, 0].float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        return cls(quantize_weight(weight.detach(), cls.SPEC), bias)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        rows, fast = flat.shape[0], kernels.available(x)
        # under torch.compile the activations are rounded by torch ops, which inductor fuses into what wrote x
        compiled = fast and torch.compiler.is_compiling()
        if fast and rows <= kernels.SKINNY_ROWS:
            y = few_tokens_w8a8(self, flat, kernels.ACT_INT8, x.dtype)
        elif fast:
            qx, x_scale = int8_rows(flat) if compiled else kernels.quantize_rows(flat, kernels.ACT_INT8)
            y = kernels.w8a8_matmul(qx, x_scale, self.weight, self.weight_scale, x.dtype)
        else:
            qx, x_scale = int8_rows(flat)
            y = (int8_product(qx, self.weight).float() * x_scale * self.weight_scale).to(x.dtype)
        y = y.reshape(*x.shape[:-1], -1)
        return y + self.bias if self.bias is not None else y


class Fp8Linear(W8A8Layer):
    """y = (q_x q_w^T) * s_x * s_w: FP8 W8A8 on FP8 tensor cores (Hopper and later; the CPU too) through
    ``kernels.w8a8_matmul`` (``torch._scaled_mm`` with row-wise scales, or ptq's FP8 GEMM where it is faster),
    up to 64 tokens through the one-token and few-token kernels: E4M3 weights with one scale per output channel
    (``WeightSpec("fp8_e4m3", 8, -1, True)``, what evaluation rounds to) and activations quantized per
    token at each call (max|x| / 448), the output in the activations' dtype. On the CPU the same product
    is taken in fp32."""

    SPEC = WeightSpec("fp8_e4m3", 8, PER_CHANNEL, True)
    ACT_FORMAT = "fp8_e4m3"  # the per-token activations it quantizes itself

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__()
        if qw.spec != self.SPEC:
            raise ValueError(f"Fp8Linear holds {self.SPEC.describe()} weights, not {qw.spec.describe()}")
        self.out_features, self.in_features = qw.qweight.shape
        self.register_buffer("weight", qw.qweight.contiguous())  # float8_e4m3fn [out, in]
        self.register_buffer("weight_scale", qw.scale[:, 0].float().reshape(1, -1).contiguous())  # [1, out]
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Fp8Linear:
        return cls(quantize_weight(weight.detach(), cls.SPEC), bias)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale.t()).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        fast = kernels.available(x, fp8=True)
        # under torch.compile the activations are rounded by torch ops, which inductor fuses into what wrote x
        compiled = fast and torch.compiler.is_compiling()
        if fast and flat.shape[0] <= kernels.SKINNY_ROWS:
            y = few_tokens_w8a8(self, flat, kernels.ACT_FP8, x.dtype).reshape(*x.shape[:-1], -1)
            return y + self.bias if self.bias is not None else y
        if fast:
            qx, x_scale = fp8_rows(flat) if compiled else kernels.quantize_rows(flat, kernels.ACT_FP8)
            y = kernels.w8a8_matmul(qx, x_scale, self.weight, self.weight_scale, x.dtype)
        else:  # CPU builds of _scaled_mm may take per-tensor scales only: the same product in fp32
            qx, x_scale = fp8_rows(flat)
            y = (qx.float() * x_scale) @ (self.weight.float() * self.weight_scale.t()).t()
        y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
        return y + self.bias if self.bias is not None else y


class CompactLinear(StoredLayer):
    """A quantized weight in its stored form: codes (4-bit ones two per byte), block scales as the
    format stores them (``ptq.quant.pack.stored_scale``: E4M3 for NVFP4 with its fp32 global scale,
    E8M0 for MX, fp32 otherwise), zero points of asymmetric integers, and g_idx when act-order permuted
    it. Computes by dequantizing to the activations' dtype and calling ``F.linear`` (any device)."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, dtype=torch.float16):
        super().__init__()
        spec = qw.spec
        self.out_features, self.in_features = qw.qweight.shape
        self.spec = spec
        self.nibbles = (spec.bits if spec.is_int else spec.fmt.element_bits) <= 4
        self.register_buffer("codes", pack_nibbles(qw.qweight) if self.nibbles else qw.qweight.clone())
        self.register_buffer("scale", qw.scale.float().clone() if spec.is_int else stored_scale(qw))
        self.register_buffer("zero", None if spec.sym or not spec.is_int else qw.zero.to(torch.uint8))
        self.register_buffer("g_idx", None if qw.has_contiguous_groups() else qw.g_idx.clone())
        self.register_buffer("tensor_scale", None if qw.tensor_scale is None else qw.tensor_scale.float().reshape(1))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())

    def quantized_weight(self) -> QuantizedWeight:
        spec, device = self.spec, self.codes.device
        codes = unpack_nibbles(self.codes, self.in_features) if self.nibbles else self.codes
        if spec.is_int:
            scale = self.scale
        else:
            scale = scale_from_stored(self.scale, spec, self.out_features, self.tensor_scale)
        if self.zero is not None:
            zero = self.zero.float()
        elif spec.is_int:
            zero = torch.full_like(scale, 2 ** (spec.bits - 1))  # the symmetric grid's midpoint
        else:
            zero = torch.zeros_like(scale)
        g_idx = self.g_idx if self.g_idx is not None else default_g_idx(self.in_features, spec, device)
        return QuantizedWeight(codes, scale, zero, g_idx, spec, self.tensor_scale)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.quantized_weight().dequantize().to(dtype)

    def uses_fp4_kernel(self) -> bool:
        """NVFP4 / MXFP4 in contiguous blocks: the Triton kernels read the nibbles and block scales as stored."""
        return self.spec.format in ("nvfp4", "mxfp4") and self.g_idx is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_fp4_kernel() and kernels.available(x, fp8=self.spec.fmt.has_tensor_scale):  # NVFP4: E4M3 scales
            flat = x.reshape(-1, self.in_features)
            group = self.spec.group_size_for(self.in_features)
            kind = kernels.SCALE_E4M3 if self.spec.fmt.has_tensor_scale else kernels.SCALE_E8M0
            if flat.shape[0] <= kernels.SKINNY_ROWS:
                strides = (self.codes.stride(0), self.scale.stride(0))
                y = kernels.skinny_matmul(flat, self.codes, self.scale, self.out_features, self.in_features, strides,
                                          group, kernels.FP4, tensor_scale=self.tensor_scale,
                                          scale_kind=kind)  # fmt: skip
            else:
                weight = kernels.dequantize_fp4(self.codes, self.scale, self.tensor_scale, self.in_features, group,
                                                kind, flat.dtype)  # fmt: skip
                y = F.linear(flat, weight)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        kernel = "triton on CUDA" if self.uses_fp4_kernel() else "dequantize"
        return f"in={self.in_features}, out={self.out_features}, {self.spec.describe()}, kernel={kernel}"


class LayoutLinear(StoredLayer):
    """A weight in a method's own layout (SpQR's outliers and quantized statistics, AQLM's codes and codebooks):
    its tensors kept as buffers, the weight rebuilt (``dequantize``) per call."""

    def __init__(self, qw, bias: torch.Tensor | None, dtype=torch.float16):
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.kind, self.plain, self.tensor_names = split_fields(qw)
        for name in self.tensor_names:
            self.register_buffer(name, getattr(qw, name).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())

    def quantized_weight(self):
        return self.kind(**self.plain, **{name: getattr(self, name) for name in self.tensor_names})

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.quantized_weight().dequantize().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, layout={self.kind.layout}, kernel=dequantize"


W8A8_LAYERS = (Int8Linear, Fp8Linear)  # layers that quantize their inputs per token themselves
QUANTIZED_LAYERS = (QuantLinear, Int8Linear, Fp8Linear, CompactLinear, LayoutLinear)


def quantized_linear(
    qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype, activations: ActSpec | None = None
) -> nn.Module:
    """ptq's layer for a quantized weight: ``Int8Linear`` / ``Fp8Linear`` for int8 / E4M3 W8A8 with per-token
    activations (they quantize them themselves, on the W8A8 kernels), ``QuantLinear`` for integer weights whose
    shapes the GPTQ layout holds (the int4 kernel on CUDA), ``CompactLinear`` otherwise. Other activation specs
    need an input quantizer (``ptq.quant.activations``) on the returned layer (``takes_own_activations``)."""
    if hasattr(qw, "stored_bytes"):  # a method's own layout: no packed form of ours holds it
        return LayoutLinear(qw, bias, dtype)
    per_token = activations is not None and activations.granularity == "per_token"
    for kind in W8A8_LAYERS:
        if per_token and (activations.format, activations.bits) == (kind.ACT_FORMAT, 8) and qw.spec == kind.SPEC:
            return kind(qw, None if bias is None else bias.to(dtype))
    if qw.spec.is_int:
        try:
            return QuantLinear.from_quantized(qw, bias, dtype)
        except PackError:
            pass
    return CompactLinear(qw, bias, dtype)


def takes_own_activations(layer: nn.Module) -> bool:
    """Whether a layer from ``quantized_linear`` quantizes its inputs itself (W8A8 per token)."""
    return isinstance(layer, W8A8_LAYERS)


def _same_order(layer: QuantLinear, first: QuantLinear) -> bool:
    """Whether two 4-bit layers store their input features alike: the same groups, in the same order."""
    if not torch.equal(layer.g_idx, first.g_idx) or (layer.k_order is None) != (first.k_order is None):
        return False
    return layer.k_order is None or torch.equal(layer.k_order, first.k_order)


def join_outputs(layers: list[nn.Module]) -> nn.Module | None:
    """One layer that computes the outputs of ``layers`` side by side (they read the same input), with their
    stored numbers unchanged: their weights, scales and zero points concatenated along the output dimension.
    None where the stored forms do not join: different kinds or formats, act-order's different orders,
    NVFP4's different global scales, tinygemm's repacked weights, a method's own layout."""
    first, kind = layers[0], type(layers[0])
    if len(layers) < 2 or any(type(layer) is not kind for layer in layers):
        return None
    if any(layer.in_features != first.in_features for layer in layers):
        return None
    out_features = sum(layer.out_features for layer in layers)
    bias = _joined_bias(layers)
    if kind is nn.Linear:
        joined = nn.Linear(first.in_features, out_features, bias=bias is not None, device="meta")
        joined.weight = nn.Parameter(torch.cat([layer.weight for layer in layers]), requires_grad=False)
        joined.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        return joined
    if kind is QuantLinear:
        same = all(layer.spec == first.spec and not layer.int4_group for layer in layers)
        if not same or any(not _same_order(layer, first) for layer in layers):
            return None
        joined = QuantLinear(first.in_features, out_features, first.spec, False, first.scales.dtype)
        for name in ("qweight", "qzeros", "scales"):  # [words or groups, out (or out / 8)]: output along dim 1
            setattr(joined, name, torch.cat([getattr(layer, name) for layer in layers], dim=1))
        joined.g_idx, joined.bias = first.g_idx.clone(), bias
        joined.k_order = None if first.k_order is None else first.k_order.clone()
        return joined
    if kind in (Int8Linear, Fp8Linear):
        joined = _bare(kind, first.in_features, out_features)
        joined.register_buffer("weight", torch.cat([layer.weight for layer in layers]))
        scale_dim = first.weight_scale.dim() - 1  # Int8Linear's [out], Fp8Linear's [1, out]
        joined.register_buffer("weight_scale", torch.cat([layer.weight_scale for layer in layers], dim=scale_dim))
        joined.register_buffer("bias", bias)
        return joined
    if kind is CompactLinear:
        if any(layer.spec != first.spec or layer.g_idx is not None for layer in layers):
            return None
        scales = [layer.tensor_scale for layer in layers]
        if scales[0] is not None and any(not torch.equal(s, scales[0]) for s in scales):
            return None
        joined = _bare(kind, first.in_features, out_features)
        joined.spec, joined.nibbles = first.spec, first.nibbles
        for name in ("codes", "scale", "zero"):  # [out, ...]
            parts = [getattr(layer, name) for layer in layers]
            joined.register_buffer(name, None if parts[0] is None else torch.cat(parts))
        joined.register_buffer("g_idx", None)
        joined.register_buffer("tensor_scale", scales[0])
        joined.register_buffer("bias", bias)
        return joined
    return None


def _bare(kind: type, in_features: int, out_features: int) -> StoredLayer:
    """A layer of ``kind`` with its sizes and no buffers yet (its constructor would quantize a weight)."""
    layer = kind.__new__(kind)
    StoredLayer.__init__(layer)
    layer.in_features, layer.out_features = in_features, out_features
    return layer


def _joined_bias(layers: list[nn.Module]) -> torch.Tensor | None:
    """The layers' biases side by side (zeros for a layer without one); None when none has one."""
    biases = [layer.bias for layer in layers]
    present = [b for b in biases if b is not None]
    if not present:
        return None
    return torch.cat([layer.bias if layer.bias is not None else present[0].new_zeros(layer.out_features)
                      for layer in layers])  # fmt: skip
