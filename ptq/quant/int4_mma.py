"""INT4 (GPTQ layout) x bf16/fp16 for a few rows on mma.sync, the decoded codes placed straight in the tensor cores'
operand registers (Gluon: Triton with explicit layouts). One of ``ptq.quant.kernels``' few-token INT4 tiles (the
``MMA`` candidates), timed against the others per shape.

Why: a Triton ``tl.dot`` wants its weight tile in the MMA's operand layout, so the decoded codes of a packed word
go through shared memory to get there (ptq's NIBBLE and SWAP tiles), several instructions per weight. Here the
layouts are chosen so that no data moves. In mma.sync m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16")
lane l holds, of a 16 x 8 B tile, column l / 4 and the K rows 2c, 2c + 1, 2c + 8, 2c + 9 (c = l % 4), two per
32-bit register. The product sums over K, so any permutation of K applied to both operands gives the same sums:
K slot s = e + 2c + 8u + 16j of a 64-input chunk (e: the element within a 32-bit register, c: the lane within its
quad, u: which of the lane's two registers per 16 K, j: the 16-K step) is given input 16c + 8u + 4e + j. Then
lane c's slots are exactly the 16 codes of GPTQ word rows 2c and 2c + 1 of its column (each word holds 8
consecutive inputs), and its register for (u, j) pairs codes j and j + 4 of word row 2c + u: one shift and one LOP3
put both nibbles into the mantissas of a bf16x2 128.0 (128 + q exactly), one fma.bf16x2 subtracts 128 + zero
(exact: small integers). The activations take the same permutation; a lane's slots are the 16 contiguous inputs
16c..16c + 15, so they load as vectors and the permutation is a renaming of registers. Output columns are permuted
too (slot v holds column t + COLS q + 8 COLS w), so each lane's words are COLS contiguous int32 (one vector load
per word row). Every reshape/permute below only renames registers: ``convert_layout(..., assert_trivial=True)``
makes the compiler prove it.

Sums are fp32 per group of 128 (or 64) inputs, scaled once per group by the fp16 scale: exact up to the tensor
cores' fp32 accumulation, like the other INT4 tiles.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
except ImportError:  # CPU-only installs, or a Triton without Gluon: the other tiles only
    gluon = None

GROUPS = (64, 128)  # group sizes the kernel holds (a group is one or two 64-input chunks)
# The renamings (tests/test_mma_layouts.py checks them on the CPU): a chunk's decoded words, as
# [c1, c0, u, w, q, t, e, j0, j1] (word row 2c + u, column (8w + q) COLS + t, code j + 4e), permuted to
# [K slot bits j1 j0 u c1 c0 e, output slot bits t w q]; its activations [m, c1, c0, u, e, j1, j0] (input
# 16c + 8u + 4e + j) permuted to [m, K slot bits].
B_ORDER = (8, 7, 2, 0, 1, 6, 5, 3, 4)
A_ORDER = (0, 5, 6, 3, 1, 2, 4)

if gluon is not None:
    # Per int32 word (given as its two int16 halves, pack=2): four 32-bit pairs, pair j = (code j, code j + 4)
    # minus the zero point. $5 holds -(MAGIC + zero) in both halves.
    _DECODE = """{{
    .reg .b32 t, one;
    mov.b32 one, {one};
    lop3.b32 t, $4, 0x000F000F, {magic}, 0xea;
    fma.rn.{kind} $0, t, one, $5;
    shr.u32 t, $4, 4;
    lop3.b32 t, t, 0x000F000F, {magic}, 0xea;
    fma.rn.{kind} $1, t, one, $5;
    shr.u32 t, $4, 8;
    lop3.b32 t, t, 0x000F000F, {magic}, 0xea;
    fma.rn.{kind} $2, t, one, $5;
    shr.u32 t, $4, 12;
    lop3.b32 t, t, 0x000F000F, {magic}, 0xea;
    fma.rn.{kind} $3, t, one, $5;
    }}"""
    # bf16: 128 + q has the exponent of 128 (0x43) and q in the low mantissa bits; fp16 the same with 1024 (0x64)
    MAGIC_BF16, MAGIC_F16 = gl.constexpr(0x4300), gl.constexpr(0x6400)
    DECODE_BF16 = gl.constexpr(_DECODE.format(one="0x3F803F80", magic=hex(MAGIC_BF16.value * 65537), kind="bf16x2"))
    DECODE_F16 = gl.constexpr(_DECODE.format(one="0x3C003C00", magic=hex(MAGIC_F16.value * 65537), kind="f16x2"))
    _B_ORDER = gl.constexpr(B_ORDER)
    _A_ORDER = gl.constexpr(A_ORDER)

    @gluon.constexpr_function
    def _log2(n):
        return int(math.log2(n))

    @gluon.jit
    def _chunk_product(words, x, neg_zero, acc, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, COLS: gl.constexpr,
                       WARPS: gl.constexpr, WORD3_LAYOUT: gl.constexpr):  # fmt: skip
        """acc + x W^T over one 64-input chunk: words [8, 2 BLOCK_N] int16, x [BLOCK_M, 64] in input order."""
        words = gl.convert_layout(gl.reshape(words, [8, BLOCK_N, 2]), WORD3_LAYOUT, assert_trivial=True)
        decode: gl.constexpr = DECODE_BF16 if x.dtype == gl.bfloat16 else DECODE_F16
        p0, p1, p2, p3 = gl.inline_asm_elementwise(decode, "=r,=r,=r,=r,r,r,r", [words, neg_zero],
                                                   dtype=(x.dtype, x.dtype, x.dtype, x.dtype), is_pure=True,
                                                   pack=2)  # fmt: skip
        b = gl.join(gl.join(p0, p1), gl.join(p2, p3))  # [word row 2c + u, column, e, j0, j1]: code j + 4e
        b = gl.reshape(b, [2, 2, 2, WARPS, 8, COLS, 2, 2, 2])  # [c1, c0, u, w, q, t, e, j0, j1]
        b = gl.reshape(gl.permute(b, _B_ORDER.value), [64, BLOCK_N])  # [K slot, output slot]
        return slot_product(b, x, acc)

    @gluon.jit
    def slot_product(b, x, acc):
        """acc + x W^T over one 64-input chunk, given W's decoded codes ``b`` [K slot, output slot] in the slot order
        of the module's docstring and x [BLOCK_M, 64] in input order, which takes the same permutation of K."""
        mma: gl.constexpr = acc.type.layout
        BLOCK_M: gl.constexpr = x.shape[0]
        b = gl.convert_layout(b, gl.DotOperandLayout(1, mma, 2), assert_trivial=True)
        a = gl.reshape(x, [BLOCK_M, 2, 2, 2, 2, 2, 2])  # [m, c1, c0, u, e, j1, j0]: input 16c + 8u + 4e + j
        a = gl.reshape(gl.permute(a, _A_ORDER.value), [BLOCK_M, 64])  # [m, K slot]
        a = gl.convert_layout(a, gl.DotOperandLayout(0, mma, 2), assert_trivial=True)
        return mma_v2(a, b, acc)

    @gluon.jit
    def _group_product(words, x, zw, cols, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, COLS: gl.constexpr,
                       WARPS: gl.constexpr, GROUP: gl.constexpr, WORD3_LAYOUT: gl.constexpr,
                       MMA_LAYOUT: gl.constexpr):  # fmt: skip
        """x W^T over one group (one or two 64-input chunks), fp32, before its scale; zw: the group's qzeros words
        of ``cols``."""
        zero = (((zw >> ((cols % 8) * 4)) & 15) + 1) & 15  # stored minus one (ptq.quant.pack)
        magic: gl.constexpr = MAGIC_BF16 if x.dtype == gl.bfloat16 else MAGIC_F16
        # -(MAGIC + zero) in both halves: the sign bit over the magic's bits plus the zero point
        neg_zero = gl.expand_dims(gl.expand_dims((zero + (magic | 0x8000)) * 65537, 0), 2)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=MMA_LAYOUT)
        if GROUP == 64:
            acc = _chunk_product(words, x, neg_zero, acc, BLOCK_M, BLOCK_N, COLS, WARPS, WORD3_LAYOUT)
        else:
            w0, w1 = gl.split(gl.permute(gl.reshape(words, [2, 8, 2 * BLOCK_N]), [1, 2, 0]))
            x0, x1 = gl.split(gl.permute(gl.reshape(x, [BLOCK_M, 2, 64]), [0, 2, 1]))
            acc = _chunk_product(w0, x0, neg_zero, acc, BLOCK_M, BLOCK_N, COLS, WARPS, WORD3_LAYOUT)
            acc = _chunk_product(w1, x1, neg_zero, acc, BLOCK_M, BLOCK_N, COLS, WARPS, WORD3_LAYOUT)
        return acc

    @gluon.jit
    def _int4_mma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, M,
                         N: gl.constexpr, K: gl.constexpr, STRIDE_X: gl.constexpr, STRIDE_Y: gl.constexpr,
                         GROUP: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr,
                         COLS: gl.constexpr, WARPS: gl.constexpr, WORD_LAYOUT: gl.constexpr,
                         WORD3_LAYOUT: gl.constexpr, X_LAYOUT: gl.constexpr,
                         SMEM_LAYOUT: gl.constexpr):  # fmt: skip
        """y [M, N] = x [M, K] W^T for W in the GPTQ layout (qweight seen as int16 [K/8, 2N], scales [K/GROUP, N],
        qzeros [K/GROUP, N/8]); program (column block, row block, K split). N, K and the strides are compile-time
        constants, so every address is a register plus an immediate. STAGES 1: each group's loads straight into
        registers (ptxas places them near their uses: a memory latency or more per group); more: a cp.async ring."""
        BLOCK_N: gl.constexpr = 8 * COLS * WARPS
        CHUNKS: gl.constexpr = GROUP // 64
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, WARPS], instr_shape=[16, 8])
        pid_n = gl.program_id(0)
        pid_m = gl.program_id(1)
        pid_k = gl.program_id(2)
        n0 = pid_n * BLOCK_N
        # a group's words: [8 CHUNKS, 2 BLOCK_N] int16
        rows = gl.arange(0, 8 * CHUNKS, layout=gl.SliceLayout(1, WORD_LAYOUT))
        halves = 2 * n0 + gl.arange(0, 2 * BLOCK_N, layout=gl.SliceLayout(0, WORD_LAYOUT))
        w_ptrs = w_ptr + gl.expand_dims(rows, 1) * (2 * N) + gl.expand_dims(halves, 0)
        cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, gl.SliceLayout(2, WORD3_LAYOUT)))
        z_ptrs = z_ptr + cols // 8
        # a group's activations in input order (STAGES 1); rows past M read row M - 1 (their outputs are not stored)
        xm = gl.minimum(pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, X_LAYOUT)), M - 1)
        xk = gl.arange(0, GROUP, layout=gl.SliceLayout(0, X_LAYOUT))
        x_ptrs = x_ptr + gl.expand_dims(xm, 1) * STRIDE_X + gl.expand_dims(xk, 0)
        # output slot v = q + 8 w + 8 WARPS t holds column t + COLS q + 8 COLS w
        v = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
        out_cols = n0 + (v >> _log2(8 * WARPS)) + COLS * (v & 7) + 8 * COLS * ((v >> 3) & (WARPS - 1))
        s_ptrs = s_ptr + out_cols
        W_STEP: gl.constexpr = 16 * CHUNKS * N  # int16 elements per group of words
        total = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)
        GROUPS_PER_SPLIT: gl.constexpr = K // GROUP // SPLIT_K
        first = pid_k * GROUPS_PER_SPLIT
        last = first + GROUPS_PER_SPLIT - 1
        if STAGES == 1:
            for g in range(first, last + 1):
                words = gl.load(w_ptrs + g * W_STEP)
                x = gl.load(x_ptrs + g * GROUP)
                zw = gl.load(z_ptrs + g * (N // 8))
                scale = gl.load(s_ptrs + g * N)
                acc = _group_product(words, x, zw, cols, BLOCK_M, BLOCK_N, COLS, WARPS, GROUP, WORD3_LAYOUT, mma)
                total += acc * gl.expand_dims(scale.to(gl.float32), 0)
        else:
            # words and activations through a ring of STAGES groups in shared memory (cp.async, STAGES - 1 groups
            # in flight); zero points two groups ahead and scales one group ahead in registers
            w_smem = gl.allocate_shared_memory(gl.int16, [STAGES, 8 * CHUNKS, 2 * BLOCK_N], SMEM_LAYOUT)
            x_smem = gl.allocate_shared_memory(x_ptr.dtype.element_ty, [STAGES, BLOCK_M, GROUP], SMEM_LAYOUT)
            xc_layout: gl.constexpr = gl.BlockedLayout([1, 8], [256 // GROUP, GROUP // 8], [WARPS, 1], [1, 0])
            xcm = gl.minimum(pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, xc_layout)), M - 1)
            xck = gl.arange(0, GROUP, layout=gl.SliceLayout(0, xc_layout))
            xc_ptrs = x_ptr + gl.expand_dims(xcm, 1) * STRIDE_X + gl.expand_dims(xck, 0)
            for i in gl.static_range(STAGES - 1):
                g = gl.minimum(first + i, last)
                async_copy.async_copy_global_to_shared(w_smem.index(i), w_ptrs + g * W_STEP)
                async_copy.async_copy_global_to_shared(x_smem.index(i), xc_ptrs + g * GROUP)
                async_copy.commit_group()
            zw = gl.load(z_ptrs + first * (N // 8))
            zw_next = gl.load(z_ptrs + gl.minimum(first + 1, last) * (N // 8))
            scale = gl.load(s_ptrs + first * N)
            for g in range(first, last + 1):
                stage = (g - first) % STAGES
                async_copy.wait_group(STAGES - 2)  # this thread's copies of group g are done
                gl.thread_barrier()  # everyone's are, and everyone has read the stage refilled next
                refill = gl.minimum(g + STAGES - 1, last)  # past the end: a copy nobody reads, for even counts
                async_copy.async_copy_global_to_shared(w_smem.index((stage + STAGES - 1) % STAGES),
                                                       w_ptrs + refill * W_STEP)  # fmt: skip
                async_copy.async_copy_global_to_shared(x_smem.index((stage + STAGES - 1) % STAGES),
                                                       xc_ptrs + refill * GROUP)  # fmt: skip
                async_copy.commit_group()
                words = w_smem.index(stage).load(WORD_LAYOUT)
                x = x_smem.index(stage).load(X_LAYOUT)
                zw_after = gl.load(z_ptrs + gl.minimum(g + 2, last) * (N // 8))
                scale_next = gl.load(s_ptrs + gl.minimum(g + 1, last) * N)
                acc = _group_product(words, x, zw, cols, BLOCK_M, BLOCK_N, COLS, WARPS, GROUP, WORD3_LAYOUT, mma)
                total += acc * gl.expand_dims(scale.to(gl.float32), 0)
                zw, zw_next, scale = zw_next, zw_after, scale_next
            async_copy.wait_group(0)
        store_tile(total, y_ptr, ws_ptr, cnt_ptr, out_cols, M, N, STRIDE_Y, SPLIT_K, BLOCK_M)

    @gluon.jit
    def store_tile(total, y_ptr, ws_ptr, cnt_ptr, out_cols, M, N: gl.constexpr, STRIDE_Y: gl.constexpr,
                   SPLIT_K: gl.constexpr, BLOCK_M: gl.constexpr):  # fmt: skip
        """Write a program's [BLOCK_M, BLOCK_N] fp32 sums (``total``, MMA layout) to output columns ``out_cols`` of
        its row block: with SPLIT_K > 1 by kernels._write_output's scheme (partials to the workspace, the tile's
        last program adds them and resets its counter)."""
        mma: gl.constexpr = total.type.layout
        pid_n = gl.program_id(0)
        pid_m = gl.program_id(1)
        pid_k = gl.program_id(2)
        ym = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
        y_offs = gl.expand_dims(ym, 1) * STRIDE_Y + gl.expand_dims(out_cols, 0)
        y_mask = gl.expand_dims(ym < M, 1) & (y_offs >= 0)
        if SPLIT_K == 1:
            gl.store(y_ptr + y_offs, total.to(y_ptr.dtype.element_ty), mask=y_mask)
        else:
            part = gl.expand_dims(ym, 1) * N + gl.expand_dims(out_cols, 0)
            gl.store(ws_ptr + pid_k * M * N + part, total, mask=y_mask)
            gl.thread_barrier()  # every thread's partial is written before the count
            tile = pid_m * gl.num_programs(0) + pid_n
            arrived = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                total = gl.zeros_like(total)
                for s in range(SPLIT_K):
                    total += gl.load(ws_ptr + s * M * N + part, mask=y_mask, other=0.0, cache_modifier=".cg")
                gl.store(y_ptr + y_offs, total.to(y_ptr.dtype.element_ty), mask=y_mask)
                gl.atomic_xchg(cnt_ptr + tile, 0)


SMEM_LAYOUT = gl.SwizzledSharedLayout(1, 1, 1, [1, 0]) if gluon is not None else None  # a stage, unswizzled


def _bits(n: int) -> int:
    return int(math.log2(n))


def word_layout(warps: int, cols: int, chunks: int):
    """A group's words [8 chunks, 2 BLOCK_N] int16 (a word's halves side by side): lane (c, q) of warp w holds
    word rows 2c, 2c + 1 of each chunk for the COLS contiguous words from column (8 w + q) COLS."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 2**i] for i in range(_bits(2 * cols))] + [[1, 0]]
        + [[8 * 2**i, 0] for i in range(_bits(chunks))],
        lane_bases=[[2, 0], [4, 0], [0, 2 * cols], [0, 4 * cols], [0, 8 * cols]],
        warp_bases=[[0, 16 * cols * 2**i] for i in range(_bits(warps))],
        block_bases=[],
        shape=[8 * chunks, 16 * cols * warps],
    )  # fmt: skip


def word3_layout(warps: int, cols: int):
    """One chunk's words seen as [8 word rows, BLOCK_N columns, 2 halves]."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1]] + [[0, 2**i, 0] for i in range(_bits(cols))] + [[1, 0, 0]],
        lane_bases=[[2, 0, 0], [4, 0, 0], [0, cols, 0], [0, 2 * cols, 0], [0, 4 * cols, 0]],
        warp_bases=[[0, 8 * cols * 2**i, 0] for i in range(_bits(warps))],
        block_bases=[],
        shape=[8, 8 * cols * warps, 2],
    )


def x_layout(warps: int, block_m: int, chunks: int):
    """A group's activations [BLOCK_M, 64 chunks] in input order: lane (c, q) holds inputs 16c..16c + 15 of each
    chunk for rows q, q + 8, ...; every warp holds the same."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8]] + [[8 * 2**i, 0] for i in range(_bits(block_m // 8))]
        + [[0, 64 * 2**i] for i in range(_bits(chunks))],
        lane_bases=[[0, 16], [0, 32], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[0, 0]] * _bits(warps),
        block_bases=[],
        shape=[block_m, 64 * chunks],
    )  # fmt: skip


def applies(x: torch.Tensor, n: int, k: int, group: int, cols: int, warps: int, split_k: int) -> bool:
    """Whether the kernel computes this product: bf16 or fp16 activations, whole groups of 64 or 128 inputs
    in whole splits, whole column blocks."""
    return (gluon is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and group in GROUPS
            and k % group == 0 and (k // group) % split_k == 0 and n % (8 * cols * warps) == 0)  # fmt: skip


def int4_mma(x, qweight, scales, qzeros, group: int, cols: int, warps: int, split_k: int, stages: int,
             counters: torch.Tensor):  # fmt: skip
    """y = x W^T for the GPTQ-packed W; ``applies`` must hold (the tuner offers only such tiles). ``stages``: 1
    (loads into registers) or the groups in the shared-memory ring; ``counters``: zeroed int32, one per output
    tile."""
    m, k = x.shape
    n = qweight.shape[1]
    block_m = 16 if m <= 16 else 32
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    workspace = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if split_k > 1 else y
    grid = (n // (8 * cols * warps), triton.cdiv(m, block_m), split_k)
    chunks = group // 64
    _int4_mma_kernel[grid](x, qweight.view(torch.int16), scales, qzeros, y, workspace, counters, m, N=n, K=k,
                           STRIDE_X=x.stride(0), STRIDE_Y=y.stride(0), GROUP=group, SPLIT_K=split_k, STAGES=stages,
                           BLOCK_M=block_m, COLS=cols, WARPS=warps, WORD_LAYOUT=word_layout(warps, cols, chunks),
                           WORD3_LAYOUT=word3_layout(warps, cols), X_LAYOUT=x_layout(warps, block_m, chunks),
                           SMEM_LAYOUT=SMEM_LAYOUT,
                           num_warps=warps)  # fmt: skip
    return y
