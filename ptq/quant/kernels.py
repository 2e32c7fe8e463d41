"""Triton kernels for the quantized linears (``ptq.quant.linear``) on CUDA.

Two matmul kernels for few rows (decode: M up to ``SKINNY_ROWS``) read the weight in its stored form and
dequantize it tile by tile in registers, so that a decode step reads 4 or 8 bits per weight instead of 16:

- ``INT4``: the GPTQ layout (``ptq.quant.pack``: qweight int32 [K/8, N], scales fp16 [G, N], qzeros
  [G, N/8], g_idx), symmetric or not. With contiguous groups a tile lies in one group and the scale and
  zero point come out of the dot product: sum_k x_k (q_kn - z_n) s_n = s_n (x·q_n - z_n sum_k x_k).
  With act-order (g_idx permuted) every element gathers its group's scale and zero point.
- ``W8``: int8 or FP8 E4M3 weights [N, K] with one scale per output channel, and optionally the
  activations quantized per token (W8A8), as ``Int8Linear``/``Fp8Linear`` round them: inside the kernel (a
  first pass over the row finds max|x|; the products of 8-bit values are exact in bf16 x bf16 -> fp32, so this
  is the W8A8 product on the bf16 tensor cores), or by one kernel before it, whose codes the 8-bit tensor
  cores then multiply by the stored ones (int8 x int8 -> int32, E4M3 x E4M3 -> fp32).
- ``FP4``: NVFP4 / MXFP4 weights, E2M1 nibbles two per byte [N, ceil(K/2)] with E4M3 (over an fp32 global
  scale) or E8M0 block scales [N, K/block] (weight-only: Hopper has no FP4 tensor cores).

Each program computes a [BLOCK_M, BLOCK_N] tile of the output over 1/SPLIT_K of the K tiles; with
SPLIT_K > 1 (more programs for narrow layers) the last program of a tile to finish adds the others' fp32
partial sums (``_write_output``). One token runs on the CUDA cores, near the memory bound when each thread
sums its own products and converts a weight in one or two integer operations: ``_int4_gemv_kernel`` (INT4
with contiguous groups: a thread holds whole columns of a group's words), ``_w8_gemv_kernel`` and
``_fp4_gemv_kernel`` (8-bit and FP4 weights, K contiguous: a thread holds 16 or 32 K of several rows), and
``_gemv_kernel`` for the rest (act-order's gathered groups, FP4 rows that are not whole int32 words). A SwiGLU
MLP's joined gate/up product of W8A8 codes can write SiLU(gate) * up instead of its outputs (``swiglu_matmul``).
The tile shape is chosen per (weight kind, rows, N, K) by timing a few candidates on first use
(``_config``, each replayed from a CUDA graph over copies of the weights that do not fit in the L2 cache, as a
forward pass reads them); CUDA-graph capture uses what was tuned before it.

For many rows (prefill) cuBLAS does the product: ``dequantize_int4``/``dequantize_fp4`` write the bf16
weight once per call (for 2048 tokens about a tenth of the product's time, where tinygemm's int4 kernel is
far slower: ``ptq.bench.kernels``), and ``quantize_rows`` quantizes activations per token in one kernel before
``w8a8_matmul`` (the library: ``torch._int_mm`` and one scaling pass, ``torch._scaled_mm`` for E4M3; or ptq's
8-bit GEMM that scales as it writes; whichever is faster per shape).

Accumulation is fp32 everywhere. Triton's interpreter (``TRITON_INTERPRET=1``) runs the same kernels on
the CPU in fp32 (it has no bf16 dot), which is how the CPU tests check them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import torch

from ptq.quant import fp4_mma, int4_mma

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the layers dequantize and call F.linear
    triton = None

SKINNY_ROWS = 64  # at most this many rows (tokens) take the fused kernel; more take cuBLAS
INT4, W8, FP4 = 0, 1, 2  # weight kinds
ACT_NONE, ACT_INT8, ACT_FP8 = 0, 1, 2  # activation quantization inside the kernel
QMAX = {ACT_NONE: 1.0, ACT_INT8: 127.0, ACT_FP8: 448.0}  # the grids' largest values (per-token scale = max|x| / QMAX)
SCALE_E4M3, SCALE_E8M0 = 0, 1  # FP4 block scale kinds
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ENABLED = os.environ.get("PTQ_KERNELS", "1") != "0"  # PTQ_KERNELS=0: the layers dequantize and call F.linear


def available(x: torch.Tensor, fp8: bool = False) -> bool:
    """Whether the kernels can take this input: Triton installed, CUDA (or the interpreter, for tests),
    and bf16/fp16 activations (fp32 ones take the exact dequantize path). ``fp8``: the weights (or their
    scales) are E4M3, which Triton converts on compute capability 8.9 and later only."""
    if triton is None or not ENABLED:
        return False
    if INTERPRET:
        return True
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    return not fp8 or _capability(x.device) >= (8, 9)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    """The device's compute capability, asked once per device rather than at every FP8 layer's call."""
    return torch.cuda.get_device_capability(device)


if triton is not None:

    @triton.jit
    def _row_scales(x_ptr, rm, mask_m, K, stride_xm, QMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                    ROW_TILES: tl.constexpr, UNROLL: tl.constexpr = False):  # fmt: skip
        """Per-token scales max|x| / QMAX of rows ``rm`` (clamped as ``ACT_SCALE_MIN`` clamps them). UNROLL: every
        tile's load issued before the maxima wait on them (a product's prologue, where each load waits on L2)."""
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        if UNROLL:
            for t in tl.static_range(ROW_TILES):
                amax = tl.maximum(amax, _tile_abs_max(x_ptr, rm, mask_m, K, stride_xm, t, BLOCK_K))
        else:
            for t in range(ROW_TILES):
                amax = tl.maximum(amax, _tile_abs_max(x_ptr, rm, mask_m, K, stride_xm, t, BLOCK_K))
        return tl.maximum(amax / QMAX, 1e-12)

    @triton.jit
    def _tile_abs_max(x_ptr, rm, mask_m, K, stride_xm, t, BLOCK_K: tl.constexpr):
        """max|x| per row of rows ``rm`` over their K tile ``t``."""
        rk = t * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (rk < K)[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask, other=0.0)
        return tl.max(tl.abs(x.to(tl.float32)), axis=1)

    @triton.jit
    def _round_half_even(y):
        """Nearest integer, ties to even, spelled out (the interpreter has no rint); exact for |y| < 2^22."""
        r = tl.floor(y + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(((r - y) == 0.5) & odd, r - 1.0, r)

    @triton.jit
    def _quantize_tile(x, x_scale, ACT: tl.constexpr):
        """Round an fp32 activation tile to the int8 grid or to E4M3 as the reference layers do (IEEE
        division, ties to even; E4M3 as its spacing 2^(max(e, -6) - 3) times an integer, which is the
        cast's rounding and also runs in the interpreter, whose fp8 cast does not round to nearest).
        Returned as fp32 values."""
        y = tl.math.div_rn(x, x_scale[:, None])
        if ACT == 1:
            return _round_half_even(y)
        else:
            y = tl.minimum(tl.maximum(y, -448.0), 448.0)
            exponent = ((y.to(tl.int32, bitcast=True) >> 23) & 255) - 127
            spacing = ((tl.maximum(exponent, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
            return _round_half_even(y / spacing) * spacing

    @triton.jit
    def _codes_to_float(codes, offset: tl.constexpr):
        """codes - offset as fp32, for integer codes 0 <= c < 2^23: the code written into the mantissa of
        2^23, then one subtraction. Hopper converts integers to floats at an eighth of its add rate; a
        one-token kernel converts every weight, so this is its inner loop's cheapest exact form."""
        return (codes | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + offset)

    @triton.jit
    def _fp4_values(codes):
        """E2M1 nibble (sign << 3 | exponent << 1 | mantissa) -> fp32. Its e1 e0 m in an fp32's two low exponent
        bits and first mantissa bit, its sign in the sign bit, make the value times 2^-126 (e > 0: 2^(e - 127)
        (1 + m/2); e = 0: the subnormal m 2^-127); one multiplication by 2^126 (exact) gives the value."""
        bits = ((codes & 7) << 22) | ((codes & 8) << 28)
        return bits.to(tl.float32, bitcast=True) * 8.507059173023462e37  # 2^126

    @triton.jit
    def _w8_values(w):
        """An 8-bit weight tile as fp32: int8 through ``_codes_to_float`` (shifted to 0..255), FP8 by its cast."""
        if w.dtype == tl.int8:
            return _codes_to_float(w.to(tl.int32) + 128, 128.0)
        else:
            return w.to(tl.float32)

    @triton.jit
    def _gptq_zeros(z_ptr, groups, rn, stride_s, mask):
        """4-bit zero points of ``groups`` x columns ``rn`` (broadcast) from qzeros [G, N/8], where the
        GPTQ layout stores them minus one; int32."""
        words = tl.load(z_ptr + groups * (stride_s // 8) + rn // 8, mask=mask, other=0)
        return (((words >> ((rn % 8) * 4)) & 15) + 1) & 15

    @triton.jit
    def _int4_weights(codes, s_ptr, z_ptr, groups, rn, stride_s, mask):
        """Dequantized 4-bit weights (code - zero) * scale, fp32, with each element's group's fp16 scale and
        zero point gathered from ``groups`` x columns ``rn`` (broadcast against ``codes``)."""
        scale = tl.load(s_ptr + groups * stride_s + rn, mask=mask, other=0.0).to(tl.float32)
        zero = _gptq_zeros(z_ptr, groups, rn, stride_s, mask)
        return _codes_to_float(codes + 16 - zero, 16.0) * scale

    @triton.jit
    def _fp4_scales(s_ptr, ts_ptr, offsets, mask, SCALE_KIND: tl.constexpr):
        """Block scales as fp32: E4M3 over the fp32 global scale (NVFP4), or E8M0's biased exponent placed
        in an fp32's exponent field (MX)."""
        if SCALE_KIND == 0:
            return tl.load(s_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * (1.0 / tl.load(ts_ptr))
        else:
            return (tl.load(s_ptr + offsets, mask=mask, other=0).to(tl.int32) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _write_output(acc, y_ptr, ws_ptr, cnt_ptr, rm, rn, mask_m, mask_n, M, N, stride_ym, tile, pid_k,
                      SPLIT_K: tl.constexpr):  # fmt: skip
        """Store a [BLOCK_M, BLOCK_N] result. With SPLIT_K > 1 each program stores its fp32 partial sums
        to a workspace and counts itself in at its tile's counter; the last to arrive adds the partials,
        writes the output and resets the counter for the next call (one launch, no zero-fill or cast
        kernels around it)."""
        mask = mask_m[:, None] & mask_n[None, :]
        out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            part = rm[:, None] * N + rn[None, :]
            tl.store(ws_ptr + pid_k * M * N + part, acc, mask=mask)
            tl.debug_barrier()  # every thread's partial is written before the count
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                total = tl.zeros_like(acc)
                for s in range(SPLIT_K):
                    total += tl.load(ws_ptr + s * M * N + part, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(out, total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + tile, 0)

    @triton.jit
    def _round_to(v, ROUND: tl.constexpr):
        """v rounded to the model's dtype where it computes in 16 bits (1: bf16, 2: fp16; 0: fp32, v itself), to
        nearest, ties to even; bf16 spelled out in bits (finite values), as the interpreter's cast truncates."""
        if ROUND == 1:
            bits = v.to(tl.int32, bitcast=True)
            v = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        elif ROUND == 2:
            v = v.to(tl.float16).to(tl.float32)
        return v

    @triton.jit
    def _write_swiglu(y, y_ptr, pid_n, half, BLOCK_N: tl.constexpr, ROUND: tl.constexpr):
        """SwiGLU's h = SiLU(gate) * up (Shazeer, "GLU Variants Improve Transformer", 2020) from a tile whose rows
        alternate gate's and up's, rounded as the model rounds each op's output."""
        gate, up = tl.split(tl.reshape(y, [BLOCK_N // 2, 2]))
        gate, up = _round_to(gate, ROUND), _round_to(up, ROUND)
        silu = _round_to(tl.math.div_rn(gate, 1.0 + tl.exp(-gate)), ROUND)
        h = _round_to(silu * up, ROUND)
        rj = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        mask = rj < half
        tl.store(y_ptr + rj, h.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _nibble_dot(xj, wj, acc, SWAP: tl.constexpr):
        """acc + xj wj, or with SWAP (xj and wj given transposed) acc^T + wj^T xj^T."""
        if SWAP:
            out = tl.dot(wj, xj, acc, input_precision="ieee")
        else:
            out = tl.dot(xj, wj, acc, input_precision="ieee")
        return out

    @triton.jit
    def _skinny_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, ts_ptr, xs_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, K, stride_xm, stride_ym, stride_w, stride_s, group,
        WEIGHT: tl.constexpr, ACT: tl.constexpr, ACT_ORDER: tl.constexpr, SCALE_KIND: tl.constexpr,
        DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, QMAX: tl.constexpr, TILES: tl.constexpr, ROW_TILES: tl.constexpr,
        NIBBLE_DOTS: tl.constexpr, CODES: tl.constexpr, INT_DOT: tl.constexpr, SWAP: tl.constexpr,
        ROUNDS: tl.constexpr = False, SCALE_K: tl.constexpr = 128, SCALE_TILES: tl.constexpr = 1,
        ONE_ROW: tl.constexpr = False, FP4_BLOCK: tl.constexpr = 0,
    ):  # fmt: skip
        # Loop counts are compile-time constants (TILES = cdiv(K, BLOCK_K * SPLIT_K)): a few per model, and
        # Triton's interpreter cannot loop over a run-time count with recent numpy.
        # CODES (W8A8): x holds the activations' codes already (``_quantize_rows``) and xs_ptr their scales; the
        # codes are multiplied on the 8-bit tensor cores as stored (INT_DOT: int8 x int8 -> int32; else E4M3 x
        # E4M3 -> fp32, each tile's dot summed into the fp32 accumulator on the CUDA cores), no conversion per weight.
        # ROUNDS (with CODES): x holds the activations as they are; each program finds the rows' scales (SCALE_TILES
        # loads of SCALE_K, all issued at once) and rounds each x tile to those codes before the dot, so no
        # rounding kernel runs before the product. ONE_ROW (M = 1): only the first row is read and rounded, then
        # widened to the dot's BLOCK_M rows with zeros, rather than rounding BLOCK_M - 1 rows of padding
        pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = rm < M, rn < N
        one = tl.arange(0, 1)
        if ACT != 0 and CODES and ROUNDS and ONE_ROW:
            x_scale = _row_scales(x_ptr, one, one >= 0, K, stride_xm, QMAX, 1, SCALE_K, SCALE_TILES, True)
        elif ACT != 0 and CODES and ROUNDS:
            x_scale = _row_scales(x_ptr, rm, mask_m, K, stride_xm, QMAX, BLOCK_M, SCALE_K, SCALE_TILES, True)
        elif ACT != 0 and CODES:
            x_scale = tl.load(xs_ptr + rm, mask=mask_m, other=0.0)
        elif ACT != 0:
            x_scale = _row_scales(x_ptr, rm, mask_m, K, stride_xm, QMAX, BLOCK_M, BLOCK_K, ROW_TILES)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32 if INT_DOT else tl.float32)
        for i in range(TILES):  # tiles pid_k, pid_k + SPLIT_K, ...; those past K are masked out
            k0 = (pid_k + i * SPLIT_K) * BLOCK_K
            if CODES:
                rk = k0 + tl.arange(0, BLOCK_K)
                mask_k = rk < K
                xmask, wmask = mask_m[:, None] & mask_k[None, :], mask_k[:, None] & mask_n[None, :]
                w = tl.load(w_ptr + rn[None, :] * stride_w + rk[:, None], mask=wmask, other=0.0)
                if ROUNDS and ONE_ROW:
                    x = tl.load(x_ptr + rk[None, :], mask=mask_k[None, :], other=0.0)
                    x = tl.where(rm[:, None] == 0, _quantize_tile(x.to(tl.float32), x_scale, ACT), 0.0).to(w.dtype)
                else:
                    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=xmask, other=0.0)
                    if ROUNDS:  # the codes _quantize_rows would write (on the int8 or E4M3 grid: exact casts)
                        x = _quantize_tile(x.to(tl.float32), x_scale, ACT).to(w.dtype)
                if INT_DOT:
                    acc += tl.dot(x, w, out_dtype=tl.int32)
                else:
                    if DOT == tl.float32:  # the interpreter (no fp8 dot): E4M3 values are exact in fp32
                        x, w = x.to(tl.float32), w.to(tl.float32)
                    if SWAP:  # y^T = w x^T: the weight's BLOCK_N rows are the dot's M, which Hopper's FP8 warp-group
                        # instructions take from 64 (with 16 rows of x as M, Triton converts E4M3 to fp16 per weight)
                        acc += tl.trans(tl.dot(tl.trans(w), tl.trans(x), out_dtype=tl.float32))
                    else:
                        acc += tl.dot(x, w, out_dtype=tl.float32)
            elif WEIGHT == 2:  # FP4: even and odd columns are the low and high nibbles of one byte
                rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                ke, ko = 2 * rb, 2 * rb + 1
                xm = mask_m[:, None]
                x_even = tl.load(x_ptr + rm[:, None] * stride_xm + ke[None, :], mask=xm & (ke < K)[None, :], other=0.0)
                x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + ko[None, :], mask=xm & (ko < K)[None, :], other=0.0)
                wmask = (ke < K)[:, None] & mask_n[None, :]
                packed = tl.load(w_ptr + rn[None, :] * stride_w + rb[:, None], mask=wmask, other=0).to(tl.int32)
                # the tile holds whole blocks (FP4_BLOCK inputs): each block's scale loaded once, for its bytes
                blocks: tl.constexpr = BLOCK_K // FP4_BLOCK
                rs = k0 // FP4_BLOCK + tl.arange(0, blocks)
                smask = (rs * FP4_BLOCK < K)[:, None] & mask_n[None, :]
                scale = _fp4_scales(s_ptr, ts_ptr, rn[None, :] * stride_s + rs[:, None], smask, SCALE_KIND)[:, None, :]
                shape: tl.constexpr = [blocks, FP4_BLOCK // 2, BLOCK_N]
                w_even = tl.reshape(tl.reshape(_fp4_values(packed & 15), shape) * scale, [BLOCK_K // 2, BLOCK_N])
                w_odd = tl.reshape(tl.reshape(_fp4_values(packed >> 4), shape) * scale, [BLOCK_K // 2, BLOCK_N])
                w_even, w_odd = w_even.to(DOT), w_odd.to(DOT)
                acc += tl.dot(x_even.to(DOT), w_even, input_precision="ieee")
                acc += tl.dot(x_odd.to(DOT), w_odd, input_precision="ieee")
            elif NIBBLE_DOTS:  # INT4 in one group per tile: x's columns 8 apart against one nibble of every word,
                # eight dots of BLOCK_K / 8, so the words' codes are never interleaved into a [BLOCK_K, BLOCK_N] tile.
                # SWAP: taken as y^T = w x^T, the nibble tiles the dots' left operand, which Triton then decodes in
                # the registers Hopper's warp-group MMA reads it from (no shared-memory round trip per weight)
                rw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
                g = k0 // group
                gmask = mask_n & (k0 < K)
                scale = tl.load(s_ptr + g * stride_s + rn, mask=gmask, other=0.0).to(tl.float32)
                zero = _codes_to_float(_gptq_zeros(z_ptr, g, rn, stride_s, gmask), 0.0)
                if SWAP:  # words [BLOCK_N, BLOCK_K / 8], sums [BLOCK_N, BLOCK_M]
                    wmask_words = mask_n[:, None] & (rw * 8 < K)[None, :]
                    words = tl.load(w_ptr + rw[None, :] * stride_w + rn[:, None], mask=wmask_words, other=0)
                    zero = zero[:, None]
                    d0 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                else:  # words [BLOCK_K / 8, BLOCK_N], sums [BLOCK_M, BLOCK_N]
                    wmask_words = (rw * 8 < K)[:, None] & mask_n[None, :]
                    words = tl.load(w_ptr + rw[:, None] * stride_w + rn[None, :], mask=wmask_words, other=0)
                    zero = zero[None, :]
                    d0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                # A nibble left in place at bit 4p of a half word, or'ed into 2^23's mantissa, is the float
                # 2^23 + code 16^p: one subtraction gives (code - zero) 16^p, exact in bf16 (no row sums of x for
                # the zero point, no shift per code). With SWAP, x's columns for place p are scaled by 16^-p (exact
                # in bf16 and fp32) so that all eight dots share one sum (fewer registers: more programs per
                # multiprocessor); fp16's x could turn subnormal, so there and without SWAP (Hopper's warp-group dots;
                # Ampere's were not timed this way) the four places keep their own sums, joined once per tile.
                one_sum: tl.constexpr = SWAP and DOT != tl.float16
                offsets = (8388608.0 + zero, 8388608.0 + zero * 16.0, 8388608.0 + zero * 256.0,
                           8388608.0 + zero * 4096.0)  # fmt: skip
                halves = ((words & 0xFFFF) | 0x4B000000, (words >> 16) | 0x4B000000)  # 2^23's exponent, per word
                d1, d2, d3 = d0, d0, d0
                for j in tl.static_range(8):
                    kj = rw * 8 + j
                    if SWAP:
                        xmask = (kj < K)[:, None] & mask_m[None, :]
                        xj = tl.load(x_ptr + rm[None, :] * stride_xm + kj[:, None], mask=xmask, other=0.0)
                    else:
                        xmask = mask_m[:, None] & (kj < K)[None, :]
                        xj = tl.load(x_ptr + rm[:, None] * stride_xm + kj[None, :], mask=xmask, other=0.0)
                    place = 16 ** (j % 4)
                    bits = halves[j // 4] & (0x4B000000 | (15 * place))  # one AND per code
                    wj = (bits.to(tl.float32, bitcast=True) - offsets[j % 4]).to(DOT)
                    if one_sum:
                        d0 = _nibble_dot((xj.to(tl.float32) * (1.0 / place)).to(DOT), wj, d0, SWAP)
                    elif j % 4 == 0:
                        d0 = _nibble_dot(xj.to(DOT), wj, d0, SWAP)
                    elif j % 4 == 1:
                        d1 = _nibble_dot(xj.to(DOT), wj, d1, SWAP)
                    elif j % 4 == 2:
                        d2 = _nibble_dot(xj.to(DOT), wj, d2, SWAP)
                    else:
                        d3 = _nibble_dot(xj.to(DOT), wj, d3, SWAP)
                if one_sum:
                    sums = d0
                else:
                    sums = d0 + (d1 + (d2 + d3 * 0.0625) * 0.0625) * 0.0625
                if SWAP:
                    acc += tl.trans(scale[:, None] * sums)
                else:
                    acc += scale[None, :] * sums
            else:
                rk = k0 + tl.arange(0, BLOCK_K)
                mask_k = rk < K
                xmask = mask_m[:, None] & mask_k[None, :]
                x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=xmask, other=0.0).to(tl.float32)
                if ACT != 0:
                    x = _quantize_tile(x, x_scale, ACT)
                x = x.to(DOT)
                wmask = mask_k[:, None] & mask_n[None, :]
                if WEIGHT == 1:  # 8-bit weights [N, K]: the per-channel scale comes after the loop
                    w = tl.load(w_ptr + rn[None, :] * stride_w + rk[:, None], mask=wmask, other=0.0)
                    acc += tl.dot(x, _w8_values(w).to(DOT), input_precision="ieee")
                else:  # INT4, GPTQ layout: 8 codes per int32 along K; zero points stored minus one
                    rw = k0 // 8 + tl.arange(0, BLOCK_K // 8)  # each word loaded once, its 8 codes unpacked
                    wmask_words = (rw * 8 < K)[:, None] & mask_n[None, :]
                    words = tl.load(w_ptr + rw[:, None] * stride_w + rn[None, :], mask=wmask_words, other=0)
                    shifts = tl.arange(0, 8) * 4
                    q = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & 15, [BLOCK_K, BLOCK_N])
                    if ACT_ORDER:
                        g = tl.load(g_ptr + rk, mask=mask_k, other=0)
                        w = _int4_weights(q, s_ptr, z_ptr, g[:, None], rn[None, :], stride_s, wmask)
                        acc += tl.dot(x, w.to(DOT), input_precision="ieee")
                    else:  # the tile lies in one group (BLOCK_K divides the group size)
                        g = k0 // group
                        gmask = mask_n & (k0 < K)
                        scale = tl.load(s_ptr + g * stride_s + rn, mask=gmask, other=0.0).to(tl.float32)
                        zero = _codes_to_float(_gptq_zeros(z_ptr, g, rn, stride_s, gmask), 0.0)
                        dots = tl.dot(x, _codes_to_float(q, 0.0).to(DOT), input_precision="ieee")
                        row_sums = tl.sum(x.to(tl.float32), axis=1)
                        acc += scale[None, :] * (dots - zero[None, :] * row_sums[:, None])
        acc = acc.to(tl.float32)
        if WEIGHT == 1:
            acc = acc * tl.load(s_ptr + rn, mask=mask_n, other=0.0)[None, :]
        if ACT != 0:
            acc = acc * x_scale[:, None]
        tile = pid_m * tl.num_programs(0) + pid_n
        _write_output(acc, y_ptr, ws_ptr, cnt_ptr, rm, rn, mask_m, mask_n, M, N, stride_ym, tile, pid_k, SPLIT_K)

    @triton.jit
    def _one_token_program(N, BLOCK_N: tl.constexpr):
        """A one-token program's place: (column block, K split, its output columns, which of them exist)."""
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        return pid_n, pid_k, rn, rn < N

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, ts_ptr, y_ptr, ws_ptr, cnt_ptr,
        N, K, stride_w, stride_s, group,
        WEIGHT: tl.constexpr, ACT: tl.constexpr, ACT_ORDER: tl.constexpr, SCALE_KIND: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, QMAX: tl.constexpr,
        TILES: tl.constexpr, ROW_TILES: tl.constexpr, INT_SUMS: tl.constexpr,
    ):  # fmt: skip
        """One token (M = 1) on the CUDA cores: each thread multiplies and adds its weights into its own
        partial sums over all of its K tiles, one reduction at the end (no tensor-core layout shuffles,
        no per-tile reductions). Same weight kinds and rounding as ``_skinny_kernel``; INT4 gathers each
        column's group through g_idx (act-order: contiguous groups take ``_int4_gemv_kernel``)."""
        pid_n, pid_k, rn, mask_n = _one_token_program(N, BLOCK_N)
        one = tl.arange(0, 1)
        if ACT != 0:
            x_scale = _row_scales(x_ptr, one, one >= 0, K, K, QMAX, 1, BLOCK_K, ROW_TILES)
        if WEIGHT == 0:  # INT4, GPTQ layout [K/8, N]: partial sums [words, N]
            acc = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
        elif INT_SUMS:  # int8 weights times int8 activations: exact int32 sums, no conversion to float per weight
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
        else:  # K-contiguous rows [N, K] (W8) or [N, K/2] (FP4): partial sums [N, K tile]
            acc = tl.zeros([BLOCK_N, BLOCK_K // (2 if WEIGHT == 2 else 1)], dtype=tl.float32)
        for i in range(TILES):
            k0 = (pid_k + i * SPLIT_K) * BLOCK_K
            if WEIGHT == 0:
                rw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
                wmask = (rw * 8 < K)[:, None] & mask_n[None, :]
                words = tl.load(w_ptr + rw[:, None] * stride_w + rn[None, :], mask=wmask, other=0)
                for j in tl.static_range(8):  # act-order: each element gathers its group's scale and zero point
                    kj = rw * 8 + j
                    xj = tl.load(x_ptr + kj, mask=kj < K, other=0.0).to(tl.float32)
                    gj = tl.load(g_ptr + kj, mask=kj < K, other=0)
                    w = _int4_weights((words >> (4 * j)) & 15, s_ptr, z_ptr, gj[:, None], rn[None, :], stride_s, wmask)
                    acc += xj[:, None] * w
            elif WEIGHT == 1:
                rk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + one[:, None] * K + rk[None, :], mask=(rk < K)[None, :], other=0.0).to(tl.float32)
                if ACT != 0:
                    x = _quantize_tile(x, x_scale, ACT)
                wmask = mask_n[:, None] & (rk < K)[None, :]
                w = tl.load(w_ptr + rn[:, None] * stride_w + rk[None, :], mask=wmask, other=0.0)
                if INT_SUMS:
                    acc += w.to(tl.int32) * x.to(tl.int32)
                else:
                    acc += _w8_values(w) * x
            else:
                rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                ke = 2 * rb
                x_even = tl.load(x_ptr + ke, mask=ke < K, other=0.0).to(tl.float32)
                x_odd = tl.load(x_ptr + ke + 1, mask=ke + 1 < K, other=0.0).to(tl.float32)
                wmask = mask_n[:, None] & (ke < K)[None, :]
                packed = tl.load(w_ptr + rn[:, None] * stride_w + rb[None, :], mask=wmask, other=0).to(tl.int32)
                scale = _fp4_scales(s_ptr, ts_ptr, rn[:, None] * stride_s + (ke // group)[None, :], wmask, SCALE_KIND)
                values = _fp4_values(packed & 15) * x_even[None, :] + _fp4_values(packed >> 4) * x_odd[None, :]
                acc += values * scale
        if WEIGHT == 0:
            y = tl.sum(acc, axis=0)
        else:
            y = tl.sum(acc, axis=1).to(tl.float32)
        if WEIGHT == 1:
            y = y * tl.load(s_ptr + rn, mask=mask_n, other=0.0)
        if ACT != 0:
            y = y * x_scale
        _write_output(y[None, :], y_ptr, ws_ptr, cnt_ptr, one, rn, one >= 0, mask_n, 1, N, N, pid_n, pid_k, SPLIT_K)

    @triton.jit
    def _columns_of_eight(x):
        """The 8 columns [R] of an [R, 8] tile, in order (register moves: no shared memory)."""
        rows: tl.constexpr = x.shape[0]
        even, odd = tl.split(tl.reshape(x, [rows, 4, 2]))  # columns 0 2 4 6 | 1 3 5 7
        c04, c26 = tl.split(tl.reshape(even, [rows, 2, 2]))  # 0 4 | 2 6
        c15, c37 = tl.split(tl.reshape(odd, [rows, 2, 2]))  # 1 5 | 3 7
        c0, c4 = tl.split(c04)
        c2, c6 = tl.split(c26)
        c1, c5 = tl.split(c15)
        c3, c7 = tl.split(c37)
        return c0, c1, c2, c3, c4, c5, c6, c7

    @triton.jit
    def _prefetch_l2(pointers, mask, ASM: tl.constexpr):
        """Ask the L2 cache to fetch the lines at ``pointers`` (PTX prefetch.global.L2; no registers are loaded,
        nothing is waited for). Where there is no PTX (interpreter) it does nothing."""
        if ASM:
            tl.inline_asm_elementwise("@$2 prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l,b", [pointers, mask],
                                      dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip

    @triton.jit
    def _prefetch_row_tile(w_ptr, rows, mask_rows, stride_w, start, limit, LINES: tl.constexpr,
                           PER_LINE: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
        """``_prefetch_l2`` of ``rows`` of w from column ``start`` on: LINES lines of PER_LINE elements each,
        none at or past column ``limit``."""
        cols = start + tl.arange(0, LINES) * PER_LINE
        _prefetch_l2(w_ptr + rows[:, None] * stride_w + cols[None, :], mask_rows[:, None] & (cols < limit)[None, :],
                     ASM)  # fmt: skip

    @triton.jit
    def _int4_gemv_tile(x_ptr, w_ptr, t, rn, mask_n, K, k_words, stride_w, ROWS: tl.constexpr, EVEN: tl.constexpr):
        """Words [ROWS, BLOCK_N] and x [ROWS, 8] of K tile ``t`` (zeros past the end unless EVEN)."""
        rw = t * ROWS + tl.arange(0, ROWS)
        kk = rw[:, None] * 8 + tl.arange(0, 8)[None, :]
        if EVEN:
            return tl.load(w_ptr + rw[:, None] * stride_w + rn[None, :]), tl.load(x_ptr + kk)
        wmask = (rw < k_words)[:, None] & mask_n[None, :]
        words = tl.load(w_ptr + rw[:, None] * stride_w + rn[None, :], mask=wmask, other=0)
        return words, tl.load(x_ptr + kk, mask=kk < K, other=0.0)

    @triton.jit
    def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, stride_w, stride_s, group,
                          BLOCK_N: tl.constexpr, ROWS: tl.constexpr, SPLIT_K: tl.constexpr, TILES: tl.constexpr,
                          EVEN: tl.constexpr, STAGES: tl.constexpr, PREFETCH: tl.constexpr = 0):  # fmt: skip
        """One token times a GPTQ-packed 4-bit weight with contiguous groups, near the memory bound: each
        thread holds whole columns of a tile of ROWS words (8 K each, one group: ROWS * 8 divides it), so the
        sum over the tile is the thread's own and its group's scale and zero point apply once per column
        (STAGES > 1: Triton pipelines the tile loads through shared memory, keeping loads in flight).
        A code becomes a float in one AND: the nibble left in place is the bit pattern of the subnormal
        q 2^(p - 149) (p its bit offset, below the exponent), and x's column is prescaled by 2^(100 - p), so
        every product is exactly q x 2^-49 up to the FMA's rounding (fp32 subnormals are kept: no FTZ).
        EVEN: K, N and the tiles split evenly, no masks. PREFETCH (1: PTX, 2: the interpreter, where it does
        nothing): each tile first asks the L2 cache for the program's tile two ahead, one request per 128-byte
        line, so that a warp's loads of a tile come from L2 rather than DRAM while the warp computed before
        (loading the next tile into registers instead needs registers, and the compiler moves those loads
        below the tile's arithmetic)."""
        pid_n, pid_k, rn, mask_n = _one_token_program(N, BLOCK_N)
        k_words = (K + 7) // 8
        last = tl.cdiv(k_words, ROWS) - 1
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in tl.range(0, TILES, num_stages=STAGES):
            t = pid_k + i * SPLIT_K
            if PREFETCH:  # rows of words, N contiguous: 32 columns per 128-byte line
                rp = (t + 2 * SPLIT_K) * ROWS + tl.arange(0, ROWS)
                _prefetch_row_tile(w_ptr, rp, rp < k_words, stride_w, pid_n * BLOCK_N, N, BLOCK_N // 32, 32,
                                   PREFETCH == 1)  # fmt: skip
            words, x = _int4_gemv_tile(x_ptr, w_ptr, t, rn, mask_n, K, k_words, stride_w, ROWS, EVEN)
            xf = x.to(tl.float32)
            columns = _columns_of_eight(xf)
            upper = words >> 12  # codes 5, 6, 7 at bits 8, 12, 16 (code 5 in place would touch the exponent)
            dots = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
            for j in tl.static_range(8):
                # code j at bit p = 4 j (j < 5) or 4 j - 12 (of upper)
                codes = (words if j < 5 else upper) & (15 << (4 * j - 12 * (j // 5)))
                xj = columns[j] * 2.0 ** (100 - 4 * j + 12 * (j // 5))
                dots += codes.to(tl.float32, bitcast=True) * xj[:, None]
            g = t * ROWS * 8 // group
            gmask = mask_n & (t <= last)
            scale = tl.load(s_ptr + g * stride_s + rn, mask=gmask, other=0.0).to(tl.float32)
            zero = _gptq_zeros(z_ptr, g, rn, stride_s, gmask).to(tl.float32)
            acc += scale * (tl.sum(dots, axis=0) * (2.0**49) - zero * tl.sum(tl.sum(xf, axis=1), axis=0))
        one = tl.arange(0, 1)
        _write_output(acc[None, :], y_ptr, ws_ptr, cnt_ptr, one, rn, one >= 0, mask_n, 1, N, N, pid_n, pid_k,
                      SPLIT_K)  # fmt: skip

    @triton.jit
    def _dot4_int8(a, b, c, ASM: tl.constexpr):
        """c plus the dot product of the four int8 lanes of int32 words a and b: one DP4A instruction on the
        CUDA cores (four products and their sum in int32), spelled out where there is no PTX (interpreter)."""
        if ASM:
            out = tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                            is_pure=True, pack=1)  # fmt: skip
        else:
            out = c
            for lane in tl.static_range(4):  # sign-extended bytes: shift the lane to the top, then back down
                out += ((a << (24 - 8 * lane)) >> 24) * ((b << (24 - 8 * lane)) >> 24)
        return out

    @triton.jit
    def _w8_gemv_kernel(x_ptr, w_ptr, s_ptr, xs_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, stride_w, ACT: tl.constexpr,
                        QMAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                        TILES: tl.constexpr, ROW_TILES: tl.constexpr, INT_SUMS: tl.constexpr, CODES: tl.constexpr,
                        EVEN: tl.constexpr, STAGES: tl.constexpr, DP4A: tl.constexpr = 0,
                        PREFETCH: tl.constexpr = 0, SWIGLU: tl.constexpr = 0, ROUND: tl.constexpr = 0):  # fmt: skip
        """One token times 8-bit weights [N, K] (K contiguous), near the memory bound: each thread reads 16
        weights of BLOCK_N rows per K tile and sums their products itself (the [BLOCK_N, BLOCK_K / 16] partial
        sums are reduced across threads once, at the end); the 16 activations it needs are rounded once for
        all its rows. Same rounding and sums as ``_gemv_kernel``. CODES: x holds the activations' codes
        already and xs_ptr their scale (``_quantize_rows``, once per call instead of once per row block).
        DP4A (int8 codes times int8 weights, both read as int32 words of four: w_ptr and x_ptr, stride_w in
        words): four products per instruction (1: PTX's dp4a, 2: the same sums spelled out). EVEN: no masks.
        PREFETCH (1: PTX, 2: nothing, the interpreter): each tile first asks L2 for the tile two ahead.
        SWIGLU (the joined gate/up product of a SwiGLU MLP, N = 2I rows: gate's then up's; no split-K): a program's
        rows alternate gate's and up's of the same outputs, and it writes h = SiLU(gate) * up (``_write_swiglu``)
        instead of the products."""
        if SWIGLU:
            pid_n, pid_k = tl.program_id(0), tl.program_id(1)
            half = N // 2
            rj = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N) // 2  # the outputs of the program's rows
            rn = rj + (tl.arange(0, BLOCK_N) % 2) * half
            mask_n = rj < half
        else:
            pid_n, pid_k, rn, mask_n = _one_token_program(N, BLOCK_N)
        one = tl.arange(0, 1)
        if ACT != 0 and CODES:
            x_scale = tl.load(xs_ptr + one)
        elif ACT != 0:
            x_scale = _row_scales(x_ptr, one, one >= 0, K, K, QMAX, 1, BLOCK_K, ROW_TILES)
        # a tile is loaded as [rows, K] (a thread's 16 K contiguous, whole rows in each thread), then seen as
        # [rows, K / 16, 16] so that the sum over the last axis is the thread's own; DP4A: [rows, K / 16, 4] words
        unit: tl.constexpr = 4 if DP4A else 1  # K per loaded element
        if DP4A:  # each word's 4 products in one instruction, summed into the thread's [rows, 4] int32 partial sums
            acc = tl.zeros([BLOCK_N, BLOCK_K // 16, 4], dtype=tl.int32)
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_K // 16], dtype=tl.int32 if INT_SUMS else tl.float32)
        for i in tl.range(0, TILES, num_stages=STAGES):
            if PREFETCH:
                _prefetch_row_tile(w_ptr, rn, mask_n, stride_w, (pid_k + (i + 2) * SPLIT_K) * (BLOCK_K // unit),
                                   (K + unit - 1) // unit, BLOCK_K // 128, 128 // unit, PREFETCH == 1)  # fmt: skip
            rk = (pid_k + i * SPLIT_K) * (BLOCK_K // unit) + tl.arange(0, BLOCK_K // unit)
            w_ptrs = w_ptr + rn[:, None] * stride_w + rk[None, :]
            if EVEN:
                x = tl.load(x_ptr + rk)
                w = tl.load(w_ptrs)
            else:
                x = tl.load(x_ptr + rk, mask=rk * unit < K, other=0.0)
                w = tl.load(w_ptrs, mask=mask_n[:, None] & (rk * unit < K)[None, :], other=0.0)
            if CODES and not DP4A:  # int8 codes or E4M3 values: exact as int32 or fp32
                x = x.to(tl.int32 if INT_SUMS else tl.float32)
            elif not CODES:
                x = x.to(tl.float32)
                if ACT != 0:
                    x = _quantize_tile(x[None, :], x_scale, ACT)
            x = tl.reshape(x, [1, BLOCK_K // 16, 16 // unit])
            w = tl.reshape(w, [BLOCK_N, BLOCK_K // 16, 16 // unit])
            if DP4A:
                acc = _dot4_int8(w, tl.broadcast_to(x, w.shape), acc, DP4A == 1)
            elif INT_SUMS:
                acc += tl.sum(w.to(tl.int32) * x.to(tl.int32), axis=2)
            else:
                acc += tl.sum(_w8_values(w) * x, axis=2)
        if DP4A:
            acc = tl.sum(acc, axis=2)
        y = tl.sum(acc.to(tl.float32), axis=1) * tl.load(s_ptr + rn, mask=mask_n, other=0.0)
        if ACT != 0:
            y = y * x_scale
        if SWIGLU:
            _write_swiglu(y, y_ptr, pid_n, N // 2, BLOCK_N, ROUND)
        else:
            _write_output(y[None, :], y_ptr, ws_ptr, cnt_ptr, one, rn, one >= 0, mask_n, 1, N, N, pid_n, pid_k,
                          SPLIT_K)  # fmt: skip

    @triton.jit
    def _fp4_gemv_kernel(x_ptr, w_ptr, s_ptr, ts_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, stride_w, stride_s,
                         SCALE_KIND: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, TILES: tl.constexpr, EVEN: tl.constexpr,
                         STAGES: tl.constexpr, PREFETCH: tl.constexpr = 0):  # fmt: skip
        """One token times NVFP4 / MXFP4 weights read as int32 words of 8 nibbles ([N, K / 8], K contiguous):
        each thread reads 4 words (32 K) of BLOCK_N rows per K tile, sums each scale block (BLOCK = 16 or 32
        K: 2 or 4 words) itself and scales it. A nibble (sign, e1 e0 m at bit p) becomes an fp32 by moving
        e1 e0 m to bits 22..24 and the sign to bit 31: that float is the E2M1 value times 2^-126 (e = 0 gives
        the subnormal m 2^-127, e > 0 2^(e - 127) (1 + m / 2)); x is prescaled by 2^100 and the block sums
        by 2^26. EVEN: no masks."""
        pid_n, pid_k, rn, mask_n = _one_token_program(N, BLOCK_N)
        words_per_block: tl.constexpr = BLOCK // 8
        blocks: tl.constexpr = 4 // words_per_block  # scale blocks in a thread's 4 words
        acc = tl.zeros([BLOCK_N, BLOCK_K // 32, blocks], dtype=tl.float32)
        for i in tl.range(0, TILES, num_stages=STAGES):
            if PREFETCH:  # the tile two ahead asked of L2 (as in _w8_gemv_kernel)
                _prefetch_row_tile(w_ptr, rn, mask_n, stride_w, (pid_k + (i + 2) * SPLIT_K) * (BLOCK_K // 8),
                                   (K + 7) // 8, BLOCK_K // 256, 32, PREFETCH == 1)  # fmt: skip
            # loaded as [rows, words] (whole rows in each thread), then seen as [rows, K / 32, 4 words]
            k0 = (pid_k + i * SPLIT_K) * BLOCK_K
            rw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            rb = k0 // BLOCK + tl.arange(0, BLOCK_K // BLOCK)
            w_ptrs = w_ptr + rn[:, None] * stride_w + rw[None, :]
            s_offsets = rn[:, None] * stride_s + rb[None, :]
            if EVEN:
                words = tl.load(w_ptrs)
                scale = _fp4_scales(s_ptr, ts_ptr, s_offsets, mask_n[:, None], SCALE_KIND)
            else:
                words = tl.load(w_ptrs, mask=mask_n[:, None] & (rw * 8 < K)[None, :], other=0)
                scale = _fp4_scales(s_ptr, ts_ptr, s_offsets, mask_n[:, None] & (rb * BLOCK < K)[None, :], SCALE_KIND)
            words = tl.reshape(words, [BLOCK_N, BLOCK_K // 32, 4])
            scale = tl.reshape(scale, [BLOCK_N, BLOCK_K // 32, blocks])
            # x [1, K / 32, 4 words, 8 codes], prescaled by 2^100 (once per tile)
            kk = rw[:, None] * 8 + tl.arange(0, 8)[None, :]
            if EVEN:
                x = tl.load(x_ptr + kk).to(tl.float32)
            else:
                x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            x = tl.reshape(x * 2.0**100, [1, BLOCK_K // 32, 4, 8])
            # code c's sign (bit 4 c + 3) to bit 31 by one shift; the arithmetic shift right by 6 then takes
            # e1 e0 m from bits 28..30 to 22..24 and keeps the sign in bit 31
            shifts = 28 - 4 * tl.arange(0, 8)
            bits = ((words[:, :, :, None] << shifts[None, None, None, :]) >> 6) & -2118123520  # 0x81C00000
            sums = tl.sum(bits.to(tl.float32, bitcast=True) * x, axis=3)
            if words_per_block == 2:
                sums = tl.sum(tl.reshape(sums, [BLOCK_N, BLOCK_K // 32, 2, 2]), axis=3)
            else:
                sums = tl.sum(sums, axis=2, keep_dims=True)
            acc += sums * scale
        y = tl.sum(tl.sum(acc, axis=2), axis=1) * 2.0**26
        one = tl.arange(0, 1)
        _write_output(y[None, :], y_ptr, ws_ptr, cnt_ptr, one, rn, one >= 0, mask_n, 1, N, N, pid_n, pid_k, SPLIT_K)

    @triton.jit
    def _scale_product_kernel(y_ptr, sx_ptr, sw_ptr, out_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """out = (y * s_x[m]) * s_w[n] in the output's dtype: torch._int_mm's int32 product scaled back in one
        pass (in PyTorch ops: four passes over the [M, N] result)."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        y = tl.load(y_ptr + rm[:, None] * N + rn[None, :], mask=mask, other=0).to(tl.float32)
        x_scale = tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
        w_scale = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
        out = y * x_scale[:, None] * w_scale[None, :]
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _w8a8_gemm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, y_ptr, M, N, K, stride_am, stride_bn, stride_ym,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                          K_TILES: tl.constexpr, FP8: tl.constexpr, FAST_ACCUM: tl.constexpr):  # fmt: skip
        """y = (a b^T) * s_a[m] * s_b[n] for 8-bit codes a [M, K] (tokens, one scale each) and b [N, K] (weights,
        one scale per output channel), both scales applied as the tile is written. int8: tensor-core products
        summed exactly in int32 (the library path writes the int32 product and scales it in a second pass: the
        same arithmetic, so the same bits). FP8 (E4M3): in the tensor cores' own accumulator, from the first K to
        the last (FAST_ACCUM), or each BLOCK_K tile's MMAs there and then added to an fp32 sum
        (``max_num_imprecise_acc``), as cuBLAS does for ``torch._scaled_mm`` without fast accumulation."""
        pid = tl.program_id(0)
        grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        width = GROUP_M * grid_n  # GROUP_M row tiles run against each column tile of b while it sits in L2
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32 if FP8 else tl.int32)
        for i in range(K_TILES):
            rk = i * BLOCK_K + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :], mask=(rm < M)[:, None] & (rk < K)[None, :],
                        other=0.0)  # fmt: skip
            b = tl.load(b_ptr + rn[None, :] * stride_bn + rk[:, None], mask=(rk < K)[:, None] & (rn < N)[None, :],
                        other=0.0)  # fmt: skip
            # FP8: promoted to the fp32 sum every BLOCK_K, or (FAST_ACCUM; None is that on sm_90) never
            acc = tl.dot(a, b, acc, out_dtype=acc.dtype,
                         max_num_imprecise_acc=BLOCK_K if FP8 and not FAST_ACCUM else None)  # fmt: skip
        x_scale = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
        w_scale = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)
        y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, ACT: tl.constexpr, QMAX: tl.constexpr,
                              BLOCK_K: tl.constexpr, ROW_TILES: tl.constexpr, SPREAD: tl.constexpr = 0,
                              SCALE_BLOCK: tl.constexpr = 0):  # fmt: skip
        """One row per program: its scale max|x| / qmax, then the row rounded (int8 or E4M3). SPREAD: a row's
        programs (grid axis 1) each find the row's scale (one load of SCALE_BLOCK >= K) and round one tile of it,
        so that one long row is rounded by many multiprocessors."""
        row = tl.program_id(0)
        rm = row + tl.arange(0, 1)
        if SPREAD:
            x_scale = _row_scales(x_ptr, rm, rm >= 0, K, stride_xm, QMAX, 1, SCALE_BLOCK, 1)
        else:
            x_scale = _row_scales(x_ptr, rm, rm >= 0, K, stride_xm, QMAX, 1, BLOCK_K, ROW_TILES)
        for t in range(1 if SPREAD else ROW_TILES):
            rk = (tl.program_id(1) if SPREAD else t) * BLOCK_K + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rk < K)[None, :], other=0.0)
            q = _quantize_tile(x.to(tl.float32), x_scale, ACT)
            tl.store(q_ptr + rm[:, None] * K + rk[None, :], q.to(q_ptr.dtype.element_ty), mask=(rk < K)[None, :])
        if tl.program_id(1) == 0:
            tl.store(s_ptr + rm, x_scale)

    @triton.jit
    def _dequantize_int4_kernel(w_ptr, s_ptr, z_ptr, g_ptr, out_ptr, N, K, stride_w, stride_s, group,
                                PLAIN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
        """GPTQ-packed [K/8, N] -> dequantized [K, N] in the output's dtype. PLAIN: column k is in group
        k // group and a tile lies in one group (one row of scales and zero points per tile); otherwise
        each element finds its group through g_idx."""
        rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rk < K)[:, None] & (rn < N)[None, :]
        rw = tl.program_id(0) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
        words = tl.load(w_ptr + rw[:, None] * stride_w + rn[None, :], mask=(rw * 8 < K)[:, None] & (rn < N)[None, :])
        shifts = tl.arange(0, 8) * 4
        q = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & 15, [BLOCK_K, BLOCK_N])
        if PLAIN:
            g = tl.program_id(0) * BLOCK_K // group
            w = _int4_weights(q, s_ptr, z_ptr, g, rn[None, :], stride_s, (rn < N)[None, :])
        else:
            g = tl.load(g_ptr + rk, mask=rk < K, other=0)
            w = _int4_weights(q, s_ptr, z_ptr, g[:, None], rn[None, :], stride_s, mask)
        tl.store(out_ptr + rk[:, None] * N + rn[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dequantize_fp4_kernel(w_ptr, s_ptr, ts_ptr, out_ptr, N, K, B, stride_w, stride_s, SCALE_KIND: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, GROUP: tl.constexpr):  # fmt: skip
        """FP4 nibbles [N, B = ceil(K/2)] with block scales -> dequantized [N, K] in the output's dtype. The
        codes are put back in K order (low nibble first) before anything else, so that the output's columns
        are one contiguous range per tile: wide stores along each row (interleaved even and odd stores, or
        the byte's column order, would write two bytes per 32-byte sector). GROUP: the block size (16 or 32, so a
        tile's 2 BLOCK_B codes per row are whole blocks); each block's scale is loaded and converted once and
        multiplies its GROUP codes."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        packed = tl.load(w_ptr + rn[:, None] * stride_w + rb[None, :], mask=(rn < N)[:, None] & (rb < B)[None, :],
                         other=0).to(tl.int32)  # fmt: skip
        codes = tl.reshape(tl.join(packed & 15, packed >> 4), [BLOCK_N, 2 * BLOCK_B])
        kk = tl.program_id(1) * 2 * BLOCK_B + tl.arange(0, 2 * BLOCK_B)
        mask = (rn < N)[:, None] & (kk < K)[None, :]
        blocks: tl.constexpr = 2 * BLOCK_B // GROUP
        rs = tl.program_id(1) * blocks + tl.arange(0, blocks)
        scale = _fp4_scales(s_ptr, ts_ptr, rn[:, None] * stride_s + rs[None, :],
                            (rn < N)[:, None] & (rs * GROUP < K)[None, :], SCALE_KIND)  # fmt: skip
        values = tl.reshape(_fp4_values(codes), [BLOCK_N, blocks, GROUP]) * scale[:, :, None]
        values = tl.reshape(values, [BLOCK_N, 2 * BLOCK_B])
        tl.store(out_ptr + rn[:, None] * K + kk[None, :], values.to(out_ptr.dtype.element_ty), mask=mask)


# Candidate tiles (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) per weight kind; the first is the
# default when nothing was tuned. INT4's BLOCK_K must divide the group size (checked at the call). A sixth
# field NIBBLE picks INT4's eight-dots variant (x's columns 8 apart against one nibble of each word), tuned
# against the one that interleaves the codes; never first, so untuned runs keep the tested default.
# W8 entries with CODES (W8A8 only; else the plain tile): the activations quantized once per call by a kernel
# before the product, whose 8-bit codes the tensor cores multiply as stored (int8 or E4M3 dots).
NIBBLE = "nibble"
INT_SUMS = "int_sums"  # one-token W8A8 with int8 weights: int32 sums of the codes' products (else ignored)
CODES = "codes"  # W8A8: the activations quantized once per call by a kernel before the product
# SWAP: the product taken as y^T = w x^T, the weight tile the dot's left operand: FP8 codes on Hopper's FP8
# warp-group dots (int8: ignored); INT4 NIBBLE tiles decoded in the registers the warp-group dot reads.
SWAP = "swap"
# ROUNDS (with CODES, few-token and SKINNY tiles): the tile rounds the activations to codes itself, before its 8-bit
# dots (no rounding kernel before the product); tuned against the same tile given codes and the tiles that round
# into float sums. Given codes (``codes_matmul``) it is the plain CODES tile, so it is not timed there.
ROUNDS = "rounds"
# MMA (INT4, contiguous groups of 64 or 128, bf16/fp16 on CUDA): ``ptq.quant.int4_mma``, the codes decoded into
# mma.sync's operand registers (BLOCK_N = 8 x words per lane x num_warps; BLOCK_K is its 64-input chunk; the fifth
# field: 1, each group loaded into registers, or the groups in a cp.async ring through shared memory).
MMA = "mma"
# NVFP4 with bf16 activations, on CUDA: ``ptq.quant.fp4_mma`` (BLOCK_N = 8 x columns per lane x num_warps; BLOCK_K:
# 64 x the chunks whose loads one loop step issues together), for one token and for a few.
FP4_MMA = [(128, 128, 4, 4, 1, MMA), (128, 256, 4, 4, 1, MMA), (128, 128, 8, 4, 1, MMA), (128, 256, 2, 4, 1, MMA),
           (64, 128, 4, 4, 1, MMA), (64, 256, 4, 4, 1, MMA), (64, 128, 8, 4, 1, MMA), (256, 128, 2, 8, 1, MMA),
           (256, 256, 1, 8, 1, MMA), (128, 64, 8, 4, 1, MMA), (128, 128, 1, 4, 1, MMA), (64, 256, 1, 4, 1, MMA),
           (64, 512, 4, 4, 1, MMA), (64, 512, 2, 4, 1, MMA), (128, 512, 2, 4, 1, MMA), (32, 256, 8, 4, 1, MMA),
           (32, 512, 4, 4, 1, MMA), (64, 512, 1, 4, 1, MMA)]  # fmt: skip
# The same kernel with its loads through a shared-memory ring of the fifth field's chunks (BLOCK_K 64): compiles for
# sm_90 and is in test_fp4_mma_tiles_over_odd_shapes, but has not yet run on a GPU, so it stays outside the tuner's
# tables until it is tested and timed there (scripts/one_token_candidates.py --extra).
FP4_MMA_RING = [(128, 64, 4, 4, 4, MMA), (64, 64, 8, 4, 4, MMA), (128, 64, 2, 4, 6, MMA), (64, 64, 4, 4, 6, MMA),
                (256, 64, 2, 8, 4, MMA)]  # fmt: skip
CANDIDATES = {
    INT4: [(64, 128, 1, 4, 4), (64, 128, 2, 4, 4), (64, 128, 4, 4, 4), (128, 128, 2, 4, 4), (32, 128, 8, 4, 4),
           (64, 64, 8, 4, 4), (64, 128, 2, 4, 4, NIBBLE), (64, 128, 4, 4, 4, NIBBLE), (128, 128, 2, 4, 4, NIBBLE),
           (32, 128, 8, 4, 4, NIBBLE), (64, 128, 2, 4, 3, NIBBLE, SWAP), (64, 128, 4, 4, 3, NIBBLE, SWAP),
           (128, 128, 1, 4, 3, NIBBLE, SWAP), (128, 128, 2, 4, 3, NIBBLE, SWAP), (256, 128, 1, 8, 3, NIBBLE, SWAP),
           (64, 128, 8, 4, 3, NIBBLE, SWAP), (128, 128, 4, 4, 3, NIBBLE, SWAP), (128, 128, 2, 4, 5, NIBBLE, SWAP),
           (64, 128, 4, 4, 5, NIBBLE, SWAP), (128, 128, 8, 8, 3, NIBBLE, SWAP), (128, 64, 1, 4, 1, MMA),
           (128, 64, 2, 4, 1, MMA), (128, 64, 4, 4, 1, MMA), (64, 64, 2, 4, 1, MMA), (64, 64, 4, 4, 1, MMA),
           (64, 64, 8, 4, 1, MMA), (64, 64, 16, 4, 1, MMA), (32, 64, 4, 4, 1, MMA), (32, 64, 8, 4, 1, MMA),
           (128, 64, 2, 8, 1, MMA), (256, 64, 1, 8, 1, MMA), (128, 64, 1, 4, 4, MMA), (128, 64, 2, 4, 4, MMA),
           (64, 64, 2, 4, 4, MMA), (64, 64, 4, 4, 4, MMA), (64, 64, 8, 4, 3, MMA), (32, 64, 4, 4, 4, MMA),
           (32, 64, 8, 4, 3, MMA), (128, 64, 2, 8, 4, MMA), (128, 64, 1, 4, 6, MMA), (64, 64, 4, 4, 6, MMA)],
    W8: [(64, 256, 1, 4, 4), (64, 128, 4, 4, 4), (128, 128, 2, 4, 4), (32, 256, 4, 4, 4), (64, 256, 8, 4, 3),
         (64, 256, 1, 4, 4, CODES), (64, 256, 4, 4, 4, CODES), (128, 256, 2, 4, 4, CODES), (32, 256, 8, 4, 4, CODES),
         (128, 128, 1, 4, 4, CODES), (64, 512, 2, 4, 3, CODES), (64, 128, 1, 4, 4, CODES, SWAP),
         (128, 128, 1, 4, 4, CODES, SWAP), (64, 256, 2, 4, 4, CODES, SWAP), (128, 256, 2, 4, 3, CODES, SWAP),
         (64, 256, 4, 4, 4, CODES, ROUNDS), (128, 128, 1, 4, 4, CODES, ROUNDS), (64, 128, 1, 4, 4, CODES, SWAP, ROUNDS),
         (128, 128, 1, 4, 4, CODES, SWAP, ROUNDS), (64, 256, 2, 4, 4, CODES, SWAP, ROUNDS)],
    FP4: [(64, 128, 1, 4, 4), (64, 128, 4, 4, 4), (128, 128, 2, 4, 4), (32, 256, 4, 4, 4), (64, 128, 8, 4, 4),
          *FP4_MMA],
}  # fmt: skip
# One token (_gemv_kernel): (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages). Large K tiles keep many
# loads in flight per thread; split-K gives narrow layers (N = 1024 or 4096 on a 132-SM GPU) enough programs.
# A sixth field INT_SUMS: for int8 W8A8, the codes' products summed in int32 (tuned against float sums);
# CODES: the activations quantized by one kernel before the product (tuned against rounding them inside).
# SKINNY (W8A8 with CODES): one token through the few-token tile's 8-bit tensor-core dots, its first row only
# (memory-bound either way: the tensor cores' idle rows cost less than converting every weight on the CUDA cores).
SKINNY = "skinny"
# DP4A (with INT_SUMS and CODES, int8 W8A8 rows of whole int32 words): four codes' products per instruction.
DP4A = "dp4a"
# W8 and FP4 take _w8_gemv_kernel / _fp4_gemv_kernel (the ROWS entries: BLOCK_N, num_warps, programs per
# multiprocessor that split-K aims at, STAGES; BLOCK_K is 16 (W8) or 32 (FP4) K per thread),
# FP4 where its rows are whole int32 words and its blocks 16 or 32; the others take _gemv_kernel.
ROWS = "rows"
# INT4 with contiguous groups takes _int4_gemv_kernel (the COLUMNS entries: BLOCK_N, ROWS of words per tile,
# programs per multiprocessor that split-K aims at, num_warps, STAGES: more than 1 pipelines the tile loads
# through shared memory); act-order takes _gemv_kernel (the other entries), which gathers each column's group.
COLUMNS = "columns"
PREFETCH = "prefetch"  # COLUMNS and ROWS: each tile asks L2 for the tile two ahead (no registers, no wait)
GEMV_CANDIDATES = {
    INT4: [(1024, 16, 3, 8, 1, COLUMNS), (512, 16, 4, 4, 1, COLUMNS), (256, 16, 8, 2, 1, COLUMNS),
           (1024, 16, 3, 8, 3, COLUMNS), (512, 8, 4, 4, 3, COLUMNS), (1024, 8, 4, 4, 1, COLUMNS),
           (2048, 8, 2, 8, 1, COLUMNS), (256, 16, 8, 2, 3, COLUMNS), (1024, 16, 3, 8, 1, COLUMNS, PREFETCH),
           (512, 16, 4, 4, 1, COLUMNS, PREFETCH), (256, 16, 8, 2, 1, COLUMNS, PREFETCH),
           (1024, 8, 2, 8, 1, COLUMNS, PREFETCH), (512, 8, 2, 4, 1, COLUMNS, PREFETCH),
           (64, 512, 2, 4, 2), (64, 512, 1, 4, 2), (64, 512, 4, 4, 2), (32, 512, 4, 4, 2), (128, 256, 2, 8, 2),
           (64, 1024, 2, 8, 2), (32, 1024, 8, 4, 2), (64, 256, 8, 4, 3)],
    W8: [(8, 4, 4, 1, ROWS), (16, 4, 4, 1, ROWS), (8, 2, 8, 1, ROWS), (8, 4, 4, 3, ROWS), (16, 8, 2, 1, ROWS),
         (4, 4, 8, 1, ROWS), (8, 4, 4, 1, ROWS, INT_SUMS), (16, 4, 4, 1, ROWS, INT_SUMS),
         (8, 2, 8, 1, ROWS, INT_SUMS), (8, 4, 4, 1, ROWS, CODES), (16, 4, 4, 1, ROWS, CODES),
         (8, 4, 4, 1, ROWS, INT_SUMS, CODES), (16, 4, 4, 1, ROWS, INT_SUMS, CODES), (8, 2, 8, 1, ROWS, INT_SUMS, CODES),
         (8, 4, 4, 1, ROWS, INT_SUMS, CODES, DP4A), (16, 4, 4, 1, ROWS, INT_SUMS, CODES, DP4A),
         (8, 2, 8, 1, ROWS, INT_SUMS, CODES, DP4A), (4, 4, 8, 1, ROWS, INT_SUMS, CODES, DP4A),
         (16, 8, 2, 1, ROWS, INT_SUMS, CODES, DP4A), (8, 4, 4, 3, ROWS, INT_SUMS, CODES, DP4A),
         (8, 4, 4, 1, ROWS, INT_SUMS, CODES, DP4A, PREFETCH), (4, 4, 8, 1, ROWS, INT_SUMS, CODES, DP4A, PREFETCH),
         (16, 8, 2, 1, ROWS, INT_SUMS, CODES, DP4A, PREFETCH), (8, 4, 4, 1, ROWS, INT_SUMS, CODES, PREFETCH),
         (8, 4, 4, 1, ROWS, CODES, PREFETCH), (16, 4, 4, 1, ROWS, CODES, PREFETCH), (8, 4, 4, 1, ROWS, PREFETCH),
         (64, 256, 4, 4, 4, SKINNY, CODES), (128, 256, 2, 4, 4, SKINNY, CODES), (32, 256, 8, 4, 4, SKINNY, CODES),
         (64, 512, 4, 4, 3, SKINNY, CODES), (64, 128, 4, 4, 4, SKINNY, CODES, SWAP),
         (128, 128, 2, 4, 4, SKINNY, CODES, SWAP), (64, 256, 4, 4, 4, SKINNY, CODES, SWAP),
         (64, 256, 4, 4, 4, SKINNY, CODES, ROUNDS), (128, 256, 2, 4, 4, SKINNY, CODES, ROUNDS),
         (64, 128, 4, 4, 4, SKINNY, CODES, SWAP, ROUNDS), (128, 128, 2, 4, 4, SKINNY, CODES, SWAP, ROUNDS),
         (64, 256, 4, 4, 4, SKINNY, CODES, SWAP, ROUNDS),
         (16, 1024, 2, 4, 2), (16, 1024, 1, 4, 2), (8, 2048, 4, 4, 2), (32, 512, 2, 4, 2), (16, 2048, 4, 8, 2),
         (32, 1024, 4, 8, 2), (16, 512, 8, 4, 3), (16, 1024, 2, 4, 2, INT_SUMS), (8, 2048, 4, 4, 2, INT_SUMS),
         (32, 1024, 4, 8, 2, INT_SUMS), (16, 2048, 4, 8, 2, INT_SUMS)],
    FP4: [(8, 4, 4, 1, ROWS), (16, 4, 4, 1, ROWS), (8, 2, 8, 1, ROWS), (8, 4, 4, 3, ROWS), (4, 4, 8, 1, ROWS),
          (16, 8, 2, 1, ROWS), (8, 4, 4, 1, ROWS, PREFETCH), (16, 4, 4, 1, ROWS, PREFETCH),
          (8, 2, 8, 1, ROWS, PREFETCH),
          (16, 1024, 2, 4, 2), (16, 1024, 1, 4, 2), (8, 2048, 4, 4, 2), (32, 512, 2, 4, 2), (16, 2048, 4, 8, 2),
          (32, 1024, 4, 8, 2), (16, 512, 8, 4, 3), *FP4_MMA],
}  # fmt: skip


def env_choice(name: str, choices: dict[str, str]) -> str:
    """The value of environment variable ``name`` (the first choice where unset), refused unless it is one of
    ``choices`` (value: what it means, or "")."""
    value = os.environ.get(name, next(iter(choices)))
    if value not in choices:
        options = " or ".join(f"{v} ({meaning})" if meaning else v for v, meaning in choices.items())
        raise ValueError(f"{name}={value!r} is not a choice: set it to {options}")
    return value


_tuned: dict[tuple, tuple] = {}
tile_origins = {"timed": 0, "stored": 0}  # how this process's tuned tiles were chosen (the benchmarks record it)
TUNE = os.environ.get("PTQ_KERNEL_TUNE", "1") != "0"
# the tiles timed in earlier processes, per GPU model and kernel source (``tile_store``); PTQ_KERNEL_TILE_STORE=0:
# every process times its own
TILE_STORE = os.environ.get("PTQ_KERNEL_TILE_STORE", "1") != "0"
# How FP8 GEMMs for many tokens sum (PTQ_FP8_FAST_ACCUM). 1: from the first K to the last in the tensor cores' own
# accumulator, whose adds keep fewer bits than fp32 (DeepSeek-V3 technical report, "Increasing Accumulation
# Precision"), as vLLM's CUTLASS FP8 kernels and torchao's float8 inference do: faster. 0: each K tile's sum added
# to an fp32 one (torch._scaled_mm's default).
# The extra error is far below E4M3's own rounding (README, "FP8 accumulation").
FP8_FAST_ACCUM = env_choice("PTQ_FP8_FAST_ACCUM", {"1": "fast", "0": "fp32 per K tile"}) == "1"


def _block_m(rows: int) -> int:
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


def _dot_dtype(x: torch.Tensor):
    if INTERPRET or x.dtype == torch.float32:
        return tl.float32
    return tl.float16 if x.dtype == torch.float16 else tl.bfloat16


_counters: dict[torch.device, torch.Tensor] = {}


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 counters for split-K's last-arrival reduction, kept per device: each launch's last
    programs set theirs back to zero, so launches on one stream share them (launches on concurrent streams
    would not be safe). Grown outside CUDA-graph capture (a captured run has run before)."""
    counters = _counters.get(device)
    if counters is None or counters.numel() < tiles:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("ptq kernels: run a layer once before capturing it in a CUDA graph")
        counters = _counters[device] = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
    return counters


@functools.cache
def multiprocessors(device: torch.device) -> int:
    return 4 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count


def _even_split(tiles: int, wanted: int) -> int:
    """A split of ``tiles`` K tiles near ``wanted`` programs per column block: the largest divisor of
    ``tiles`` not above it (every program the same work, no masks) unless that is less than half of it."""
    wanted = max(1, min(wanted, tiles))
    divisor = max(d for d in range(1, wanted + 1) if tiles % d == 0)
    return divisor if 2 * divisor >= wanted else wanted


def _one_token_grid(x, n: int, k: int, block_n: int, block_k: int, per_sm: int, dtype=None):
    """A one-token launch's grid (column blocks, split-K near ``per_sm`` programs per multiprocessor), its
    output, split-K's workspace, the K tiles each program loops over, and EVEN: whole tiles and column blocks
    for every program (no masks)."""
    tiles, columns = triton.cdiv(k, block_k), triton.cdiv(n, block_n)
    split_k = _even_split(tiles, triton.cdiv(per_sm * multiprocessors(x.device), columns))
    y = torch.empty(1, n, dtype=dtype or x.dtype, device=x.device)
    workspace = torch.empty(split_k, 1, n, dtype=torch.float32, device=x.device) if split_k > 1 else y
    even = k % block_k == 0 and n % block_n == 0 and tiles % split_k == 0
    return (columns, split_k), y, workspace, triton.cdiv(tiles, split_k), even


def _ptx_mode(on: bool) -> int:
    """A PTX-only variant's constexpr: 0 off, 1 its PTX, 2 its interpreter stand-in."""
    return (2 if INTERPRET else 1) if on else 0


def _launch_int4_gemv(config, x, w, scale, zero, n, k, strides, group) -> torch.Tensor:
    block_n, rows, per_sm, warps, stages, _, *variant = config
    grid, y, workspace, tiles, even = _one_token_grid(x, n, k, block_n, 8 * rows, per_sm)
    _int4_gemv_kernel[grid](x, w, scale, zero, y, workspace, tile_counters(x.device, grid[0]), n, k, strides[0],
                            strides[1], group, BLOCK_N=block_n, ROWS=rows, SPLIT_K=grid[1], TILES=tiles, EVEN=even,
                            STAGES=stages, PREFETCH=_ptx_mode(PREFETCH in variant), num_warps=warps)  # fmt: skip
    return y


def _launch_rows_gemv(config, x, w, scale, tensor_scale, n, k, strides, group, weight, act, scale_kind, x_scale=None,
                      out_dtype=None):  # fmt: skip
    if weight == W8:
        return _launch_w8_gemv(config, x, w, scale, n, k, strides[0], act, x_scale, out_dtype)
    block_n, warps, per_sm, stages, _, *variant = config
    block_k = 32 * 32 * warps
    grid, y, workspace, tiles, even = _one_token_grid(x, n, k, block_n, block_k, per_sm, out_dtype)
    words = w.view(torch.int32)  # 8 nibbles per word (rows of whole words: checked by the caller)
    _fp4_gemv_kernel[grid](x, words, scale, scale if tensor_scale is None else tensor_scale, y, workspace,
                           tile_counters(x.device, grid[0]), n, k, words.stride(0), strides[1], SCALE_KIND=scale_kind,
                           BLOCK=group, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=grid[1], TILES=tiles, EVEN=even,
                           STAGES=stages, PREFETCH=_ptx_mode(PREFETCH in variant), num_warps=warps)  # fmt: skip
    return y


def _launch_w8_gemv(config, x, w, scale, n, k, stride_w, act, x_scale=None, out_dtype=None, swiglu=False):
    """One token times 8-bit weights on ``_w8_gemv_kernel``. ``x_scale``: x holds the activations' codes already
    (a CODES tile). ``swiglu``: the joined gate/up product of a SwiGLU MLP, returned as h = SiLU(gate) * up."""
    block_n, warps, per_sm, stages, _, *variant = config
    block_k = 16 * 32 * warps
    if swiglu:  # every program holds whole gate/up pairs of outputs: no split-K
        half, tiles = n // 2, triton.cdiv(k, block_k)
        grid = (triton.cdiv(half, block_n // 2), 1)
        y = workspace = torch.empty(1, half, dtype=out_dtype or x.dtype, device=x.device)
        even = k % block_k == 0 and half % (block_n // 2) == 0
    else:
        grid, y, workspace, tiles, even = _one_token_grid(x, n, k, block_n, block_k, per_sm, out_dtype)
    int_sums = INT_SUMS in variant and _int8_products(act, w)
    codes = CODES in variant and act != ACT_NONE
    if x_scale is None:
        x_codes, x_scale = _quantize_rows(x, act) if codes else (x, scale)
    else:  # x holds the activations' codes already (codes_matmul, whose candidates are CODES tiles)
        x_codes = x
    dp4a = _ptx_mode(DP4A in variant and int_sums and codes and _whole_words(w, 4))
    if dp4a:  # both read as int32 words of 4 codes
        x_codes, w, stride_w = x_codes.view(torch.int32), w.view(torch.int32), stride_w // 4
    round_to = {torch.bfloat16: 1, torch.float16: 2}.get(y.dtype, 0)
    _w8_gemv_kernel[grid](x_codes, w, scale, x_scale, y, workspace, tile_counters(x.device, grid[0]), n, k, stride_w,
                          ACT=act, QMAX=QMAX[act], BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=grid[1], TILES=tiles,
                          ROW_TILES=triton.cdiv(k, block_k), INT_SUMS=int_sums, CODES=codes, EVEN=even, STAGES=stages,
                          DP4A=dp4a, PREFETCH=_ptx_mode(PREFETCH in variant), SWIGLU=swiglu, ROUND=round_to,
                          num_warps=warps)  # fmt: skip
    return y


def _launch(config, x, w, scale, zero, g_idx, tensor_scale, n, k, strides, group, weight, act, act_order, scale_kind,
            gemv=False, x_scale=None, out_dtype=None):  # fmt: skip
    """One product with tile ``config``. W8A8 with ``x_scale``: x holds the activations' codes already (a CODES
    tile; ``out_dtype`` the output's dtype), else the CODES tiles quantize x first."""
    if gemv and COLUMNS in config:
        return _launch_int4_gemv(config, x, w, scale, zero, n, k, strides, group)
    if gemv and ROWS in config:
        return _launch_rows_gemv(config, x, w, scale, tensor_scale, n, k, strides, group, weight, act, scale_kind,
                                 x_scale, out_dtype)  # fmt: skip
    if gemv and weight == INT4 and g_idx is None:
        raise ValueError("the one-token INT4 gathering kernel reads g_idx; contiguous groups take the COLUMNS tiles")
    if MMA in config and weight == FP4:
        return _launch_fp4_mma(config, x, w, scale, tensor_scale, n)
    if MMA in config:
        return _launch_int4_mma(config, x, w, scale, zero, n, k, group)
    block_n, block_k, split_k, warps, stages, *variant = config
    gemv = gemv and SKINNY not in variant  # SKINNY: one token through the few-token tile (its first row)
    m = x.shape[0]
    y = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    block_m = 1 if gemv else _block_m(m)
    grid = (triton.cdiv(n, block_n), split_k, triton.cdiv(m, block_m))
    workspace = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if split_k > 1 else y
    counters = tile_counters(x.device, grid[0] * grid[2])
    dummy = scale  # pointers a kind does not read
    codes = not gemv and CODES in variant and _codes_multiply(weight, act, w)
    # given codes, or over 16 rows (whose scales' loads would not fit the registers), a ROUNDS tile is its CODES tile
    rounds = codes and ROUNDS in variant and x_scale is None and block_m == 16
    if x_scale is None:
        x, x_scale = _quantize_rows(x, act) if codes and not rounds else (x, dummy)
    pointers = (x, w, scale, dummy if zero is None else zero, dummy if g_idx is None else g_idx,
                dummy if tensor_scale is None else tensor_scale)  # fmt: skip
    common = dict(WEIGHT=weight, ACT=act, ACT_ORDER=act_order, SCALE_KIND=scale_kind, BLOCK_N=block_n,
                  BLOCK_K=block_k, SPLIT_K=split_k, QMAX=QMAX[act], TILES=triton.cdiv(k, block_k * split_k),
                  ROW_TILES=triton.cdiv(k, block_k), num_warps=warps, num_stages=stages)  # fmt: skip
    if gemv:
        int_sums = INT_SUMS in variant and _int8_products(act, w)
        _gemv_kernel[grid[:2]](*pointers, y, workspace, counters, n, k, strides[0], strides[1], group,
                               INT_SUMS=int_sums, **common)  # fmt: skip
    else:
        _skinny_kernel[grid](*pointers, x_scale, y, workspace, counters, m, n, k, x.stride(0), y.stride(0), strides[0],
                             strides[1], group, DOT=_dot_dtype(y), BLOCK_M=block_m,
                             NIBBLE_DOTS=NIBBLE in variant and not act_order, CODES=codes,
                             INT_DOT=codes and _int8_products(act, w), SWAP=SWAP in variant,
                             FP4_BLOCK=_fp4_block(group, block_k) if weight == FP4 else 0,
                             **(_rounding_tiles(k, block_k, block_m, m) if rounds else {}), **common)  # fmt: skip
    return y


def _fp4_block(group: int, k_per_tile: int) -> int:
    """An FP4 format's block size (``WeightSpec`` holds NVFP4 to 16 and MX to 32), checked to tile ``k_per_tile``:
    the FP4 kernels load one scale per block of a tile."""
    if group not in (16, 32) or k_per_tile % group:
        raise ValueError(f"FP4 blocks of {group} do not tile {k_per_tile} inputs: the kernels take blocks of 16 or 32")
    return group


def _rounding_tiles(k: int, block_k: int, block_m: int, m: int) -> dict:
    """A ROUNDS tile's constants: its scale pass's loads, [BLOCK_M, 8192 / BLOCK_M] (one row: up to 8192 of it)."""
    one_row = m == 1
    scale_k = min(triton.next_power_of_2(k), 8192 if one_row else max(block_k, 8192 // block_m))
    return dict(ROUNDS=True, SCALE_K=scale_k, SCALE_TILES=triton.cdiv(k, scale_k), ONE_ROW=one_row)


def _launch_int4_mma(config, x, w, scale, zero, n, k, group) -> torch.Tensor:
    block_n, _, split_k, warps, stages, _ = config
    grid_tiles = (n // block_n) * triton.cdiv(x.shape[0], 16)
    return int4_mma.int4_mma(x, w, scale, zero, group, block_n // (8 * warps), warps, split_k, stages,
                             tile_counters(x.device, grid_tiles))  # fmt: skip


def _launch_fp4_mma(config, x, codes, scale, tensor_scale, n) -> torch.Tensor:
    block_n, _, split_k, warps, *_ = config
    grid_tiles = (n // block_n) * triton.cdiv(x.shape[0], 16)
    return fp4_mma.fp4_mma(x, codes, scale, tensor_scale, block_n // (8 * warps), warps, block_k_chunks(config),
                           split_k, tile_counters(x.device, grid_tiles), stages=config[4])  # fmt: skip


def block_k_chunks(config: tuple) -> int:
    """An FP4 MMA tile's 64-input chunks per loop step."""
    return config[1] // 64


def mma_applies(config: tuple, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, n: int, k: int, group: int,
                weight: int = INT4, scale_kind: int = SCALE_E4M3) -> bool:  # fmt: skip
    """Whether an MMA candidate computes this product: INT4 in contiguous groups (``int4_mma.applies``), NVFP4
    (``fp4_mma.applies``)."""
    block_n, _, split_k, warps, *_ = config
    if INTERPRET:
        return False
    if weight == FP4:
        return fp4_mma.applies(x, w, scale, n, k, group, scale_kind == SCALE_E4M3, block_n // (8 * warps), warps,
                               split_k * block_k_chunks(config))  # fmt: skip
    return int4_mma.applies(x, n, k, group, block_n // (8 * warps), warps, split_k)


def _whole_words(w: torch.Tensor, size: int) -> bool:
    """Whether w's rows can be read as aligned words of ``size`` bytes (contiguous rows, widths and starts
    that are multiples of it)."""
    return w.stride(-1) == 1 and w.shape[-1] % size == 0 and w.stride(0) % size == 0 and w.data_ptr() % 16 == 0


def _int8_products(act: int, w: torch.Tensor) -> bool:
    """int8 activations' codes times int8 weights: products summed exactly in int32."""
    return act == ACT_INT8 and w.dtype == torch.int8


def _codes_multiply(weight: int, act: int, w: torch.Tensor) -> bool:
    """Whether the 8-bit tensor cores can multiply the activations' codes by the weight's as stored: int8 by
    int8, or E4M3 by E4M3."""
    return weight == W8 and (_int8_products(act, w) or (act == ACT_FP8 and w.dtype == torch.float8_e4m3fn))


def tuned_tiles() -> dict[tuple, tuple]:
    """The tiles chosen so far in this process, by (weight kind, activations, ..., shape, dtypes, device)."""
    return dict(_tuned)


def tile_store(device_name: str) -> Path:
    """The file of tiles timed on GPUs named ``device_name`` with this kernel source, torch and Triton (in ptq's
    cache folder): timing every candidate compiles each, minutes per model, which a later process skips."""
    from ptq.cache import default_dir

    return default_dir() / "kernel_tiles" / f"{_tile_tag(device_name)}.json"


@functools.cache
def _tile_tag(device_name: str) -> str:
    from ptq.cache import digest

    source = Path(__file__).read_bytes()
    return digest(device_name, torch.__version__, getattr(triton, "__version__", None), source)[:20]


def key_text(key: tuple) -> str:
    """A tuning key without its device (the store is per GPU model), as text."""
    return "|".join(str(part) for part in key if not isinstance(part, torch.device))


def read_tiles(path: Path) -> dict[str, tuple]:
    """The stored tiles by key text; none where the file is missing or unreadable (it is only a shortcut)."""
    try:
        return {key: tuple(config) for key, config in json.loads(path.read_text()).items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def write_tile(path: Path, text: str, config: tuple) -> None:
    """Add one tile to the store, atomically (processes that tune at once each keep a whole file). A store that
    cannot be written (a read-only cache folder) is passed over with a warning: the tile is still used."""
    tiles = {key: list(tile) for key, tile in read_tiles(path).items()}
    tiles[text] = list(config)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(tiles, indent=0, sort_keys=True))
        os.replace(partial, path)
    except OSError as err:
        log.warning("kernel tiles not stored (%s); set PTQ_CACHE to a writable folder to keep them", err)


def _cold_copies(weights: tuple, l2_bytes: int) -> list[tuple]:
    """Copies of a product's weight tensors (same strides), the originals first, that together fill an L2
    cache of ``l2_bytes`` twice over: ``_config`` times a candidate on each in turn, so that each call reads
    its weights from DRAM as in a forward pass (one layer timed alone stays in the L2 between repetitions, all
    but the largest). The originals alone where a copy would not keep their 16-byte alignment (a view at an
    odd offset: the launch would take another path), or memory is short."""
    tensors = [t for t in weights if t is not None]
    size = sum(_span_bytes(t) for t in tensors)
    count = min(MAX_COLD_COPIES, -(-2 * l2_bytes // size))
    if count <= 1 or any(t.data_ptr() % 16 for t in tensors):
        return [weights]

    def copy(t):
        if t is None:
            return None
        out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
        return out.copy_(t)

    try:
        return [weights] + [tuple(copy(t) for t in weights) for _ in range(count - 1)]
    except torch.OutOfMemoryError:
        return [weights]


def _span_bytes(t: torch.Tensor) -> int:
    """The bytes a tensor spans in its storage (a view's, not the whole storage's)."""
    return (1 + sum((n - 1) * step for n, step in zip(t.shape, t.stride(), strict=True))) * t.element_size()


MAX_COLD_COPIES = 32  # tiny weights are timed on this many copies, below the L2's size: nearly cold


def _config(key: tuple, candidates: list, run, weights: tuple | None = None) -> tuple:
    """The fastest candidate for ``key``, timed once per process (not during CUDA-graph capture, nor in
    the interpreter, nor with PTQ_KERNEL_TUNE=0: then the first candidate), or read from ``tile_store``
    where an earlier process timed it on the same GPU model and it is still a candidate. With ``weights``
    (the tensors ``run(config, weights)`` reads that a forward pass reads once), each candidate is timed on
    ``_cold_copies`` of them in turn, i.e. reading from DRAM."""
    if key in _tuned:
        return _tuned[key]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return candidates[0]  # tuned later, outside the capture
    if not TUNE or INTERPRET:
        _tuned[key] = candidates[0]
        return candidates[0]
    store = tile_store(torch.cuda.get_device_name(key[-1])) if TILE_STORE else None
    stored = read_tiles(store).get(key_text(key)) if store else None
    if stored in candidates:
        _tuned[key] = stored
        tile_origins["stored"] += 1
        return stored
    copies = None
    if weights is not None:
        copies = _cold_copies(weights, torch.cuda.get_device_properties(key[-1]).L2_cache_size)

    def run_all(config):
        if copies is None:
            return run(config)
        for copy in copies:
            run(config, copy)

    times = {}
    for config in candidates:
        try:
            # replayed from a CUDA graph: timed eagerly, microsecond kernels would time Python's launching
            ms = triton.testing.do_bench_cudagraph(lambda c=config: run_all(c), rep=10, return_mode="median")
            times[config] = ms / (len(copies) if copies else 1)
        except Exception:  # a tile that does not compile for this shape (registers, shared memory)
            continue
    _tuned[key] = min(times, key=times.get) if times else candidates[0]
    tile_origins["timed"] += 1
    if store and times:
        write_tile(store, key_text(key), _tuned[key])
    return _tuned[key]


def _skinny_matmul(x, w, scale, n, k, strides, group, weight, act=ACT_NONE, zero=None, g_idx=None,
                   tensor_scale=None, scale_kind=SCALE_E4M3, x_scale=None, out_dtype=None) -> torch.Tensor:  # fmt: skip
    """``skinny_matmul``'s work: the tile for this shape (tuned once), then the one-token or few-token kernel.
    W8A8 with ``x_scale``: x holds the activations' codes (``codes_matmul``), and only CODES tiles compete."""
    if x.stride(-1) != 1:  # the kernels read rows as contiguous runs
        x = x.contiguous()
    if x_scale is not None:
        x_scale = x_scale.reshape(-1).contiguous()
    gemv = x.shape[0] == 1 and x.is_contiguous()
    act_order = g_idx is not None
    # FP4's one-token words kernel reads rows of whole, aligned int32 words
    words = weight == FP4 and gemv and group in (16, 32) and _whole_words(w, 4)
    key = (weight, act, act_order, scale_kind, gemv, _block_m(x.shape[0]), n, k, group, x.dtype, w.dtype, words,
           out_dtype, x.device)  # fmt: skip

    def run(config, weights=(w, scale, zero)):
        return _launch(config, x, *weights, g_idx, tensor_scale, n, k, strides, group, weight, act, act_order,
                       scale_kind, gemv, x_scale, out_dtype)  # fmt: skip

    config = _tuned.get(key)  # a decode step's calls: no candidate lists rebuilt, one lookup
    if config is None:
        candidates = _candidates(weight, act, x, w, scale, gemv, act_order, group, n, k, words, scale_kind)
        if x_scale is not None:
            candidates = [c for c in candidates if CODES in c and ROUNDS not in c]
        config = _config(key, candidates, run, (w, scale, zero))
    return run(config)


def _candidates(weight: int, act: int, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, gemv: bool,
                act_order: bool, group: int, n: int, k: int, words: bool, scale_kind: int) -> list[tuple]:  # fmt: skip
    """The tiles that can compute this product, the untuned default first."""
    candidates = (GEMV_CANDIDATES if gemv else CANDIDATES)[weight]
    if weight == INT4 and not act_order:  # contiguous groups: a tile (ROWS words, or BLOCK_K) lies in one group
        span = (lambda c: 8 * c[1]) if gemv else (lambda c: c[1])
        candidates = [c for c in candidates if (COLUMNS in c) == gemv and (group % span(c) == 0 or group >= k)]
        if not candidates:
            raise ValueError(f"group size {group} is not a multiple of 64: pass g_idx (the gathering path)")
    elif weight == INT4 and gemv:  # act-order: the gathering kernel
        candidates = [c for c in candidates if COLUMNS not in c]
    if weight == INT4 and not gemv:  # MMA tiles: contiguous groups, shapes and dtypes they hold (not act-order)
        candidates = [c for c in candidates if MMA not in c or (not act_order and mma_applies(c, x, w, scale, n, k,
                                                                                              group))]  # fmt: skip
    if weight == FP4:
        candidates = [c for c in candidates if MMA not in c or mma_applies(c, x, w, scale, n, k, group, FP4,
                                                                           scale_kind)]  # fmt: skip
    if weight == FP4 and gemv and not words:
        candidates = [c for c in candidates if ROWS not in c]
    if weight == W8:  # variants that would run as another candidate's tile here are not timed twice
        candidates = [c for c in candidates if _w8_variant_applies(c, act, w) and (ROUNDS not in c or x.shape[0] <= 16)]
    return candidates


def _w8_variant_applies(config: tuple, act: int, w: torch.Tensor) -> bool:
    """Whether a W8 candidate's variant fields change what it computes with these activations and weights
    (``_launch`` runs an inapplicable variant as the plain tile of its shape)."""
    if INT_SUMS in config and not _int8_products(act, w):
        return False
    if DP4A in config and not _whole_words(w, 4):  # rows that are not whole words: the int32-sum tile
        return False
    if ROWS in config:  # the one-token rows kernel quantizes any activations first with CODES
        return CODES not in config or act != ACT_NONE
    if (CODES in config or SKINNY in config) and not _codes_multiply(W8, act, w):
        return False
    return SWAP not in config or act == ACT_FP8


def _quantize_rows(x: torch.Tensor, act: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes [M, K] int8 or float8_e4m3fn, scales [M, 1] fp32), per token, in one kernel."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    dtype = torch.int8 if act == ACT_INT8 else torch.float8_e4m3fn
    q = torch.empty(m, k, dtype=dtype, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block_k, warps = (1024 if k >= 1024 else 128), 4
    if m == 1 and 4096 < k <= 16384:  # one long row (a decode step's MLP): every program finds the scale, rounds a tile
        grid = (1, triton.cdiv(k, 2048))
        _quantize_rows_kernel[grid](x, q, s, k, x.stride(0), ACT=act, QMAX=QMAX[act], BLOCK_K=2048, ROW_TILES=1,
                                    SPREAD=True, SCALE_BLOCK=triton.next_power_of_2(k), num_warps=8)  # fmt: skip
        return q, s
    if m <= SKINNY_ROWS:  # a few programs: each row in one tile (up to 16K), so its two passes are one load each
        block_k = min(triton.next_power_of_2(k), 16384)
        warps = max(4, min(16, block_k // 1024))
    _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), ACT=act, QMAX=QMAX[act], BLOCK_K=block_k,
                                ROW_TILES=triton.cdiv(k, block_k), num_warps=warps)  # fmt: skip
    return q, s


def _scale_int_product(product: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, dtype) -> torch.Tensor:
    m, n = product.shape
    out = torch.empty(m, n, dtype=dtype, device=product.device)
    grid = (triton.cdiv(m, 32), triton.cdiv(n, 128))
    _scale_product_kernel[grid](product, x_scale, w_scale, out, m, n, BLOCK_M=32, BLOCK_N=128, num_warps=4)
    return out


# W8A8 products for many tokens: the library (torch._int_mm then the scaling kernel for int8, torch._scaled_mm with
# row-wise scales for E4M3) or ptq's one-pass GEMM with tiles (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps,
# num_stages); timed per shape like the tiles above.
LIBRARY = ("library",)
W8A8_GEMM_CANDIDATES = [(128, 128, 128, 8, 8, 3), (128, 256, 128, 8, 8, 3), (128, 128, 64, 8, 4, 4),
                        (64, 128, 128, 8, 4, 4), (256, 128, 128, 8, 8, 3)]  # fmt: skip


def _launch_w8a8_gemm(config, qx, x_scale, w, w_scale, dtype, fast_accum=False) -> torch.Tensor:
    m, k = qx.shape
    n = w.shape[0]
    fp8 = qx.dtype == torch.float8_e4m3fn
    if config == LIBRARY and fp8:
        return torch._scaled_mm(
            qx, w.t(), scale_a=x_scale, scale_b=w_scale.reshape(1, n), out_dtype=dtype, use_fast_accum=fast_accum
        )
    if config == LIBRARY:
        return _scale_int_product(torch._int_mm(qx, w.t()), x_scale, w_scale, dtype)
    block_m, block_n, block_k, group_m, warps, stages = config
    y = torch.empty(m, n, dtype=dtype, device=qx.device)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _w8a8_gemm_kernel[grid](qx, w, x_scale, w_scale, y, m, n, k, qx.stride(0), w.stride(0), y.stride(0),
                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
                            K_TILES=triton.cdiv(k, block_k), FP8=fp8, FAST_ACCUM=fast_accum, num_warps=warps,
                            num_stages=stages)  # fmt: skip
    return y


def _w8a8_matmul(qx, x_scale, w, w_scale, dtype) -> torch.Tensor:
    """W8A8 for many tokens: int8 or E4M3 codes [M, K] with per-token scales [M, 1] times codes of the same kind
    [N, K] with per-channel scales (N of them) -> [M, N] in ``dtype``, by whichever of the library and ptq's
    one-pass GEMM is faster for the shape (int8: the same bits either way; E4M3: both sum as ``FP8_FAST_ACCUM``
    says, in another order)."""
    m, k = qx.shape
    n = w.shape[0]
    if qx.dtype == torch.float8_e4m3fn:  # torch._scaled_mm takes multiples of 16 and 16-bit or fp32 outputs
        library = k % 16 == 0 and n % 16 == 0 and dtype in (torch.bfloat16, torch.float16, torch.float32)
    else:  # torch._int_mm takes more than 16 rows and multiples of 8
        library = m > 16 and k % 8 == 0 and n % 8 == 0
    fast = FP8_FAST_ACCUM and qx.dtype == torch.float8_e4m3fn
    key = ("w8a8_gemm", qx.dtype, max(16, triton.next_power_of_2(m)), n, k, dtype, fast, qx.device)
    candidates = [LIBRARY] * library + W8A8_GEMM_CANDIDATES  # the library first: it runs untuned where it can
    config = _config(key, candidates, lambda c: _launch_w8a8_gemm(c, qx, x_scale, w, w_scale, dtype, fast))
    return _launch_w8a8_gemm(config, qx, x_scale, w, w_scale, dtype, fast)


def _dequantize_int4(qweight, scales, qzeros, g_idx, dtype, group: int = 0) -> torch.Tensor:
    """GPTQ-packed 4-bit weight -> W^T [K, N] in ``dtype`` (what ``x @ W^T`` needs). ``group``: the group
    size when column k is in group k // group (a multiple of 64, or at least K); 0: follow g_idx."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    out = torch.empty(k, n, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(k, 64), triton.cdiv(n, 128))
    _dequantize_int4_kernel[grid](qweight, scales, qzeros, g_idx, out, n, k, qweight.stride(0), scales.stride(0),
                                  max(group, 1), PLAIN=group > 0, BLOCK_K=64, BLOCK_N=128, num_warps=4)  # fmt: skip
    return out


def _dequantize_fp4(codes, scale, tensor_scale, k, group, scale_kind, dtype) -> torch.Tensor:
    """FP4 nibbles [N, ceil(K/2)] with block scales [N, ceil(K/group)] -> W [N, K] in ``dtype``."""
    n = codes.shape[0]
    out = torch.empty(n, k, dtype=dtype, device=codes.device)
    grid = (triton.cdiv(n, 32), triton.cdiv(codes.shape[1], 64))
    _dequantize_fp4_kernel[grid](codes, scale, scale if tensor_scale is None else tensor_scale, out, n, k,
                                 codes.shape[1], codes.stride(0), scale.stride(0), SCALE_KIND=scale_kind,
                                 BLOCK_N=32, BLOCK_B=64, GROUP=_fp4_block(group, 128), num_warps=4)  # fmt: skip
    return out


# The entry points as PyTorch operators (torch.library): torch.compile sees each as one opaque call with a
# known output shape instead of tracing into the tuner and the launch, so compiled models keep them whole.
@torch.library.custom_op("ptq::quantized_matmul", mutates_args=())
def _matmul_op(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               g_idx: torch.Tensor | None, tensor_scale: torch.Tensor | None, n: int, k: int, stride_w: int,
               stride_s: int, group: int, weight: int, act: int, scale_kind: int) -> torch.Tensor:  # fmt: skip
    return _skinny_matmul(x, w, scale, n, k, (stride_w, stride_s), group, weight, act, zero, g_idx, tensor_scale,
                          scale_kind)  # fmt: skip


@_matmul_op.register_fake
def _(x, w, scale, zero, g_idx, tensor_scale, n, k, stride_w, stride_s, group, weight, act, scale_kind):
    return x.new_empty(x.shape[0], n)


def skinny_matmul(x, w, scale, n, k, strides, group, weight, act=ACT_NONE, zero=None, g_idx=None,
                  tensor_scale=None, scale_kind=SCALE_E4M3) -> torch.Tensor:  # fmt: skip
    """y [M, N] = x [M, K] times the stored weight (see the module docstring for each kind's tensors)."""
    if not torch.compiler.is_compiling():  # eager: skip the operator's dispatch (decode calls this per linear)
        return _skinny_matmul(x, w, scale, n, k, strides, group, weight, act, zero, g_idx, tensor_scale, scale_kind)
    return _matmul_op(x, w, scale, zero, g_idx, tensor_scale, n, k, strides[0], strides[1], group, weight, act,
                      scale_kind)  # fmt: skip


@torch.library.custom_op("ptq::codes_matmul", mutates_args=())
def _codes_matmul_op(qx: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, n: int, k: int,
                     act: int, out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    return _codes_matmul(qx, x_scale, w, w_scale, n, k, act, out_dtype)


@_codes_matmul_op.register_fake
def _(qx, x_scale, w, w_scale, n, k, act, out_dtype):
    return qx.new_empty(qx.shape[0], n, dtype=out_dtype)


def _codes_matmul(qx, x_scale, w, w_scale, n, k, act, out_dtype) -> torch.Tensor:
    return _skinny_matmul(qx, w, w_scale, n, k, (k, 0), 0, W8, act, x_scale=x_scale, out_dtype=out_dtype)


def _swiglu_matmul(qx, x_scale, w, w_scale, n, k, act, out_dtype) -> torch.Tensor:
    """``swiglu_matmul``'s work: the tile (tuned once per shape among the one-token CODES tiles), then the launch."""
    key = ("swiglu", act, n, k, qx.dtype, w.dtype, out_dtype, qx.device)

    def run(config, weights=(w, w_scale)):
        return _launch_w8_gemv(config, qx, *weights, n, k, k, act, x_scale, out_dtype, swiglu=True)

    config = _tuned.get(key)
    if config is None:
        candidates = [c for c in GEMV_CANDIDATES[W8] if ROWS in c and CODES in c and _w8_variant_applies(c, act, w)]
        config = _config(key, candidates, run, (w, w_scale))
    return run(config)


@torch.library.custom_op("ptq::swiglu_matmul", mutates_args=())
def _swiglu_matmul_op(qx: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, n: int, k: int,
                      act: int, out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    return _swiglu_matmul(qx, x_scale, w, w_scale, n, k, act, out_dtype)


@_swiglu_matmul_op.register_fake
def _(qx, x_scale, w, w_scale, n, k, act, out_dtype):
    return qx.new_empty(1, n // 2, dtype=out_dtype)


@torch.library.custom_op("ptq::quantize_rows", mutates_args=())
def _quantize_rows_op(x: torch.Tensor, act: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize_rows(x, act)


@_quantize_rows_op.register_fake
def _(x, act):
    dtype = torch.int8 if act == ACT_INT8 else torch.float8_e4m3fn
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape[0], 1, dtype=torch.float32)


@torch.library.custom_op("ptq::w8a8_matmul", mutates_args=())
def _w8a8_matmul_op(qx: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    return _w8a8_matmul(qx, x_scale, w, w_scale, dtype)


@_w8a8_matmul_op.register_fake
def _(qx, x_scale, w, w_scale, dtype):
    return qx.new_empty(qx.shape[0], w.shape[0], dtype=dtype)


@torch.library.custom_op("ptq::dequantize_int4", mutates_args=())
def _dequantize_int4_op(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor,
                        dtype: torch.dtype, group: int = 0) -> torch.Tensor:  # fmt: skip
    return _dequantize_int4(qweight, scales, qzeros, g_idx, dtype, group)


@_dequantize_int4_op.register_fake
def _(qweight, scales, qzeros, g_idx, dtype, group=0):
    return qweight.new_empty(qweight.shape[0] * 8, qweight.shape[1], dtype=dtype)


@torch.library.custom_op("ptq::dequantize_fp4", mutates_args=())
def _dequantize_fp4_op(codes: torch.Tensor, scale: torch.Tensor, tensor_scale: torch.Tensor | None, k: int,
                       group: int, scale_kind: int, dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    return _dequantize_fp4(codes, scale, tensor_scale, k, group, scale_kind, dtype)


@_dequantize_fp4_op.register_fake
def _(codes, scale, tensor_scale, k, group, scale_kind, dtype):
    return codes.new_empty(codes.shape[0], k, dtype=dtype)


def eager_or_operator(work, operator):
    """A public entry point: ``work`` itself in eager calls (a prefill calls these once per linear, and the
    operator's dispatch costs CPU time the GPU may wait for), ``operator`` under torch.compile."""

    @functools.wraps(work)
    def entry(*args, **kwargs):
        return operator(*args, **kwargs) if torch.compiler.is_compiling() else work(*args, **kwargs)

    return entry


quantize_rows = eager_or_operator(_quantize_rows, _quantize_rows_op)
# W8A8 for up to SKINNY_ROWS tokens whose activations are quantized already (int8 or E4M3 codes [M, K], fp32
# scales [M, 1]) times 8-bit weights [N, K] with per-channel scales: the few-token and one-token CODES tiles
codes_matmul = eager_or_operator(_codes_matmul, _codes_matmul_op)
w8a8_matmul = eager_or_operator(_w8a8_matmul, _w8a8_matmul_op)
# A SwiGLU MLP's first product at one token (``ptq.fuse.SwiGLU``): the input's codes [1, K] (E4M3 or int8, fp32
# scale [1, 1]) times the joined gate/up weights [N, K] (gate's rows, then up's) -> h = SiLU(gate) * up [1, N / 2]
swiglu_matmul = eager_or_operator(_swiglu_matmul, _swiglu_matmul_op)

dequantize_int4 = eager_or_operator(_dequantize_int4, _dequantize_int4_op)
dequantize_fp4 = eager_or_operator(_dequantize_fp4, _dequantize_fp4_op)
