"""NVFP4 weights (E2M1 nibbles, an E4M3 scale per 16 inputs, an fp32 global scale) x bf16 activations on mma.sync,
the decoded codes placed straight in the tensor cores' operand registers (Gluon). One of ``ptq.quant.kernels``' FP4
tiles (the ``MMA`` candidates, for one token and for a few), timed against the others per shape.

The K permutation is ``ptq.quant.int4_mma``'s: lane c of a quad takes, of each 64-input chunk, inputs 16c..16c + 15 of
its column, and its mma.sync register (u, j) holds codes j and j + 4 of the column's word 2c + u. Here a column's
words lie along K in memory (``pack_nibbles``: code i of a word at bits 4i..4i + 3), so a lane's two words are 8
contiguous bytes, and its 16 inputs are exactly one NVFP4 block: one scale per lane, column and chunk.

Decoding a pair (codes j and j + 4, at bits 4j and 4j + 16 of the word, so in the two 16-bit halves alike): a shift
and a mask move both codes' e1 e0 m to bits 8..6 of their half (a bf16's two low exponent bits and its first
mantissa bit), another shift moves both signs to bit 15, one LOP3 joins them. That bf16 is the E2M1 value times
2^-126 (e = 0: the subnormal m 2^-127; e > 0: 2^(e - 127) (1 + m/2)). One fma.bf16x2 multiplies it by the block
scale times 2^118: the product, the weight times 2^-8, is exact (two significant bits times the scale's four) and
normal for every E4M3 scale. So the tensor cores sum the scaled weights over the whole K in fp32, and the program
multiplies by 2^8 over the global scale once, at the end: no per-block work on the CUDA cores beyond the fma.
"""

from __future__ import annotations

import torch

from ptq.quant import int4_mma

gluon = int4_mma.gluon
if gluon is not None:
    import triton
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy

BLOCK = 16  # inputs per NVFP4 block scale: one lane's inputs of a chunk

