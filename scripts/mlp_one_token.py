"""Prototype (not used by the package): one token through a Llama MLP with W4A16 GPTQ weights in ONE launch.

y = down(silu(gate(x)) * up(x)). Program p owns the intermediate slice [p B, (p + 1) B): it computes gate and up for
those columns over the full K (no split: SiLU needs whole sums), rounds as the model does (bf16 outputs, bf16 SiLU,
bf16 product), multiplies the slice by its B rows of down (the K rows p B .. of down's GPTQ words) for every output
column, and adds that partial output to an fp32 buffer with atomics; the last program to arrive casts the buffer to
the output dtype and zeroes it for the next call. No grid-wide barrier, so no co-residency is needed.

    TRITON_INTERPRET=1 python scripts/mlp_one_token.py     # correctness, small shapes, CPU
    python scripts/mlp_one_token.py --bench                 # GPU: against the three-launch path
"""

import argparse

import torch
import triton
import triton.language as tl

from ptq.bench.infer import make_layer
from ptq.quant import kernels as K


@triton.jit
def _round(v, BF16: tl.constexpr):
    """v rounded to bf16 where the model computes in bf16 (fp32 models: v)."""
    if BF16:
        v = v.to(tl.bfloat16).to(tl.float32)
    return v


@triton.jit
def _mlp_kernel(x_ptr, gu_ptr, gu_s_ptr, gu_z_ptr, d_ptr, d_s_ptr, d_z_ptr, y_ptr, acc_ptr, cnt_ptr,
                K_IN: tl.constexpr, INTER: tl.constexpr, N_OUT: tl.constexpr, GROUP: tl.constexpr,
                B: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
                BF16: tl.constexpr):  # fmt: skip
    p = tl.program_id(0)
    cols = p * B + tl.arange(0, B)  # gate columns; up's are INTER further
    gate = tl.zeros([B], dtype=tl.float32)
    up = tl.zeros([B], dtype=tl.float32)
    # phase 1: gate and up over the full K, a group's words at a time (ROWS words of 8 inputs, one group)
    for t in tl.range(0, K_IN // (8 * ROWS), num_stages=STAGES):
        rw = t * ROWS + tl.arange(0, ROWS)
        x = tl.load(x_ptr + rw[:, None] * 8 + tl.arange(0, 8)[None, :]).to(tl.float32)
        columns = K._columns_of_eight(x)
        words_g = tl.load(gu_ptr + rw[:, None] * (2 * INTER) + cols[None, :])
        words_u = tl.load(gu_ptr + rw[:, None] * (2 * INTER) + INTER + cols[None, :])
        dots_g = tl.zeros([ROWS, B], dtype=tl.float32)
        dots_u = tl.zeros([ROWS, B], dtype=tl.float32)
        upper_g = words_g >> 12
        upper_u = words_u >> 12
        for j in tl.static_range(8):  # as kernels._int4_gemv_kernel: the nibble in place is q 2^(p - 149)
            xj = columns[j] * 2.0 ** (100 - 4 * j + 12 * (j // 5))
            dots_g += ((words_g if j < 5 else upper_g) & (15 << (4 * j - 12 * (j // 5)))).to(
                tl.float32, bitcast=True
            ) * xj[:, None]
            dots_u += ((words_u if j < 5 else upper_u) & (15 << (4 * j - 12 * (j // 5)))).to(
                tl.float32, bitcast=True
            ) * xj[:, None]
        g = t * ROWS * 8 // GROUP
        x_sum = tl.sum(tl.sum(x, axis=1), axis=0)
        s_g = tl.load(gu_s_ptr + g * (2 * INTER) + cols).to(tl.float32)
        s_u = tl.load(gu_s_ptr + g * (2 * INTER) + INTER + cols).to(tl.float32)
        z_g = K._gptq_zeros(gu_z_ptr, g, cols, 2 * INTER, cols >= 0).to(tl.float32)
        z_u = K._gptq_zeros(gu_z_ptr, g, INTER + cols, 2 * INTER, cols >= 0).to(tl.float32)
        gate += s_g * (tl.sum(dots_g, axis=0) * (2.0**49) - z_g * x_sum)
        up += s_u * (tl.sum(dots_u, axis=0) * (2.0**49) - z_u * x_sum)
    # as the model rounds: bf16 projections, bf16 SiLU, bf16 product
    gate = _round(gate, BF16)
    h = _round(_round(gate / (1.0 + tl.exp(-gate)), BF16) * _round(up, BF16), BF16)
    # phase 2: h [B] times down's K rows p B .. (B / 8 words per column), every output column
    WR: tl.constexpr = B // 8
    hw = tl.reshape(h, [WR, 8])  # h of word row r, code j: input p B + 8 r + j
    hcols = K._columns_of_eight(hw)
    h_sum = tl.sum(h, axis=0)
    gd = p * B // GROUP
    rw = p * WR + tl.arange(0, WR)
    for n0 in tl.range(0, N_OUT, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        words = tl.load(d_ptr + rw[:, None] * N_OUT + rn[None, :])
        upper = words >> 12
        dots = tl.zeros([WR, BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(8):
            hj = hcols[j] * 2.0 ** (100 - 4 * j + 12 * (j // 5))
            dots += ((words if j < 5 else upper) & (15 << (4 * j - 12 * (j // 5)))).to(tl.float32, bitcast=True) * hj[
                :, None
            ]
        s_d = tl.load(d_s_ptr + gd * N_OUT + rn).to(tl.float32)
        z_d = K._gptq_zeros(d_z_ptr, gd, rn, N_OUT, rn >= 0).to(tl.float32)
        part = s_d * (tl.sum(dots, axis=0) * (2.0**49) - z_d * h_sum)
        tl.atomic_add(acc_ptr + rn, part, sem="relaxed")
    tl.debug_barrier()  # every thread's adds issued before the count
    arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    if arrived == INTER // B - 1:
        for n0 in tl.range(0, N_OUT, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            total = tl.load(acc_ptr + rn, cache_modifier=".cg")
            tl.store(y_ptr + rn, total.to(y_ptr.dtype.element_ty))
            tl.store(acc_ptr + rn, tl.zeros([BLOCK_N], dtype=tl.float32))
        tl.atomic_xchg(cnt_ptr, 0)


def mlp_one_token(x, gate_up, down, acc, counter, b=64, rows=16, block_n=1024, stages=1, warps=4):
    """x [1, K] through QuantLinear gate_up [2I, K] (gate then up) and down [N, I], both groups of 128."""
    k = x.shape[1]
    inter = gate_up.qweight.shape[1] // 2
    n = down.qweight.shape[1]
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _mlp_kernel[(inter // b,)](x, gate_up.qweight, gate_up.scales, gate_up.qzeros, down.qweight, down.scales,
                               down.qzeros, y, acc, counter, K_IN=k, INTER=inter, N_OUT=n, GROUP=128, B=b,
                               ROWS=rows, BLOCK_N=min(block_n, n), STAGES=stages, BF16=x.dtype == torch.bfloat16,
                               num_warps=warps)  # fmt: skip
    return y


def reference(x, gate_up, down):
    inter = gate_up.qweight.shape[1] // 2
    gu = gate_up(x)
    return down(torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:])


def check(k=512, inter=512, n=256, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    gate_up = make_layer("w4a16", torch.randn(2 * inter, k, dtype=dtype, device=device) * 0.05)
    down = make_layer("w4a16", torch.randn(n, inter, dtype=dtype, device=device) * 0.05)
    x = torch.randn(1, k, dtype=dtype, device=device)
    acc = torch.zeros(n, dtype=torch.float32, device=device)
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    want = reference(x, gate_up, down).float()
    for _ in range(2):  # the second call checks the buffer and counter were reset
        got = mlp_one_token(x, gate_up, down, acc, counter, block_n=128).float()
        err = ((got - want).norm() / want.norm()).item()
        print(f"k={k} inter={inter} n={n} {dtype}: relative error {err:.2e}")
        assert err < (2e-2 if dtype == torch.bfloat16 else 1e-5), err
    assert counter.item() == 0 and acc.abs().max().item() == 0


def bench():
    torch.manual_seed(0)
    k, inter, n = 4096, 14336, 4096
    dev, dt = "cuda", torch.bfloat16
    copies = []
    for _ in range(2):  # 88 MB each: two pass the L2
        copies.append((make_layer("w4a16", torch.randn(2 * inter, k, dtype=dt, device=dev) * 0.02),
                       make_layer("w4a16", torch.randn(n, inter, dtype=dt, device=dev) * 0.02)))  # fmt: skip
    x = torch.randn(1, k, dtype=dt, device=dev)
    acc = torch.zeros(n, dtype=torch.float32, device=dev)
    counter = torch.zeros(1, dtype=torch.int32, device=dev)
    want = reference(x, *copies[0]).float()
    for gu, d in copies:
        reference(x, gu, d)  # tunes ptq's tiles
    t3 = triton.testing.do_bench_cudagraph(lambda: [reference(x, gu, d) for gu, d in copies], rep=50) / len(copies)
    print(f"three launches (gate_up, silu*up, down): {t3 * 1e3:.1f} us")
    for b, rows, block_n, stages, warps in [(64, 16, 1024, 1, 4), (64, 16, 512, 1, 4), (64, 8, 1024, 1, 4),
                                           (32, 16, 1024, 1, 4), (64, 16, 1024, 3, 4), (128, 16, 1024, 1, 8),
                                           (64, 32, 1024, 1, 4), (32, 32, 512, 1, 2)]:  # fmt: skip
        try:
            got = mlp_one_token(x, *copies[0], acc, counter, b, rows, block_n, stages, warps).float()
            err = ((got - want).norm() / want.norm()).item()
            t1 = triton.testing.do_bench_cudagraph(
                lambda b=b, r=rows, bn=block_n, s=stages, w=warps: [
                    mlp_one_token(x, gu, d, acc, counter, b, r, bn, s, w) for gu, d in copies
                ],
                rep=50,
            ) / len(copies)
        except Exception as e:  # a tile that does not compile (registers, shared memory)
            print(b, rows, block_n, stages, warps, type(e).__name__, str(e)[:200])
            continue
        print(f"one launch B={b} rows={rows} block_n={block_n} stages={stages} warps={warps}: {t1 * 1e3:.1f} us "
              f"({88e6 / (t1 * 1e-3) / 1e12:.2f} TB/s), error {err:.1e}")  # fmt: skip


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--bench", action="store_true")
    args = p.parse_args()
    if args.bench:
        bench()
    else:
        check()
        check(k=256, inter=256, n=128)
