"""GPTQ's inner column loop as one Triton kernel per lazy block (CUDA only).

The loop over the ``block_size`` columns of a lazy block is inherently sequential in the columns
but independent across rows. In PyTorch every column costs ~10 kernel launches on a [rows] vector,
so on a GPU the solve is launch-bound (Llama-3-8B: 850k columns, ~2 minutes). Here each program
keeps a [BLOCK_R, block] tile of the weights in registers and runs all of the block's columns
itself: quantize column j, spread its error over the columns after it (row j of the inverse
Hessian's Cholesky factor), next column. One launch per lazy block instead of ~1,300.

The arithmetic is the PyTorch loop's, in fp32, with IEEE division and round-half-to-even, so both
paths give the same codes up to fp32 rounding order (tests/test_gpu.py compares them). Float formats
(FP8, NVFP4, MX) round to their minifloat grid with the same rule as ``MiniFloat.round``; their group
scales must be known before the block (static groups or per channel), which GPTQ's default gives.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    try:
        from triton.language.extra.cuda.libdevice import rint
    except ImportError:  # older layout
        from triton.language.extra.libdevice import rint
except ImportError:  # CPU-only installs: the PyTorch loop is used
    triton = None


def available(W: torch.Tensor, spec, groups_known: bool) -> bool:
    """Whether the kernel can run this solve: CUDA, fp32, and an integer grid, or a float format
    whose group scales are known before each lazy block (static groups, per channel): the kernel
    computes integer group parameters itself, float ones only by lookup."""
    if triton is None or not W.is_cuda or W.dtype != torch.float32:
        return False
    return spec.is_int or groups_known


if triton is not None:

    @triton.jit
    def _gptq_lazy_block(
        W, Hinv, Q, Err, S, Z,
        rows, ncols,
        stride_w, stride_h, stride_q, stride_e, stride_s,
        maxq,
        GROUP: tl.constexpr,  # > 0: group parameters computed in the kernel every GROUP columns
        SYM: tl.constexpr,
        FLOAT: tl.constexpr,  # codes on a minifloat grid (MBITS mantissa bits, exponent >= EMIN, |q| <= maxq)
        MBITS: tl.constexpr,
        EMIN: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """W: the block's columns [rows, ncols] (read only); Hinv: its [ncols, ncols] diagonal block
        of the upper Cholesky factor of H^-1. Writes codes Q and scaled errors Err ([rows, ncols]).
        GROUP > 0: writes each group's scale/zero to S/Z [rows, ncols // GROUP];
        GROUP == 0: reads a scale/zero per column from S/Z [rows, ncols]."""
        pid = tl.program_id(0)
        r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        rmask = r < rows
        tile = tl.load(W + r[:, None] * stride_w + c[None, :], mask=rmask[:, None] & (c[None, :] < ncols), other=0.0)
        scale = tl.zeros([BLOCK_R], dtype=tl.float32)
        zero = tl.zeros([BLOCK_R], dtype=tl.float32)
        for j in range(0, ncols):
            if GROUP > 0:
                if j % GROUP == 0:  # compute_qparams on the group's current (updated) columns
                    in_group = (c[None, :] >= j) & (c[None, :] < j + GROUP) & (c[None, :] < ncols)
                    xmin = tl.minimum(tl.min(tl.where(in_group, tile, float("inf")), axis=1), 0.0)
                    xmax = tl.maximum(tl.max(tl.where(in_group, tile, float("-inf")), axis=1), 0.0)
                    if SYM:
                        xmax = tl.maximum(-xmin, xmax)
                        xmin = -xmax
                    empty = (xmin == 0.0) & (xmax == 0.0)
                    xmin = tl.where(empty, -1.0, xmin)
                    xmax = tl.where(empty, 1.0, xmax)
                    scale = tl.math.div_rn(xmax - xmin, tl.zeros_like(xmax) + maxq)
                    if SYM:
                        zero = tl.zeros_like(scale) + (maxq + 1) / 2
                    else:
                        zero = rint(tl.math.div_rn(-xmin, scale))
                    tl.store(S + r * stride_s + j // GROUP, scale, mask=rmask)
                    tl.store(Z + r * stride_s + j // GROUP, zero, mask=rmask)
            else:
                scale = tl.load(S + r * stride_s + j, mask=rmask, other=1.0)
                zero = tl.load(Z + r * stride_s + j, mask=rmask, other=0.0)
            w = tl.sum(tl.where(c[None, :] == j, tile, 0.0), axis=1)
            if FLOAT:
                # ptq.quant.formats.MiniFloat.round: spacing 2^(e - MBITS) in the binade of |v|
                # (e read from the fp32 exponent bits, at least EMIN), ties to even, saturating.
                v = tl.math.div_rn(w, scale)
                a = tl.minimum(tl.abs(v), maxq)
                e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, EMIN)
                spacing = ((e - MBITS + 127) << 23).to(tl.float32, bitcast=True)
                q = rint(tl.math.div_rn(a, spacing)) * spacing
                q = tl.where(v < 0, -q, q)
            else:
                q = tl.minimum(tl.maximum(rint(tl.math.div_rn(w, scale)) + zero, 0.0), maxq)
            d = tl.load(Hinv + j * stride_h + j)
            err = tl.math.div_rn(w - scale * (q - zero), tl.zeros_like(w) + d)
            h = tl.load(Hinv + j * stride_h + c, mask=(c > j) & (c < ncols), other=0.0)
            tile = tile - err[:, None] * h[None, :]
            tl.store(Q + r * stride_q + j, q, mask=rmask)
            tl.store(Err + r * stride_e + j, err, mask=rmask)


BLOCK_R = 16


def lazy_block(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    codes: torch.Tensor,
    err: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    maxq: float,
    group: int,
    sym: bool,
    element=None,
) -> None:
    """Run the columns of one lazy block (views with unit column stride). ``group`` > 0: write the
    parameters of each ``group``-column group into ``scale``/``zero`` [rows, ncols // group];
    ``group`` == 0: read them per column from ``scale``/``zero`` [rows, ncols]. ``element``: the
    ``MiniFloat`` of a float format (then ``maxq`` is its largest value and ``group`` must be 0)."""
    rows, ncols = W1.shape
    for name, t in (("W1", W1), ("Hinv1", Hinv1), ("codes", codes), ("err", err), ("scale", scale), ("zero", zero)):
        assert t.stride(1) == 1 and t.dtype == torch.float32, (name, t.stride(), t.dtype)
    assert scale.stride(0) == zero.stride(0)
    grid = (triton.cdiv(rows, BLOCK_R),)
    _gptq_lazy_block[grid](
        W1, Hinv1, codes, err, scale, zero,
        rows, ncols,
        W1.stride(0), Hinv1.stride(0), codes.stride(0), err.stride(0), scale.stride(0),
        float(maxq),
        GROUP=group, SYM=sym, FLOAT=element is not None, MBITS=element.mbits if element else 0,
        EMIN=element.emin if element else 0, BLOCK_R=BLOCK_R, BLOCK_C=triton.next_power_of_2(ncols),
        num_warps=4,
    )  # fmt: skip