if gluon is not None:
    # the block scales' factor (with the codes' 2^-126 the tensor cores see the weights times 2^-8), and its undoing
    SCALE_UP, SCALE_DOWN = gl.constexpr(2.0**118), gl.constexpr(2.0**8)
    # Per int32 word (given as its two int16 halves, pack=2): four bf16x2 pairs, pair j = (code j, code j + 4) times
    # the block scale ($5: its bf16 times 2^118 in both halves). Per pair: the magnitudes' shift and mask, the signs'
    # shift, (signs & 0x80008000) | magnitudes, the scale's fma.
    _DECODE = "\n".join(["{", ".reg .b32 m, s, r, nz;", "mov.b32 nz, 0x80008000;"] + [
        line for j in range(4) for line in (
            f"shl.b32 m, $4, {6 - 4 * j};" if j < 2 else f"shr.u32 m, $4, {4 * j - 6};",  # e1 e0 m to bits 8..6
            "and.b32 m, m, 0x01C001C0;",
            f"shl.b32 s, $4, {12 - 4 * j};" if j < 3 else "mov.b32 s, $4;",  # the signs to bit 15
            "lop3.b32 r, s, 0x80008000, m, 0xea;",
            f"fma.rn.bf16x2 ${j}, r, $5, nz;",
        )] + ["}"])  # fmt: skip
    DECODE = gl.constexpr(_DECODE)
    # the decoded chunk [t, w, q, c1, c0, u, e, j0, j1] (column (t, w, q), word 2c + u, code j + 4e) to
    # [K slot bits j1 j0 u c1 c0 e, output slot bits t w q]
    _B_ORDER = gl.constexpr((8, 7, 5, 3, 4, 6, 0, 1, 2))

    @gluon.jit
    def _chunk_product(words, scale, x, acc, COLS: gl.constexpr, WARPS: gl.constexpr,
                       WORD3_LAYOUT: gl.constexpr):  # fmt: skip
        """acc + x W^T over one 64-input chunk: words [BLOCK_N, 16] int16 (a column's 8 words, as halves), scale
        [BLOCK_N, 8, 1] int32 (each word's block scale in both bf16 halves), x [BLOCK_M, 64] in input order."""
        BLOCK_N: gl.constexpr = words.shape[0]
        words = gl.convert_layout(gl.reshape(words, [BLOCK_N, 8, 2]), WORD3_LAYOUT, assert_trivial=True)
        p0, p1, p2, p3 = gl.inline_asm_elementwise(DECODE, "=r,=r,=r,=r,r,r,r", [words, scale],
                                                   dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16),
                                                   is_pure=True, pack=2)  # fmt: skip
        b = gl.join(gl.join(p0, p1), gl.join(p2, p3))  # [column, word 2c + u, e, j0, j1]: code j + 4e
        b = gl.reshape(b, [COLS, WARPS, 8, 2, 2, 2, 2, 2, 2])  # [t, w, q, c1, c0, u, e, j0, j1]
        b = gl.reshape(gl.permute(b, _B_ORDER.value), [64, BLOCK_N])  # [K slot, output slot = column]
        return int4_mma.slot_product(b, x, acc)

    @gluon.jit
    def _block_scales(s_ptrs):
        """E4M3 block scales -> their bf16 times 2^118 in both halves of an int32 (exact: four significant bits,
        and 448 * 2^118 < 2^128)."""
        scale = (gl.load(s_ptrs).to(gl.float32) * SCALE_UP).to(gl.bfloat16)
        bits = scale.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        return gl.expand_dims(bits * 65537, 2)

    @gluon.jit
    def _fp4_mma_kernel(x_ptr, w_ptr, s_ptr, ts_ptr, y_ptr, ws_ptr, cnt_ptr, M,
                        N: gl.constexpr, K: gl.constexpr, STRIDE_X: gl.constexpr, STRIDE_Y: gl.constexpr,
                        STRIDE_W: gl.constexpr, STRIDE_S: gl.constexpr, SPLIT_K: gl.constexpr,
                        BLOCK_M: gl.constexpr, COLS: gl.constexpr, WARPS: gl.constexpr, UNROLL: gl.constexpr,
                        STAGES: gl.constexpr, WORD_LAYOUT: gl.constexpr, WORD3_LAYOUT: gl.constexpr,
                        X_LAYOUT: gl.constexpr, SMEM_LAYOUT: gl.constexpr):  # fmt: skip
        """y [M, N] = x [M, K] W^T for NVFP4 W: codes as int16 [N, K/4] (STRIDE_W per row), scales E4M3 [N, K/16]
        (STRIDE_S), the global scale at ts_ptr (W = E2M1 * E4M3 / global); program (column block, row block, K
        split). STAGES 1: loads straight into registers, UNROLL chunks' at a time; more: the words and activations
        through a ring of STAGES chunks in shared memory (cp.async), as in ``int4_mma``."""
        BLOCK_N: gl.constexpr = 8 * COLS * WARPS
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, WARPS], instr_shape=[16, 8])
        pid_n = gl.program_id(0)
        pid_m = gl.program_id(1)
        pid_k = gl.program_id(2)
        n0 = pid_n * BLOCK_N
        # a chunk's words [BLOCK_N, 16] int16: column n0 + n, halves of its words 0..7
        rn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, WORD_LAYOUT))
        rh = gl.arange(0, 16, layout=gl.SliceLayout(0, WORD_LAYOUT))
        w_ptrs = w_ptr + gl.expand_dims(rn, 1) * STRIDE_W + gl.expand_dims(rh, 0)
        # each word's block scale [BLOCK_N, 8]: word 2c + u lies in block c of the chunk
        scale_layout: gl.constexpr = gl.SliceLayout(2, WORD3_LAYOUT)
        sn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, scale_layout))
        sw = gl.arange(0, 8, layout=gl.SliceLayout(0, scale_layout))
        s_ptrs = s_ptr + gl.expand_dims(sn, 1) * STRIDE_S + gl.expand_dims(sw // 2, 0)
        # a chunk's activations in input order; rows past M read row M - 1 (their outputs are not stored)
        xm = gl.minimum(pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, X_LAYOUT)), M - 1)
        xk = gl.arange(0, 64, layout=gl.SliceLayout(0, X_LAYOUT))
        x_ptrs = x_ptr + gl.expand_dims(xm, 1) * STRIDE_X + gl.expand_dims(xk, 0)
        CHUNKS: gl.constexpr = K // 64 // SPLIT_K
        first = pid_k * CHUNKS
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)
        if STAGES == 1:
            for g in range(first, first + CHUNKS, UNROLL):
                for i in gl.static_range(UNROLL):  # one basic block: ptxas issues all its loads before the products
                    words = gl.load(w_ptrs + (g + i) * 16)
                    scale = _block_scales(s_ptrs + (g + i) * 4)
                    x = gl.load(x_ptrs + (g + i) * 64)
                    acc = _chunk_product(words, scale, x, acc, COLS, WARPS, WORD3_LAYOUT)
        else:
            # STAGES - 1 chunks of words and activations in flight through shared memory; block scales one chunk
            # ahead in registers
            w_smem = gl.allocate_shared_memory(gl.int16, [STAGES, BLOCK_N, 16], SMEM_LAYOUT)
            x_smem = gl.allocate_shared_memory(x_ptr.dtype.element_ty, [STAGES, BLOCK_M, 64], SMEM_LAYOUT)
            xc_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])  # 16 bytes per copy
            xcm = gl.minimum(pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, xc_layout)), M - 1)
            xck = gl.arange(0, 64, layout=gl.SliceLayout(0, xc_layout))
            xc_ptrs = x_ptr + gl.expand_dims(xcm, 1) * STRIDE_X + gl.expand_dims(xck, 0)
            last = first + CHUNKS - 1
            for i in gl.static_range(STAGES - 1):
                g = gl.minimum(first + i, last)
                async_copy.async_copy_global_to_shared(w_smem.index(i), w_ptrs + g * 16)
                async_copy.async_copy_global_to_shared(x_smem.index(i), xc_ptrs + g * 64)
                async_copy.commit_group()
            scale = _block_scales(s_ptrs + first * 4)
            for g in range(first, last + 1):
                stage = (g - first) % STAGES
                async_copy.wait_group(STAGES - 2)  # this thread's copies of chunk g are done
                gl.thread_barrier()  # everyone's are, and everyone has read the stage refilled next
                refill = gl.minimum(g + STAGES - 1, last)  # past the end: a copy nobody reads, for even counts
                after = (stage + STAGES - 1) % STAGES
                async_copy.async_copy_global_to_shared(w_smem.index(after), w_ptrs + refill * 16)
                async_copy.async_copy_global_to_shared(x_smem.index(after), xc_ptrs + refill * 64)
                async_copy.commit_group()
                words = w_smem.index(stage).load(WORD_LAYOUT)
                x = x_smem.index(stage).load(X_LAYOUT)
                scale_next = _block_scales(s_ptrs + gl.minimum(g + 1, last) * 4)
                acc = _chunk_product(words, scale, x, acc, COLS, WARPS, WORD3_LAYOUT)
                scale = scale_next
            async_copy.wait_group(0)
        total = acc * (SCALE_DOWN / gl.load(ts_ptr))
        out_cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
        int4_mma.store_tile(total, y_ptr, ws_ptr, cnt_ptr, out_cols, M, N, STRIDE_Y, SPLIT_K, BLOCK_M)


def word_layout(warps: int, cols: int):
    """A chunk's words [BLOCK_N, 16] int16 (a column's 8 words as 16 halves): lane (c, q) of warp w holds halves
    4c..4c + 3 (words 2c, 2c + 1: 8 contiguous bytes) of columns q + 8 w + 8 WARPS t, t < COLS."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2]] + [[8 * warps * 2**i, 0] for i in range(int4_mma._bits(cols))],
        lane_bases=[[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[8 * 2**i, 0] for i in range(int4_mma._bits(warps))],
        block_bases=[],
        shape=[8 * cols * warps, 16],
    )


def word3_layout(warps: int, cols: int):
    """The same words seen as [BLOCK_N columns, 8 words, 2 halves]."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 1, 0]] + [[8 * warps * 2**i, 0, 0] for i in range(int4_mma._bits(cols))],
        lane_bases=[[0, 2, 0], [0, 4, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[8 * 2**i, 0, 0] for i in range(int4_mma._bits(warps))],
        block_bases=[],
        shape=[8 * cols * warps, 8, 2],
    )


def applies(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, n: int, k: int, group: int, nvfp4: bool,
            cols: int, warps: int, chunks: int) -> bool:  # fmt: skip
    """Whether the kernel computes this product: NVFP4 (E4M3 scales per 16 inputs) with bf16 activations, K in
    whole ``chunks`` x 64 inputs (split-K x the chunks a loop step loads), whole column blocks, codes rows of whole
    8-byte runs."""
    return (gluon is not None and x.is_cuda and x.dtype == torch.bfloat16 and nvfp4 and group == BLOCK
            and k % (64 * chunks) == 0 and n % (8 * cols * warps) == 0
            and codes.stride(-1) == 1 and codes.stride(0) % 8 == 0 and codes.data_ptr() % 16 == 0
            and scale.stride(-1) == 1)  # fmt: skip


def fp4_mma(x, codes, scale, tensor_scale, cols: int, warps: int, unroll: int, split_k: int, counters: torch.Tensor,
            stages: int = 1):  # fmt: skip
    """y = x W^T for NVFP4 W (``codes`` [N, K/2] bytes, ``scale`` E4M3 [N, K/16], ``tensor_scale`` fp32 [1]);
    ``applies`` must hold with ``split_k`` x ``unroll`` (the tuner offers only such tiles). ``unroll``: the 64-input
    chunks whose loads a loop step issues together; ``counters``: zeroed int32, one per output tile; ``stages``: 1,
    or the chunks in the shared-memory ring (then ``unroll`` is 1)."""
    m, k = x.shape
    n = codes.shape[0]
    block_m = 16 if m <= 16 else 32
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    workspace = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if split_k > 1 else y
    grid = (n // (8 * cols * warps), triton.cdiv(m, block_m), split_k)
    halves = codes.view(torch.int16)
    _fp4_mma_kernel[grid](x, halves, scale, tensor_scale, y, workspace, counters, m, N=n, K=k, STRIDE_X=x.stride(0),
                          STRIDE_Y=y.stride(0), STRIDE_W=halves.stride(0), STRIDE_S=scale.stride(0), SPLIT_K=split_k,
                          BLOCK_M=block_m, COLS=cols, WARPS=warps, UNROLL=unroll, STAGES=stages,
                          WORD_LAYOUT=word_layout(warps, cols), WORD3_LAYOUT=word3_layout(warps, cols),
                          X_LAYOUT=int4_mma.x_layout(warps, block_m, 1), SMEM_LAYOUT=int4_mma.SMEM_LAYOUT,
                          num_warps=warps)  # fmt: skip
    return y
