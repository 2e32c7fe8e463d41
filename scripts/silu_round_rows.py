"""Prototype (not used by the package): a W8A8 MLP's down-projection input, SiLU(gate) * up rounded per token to
E4M3 or int8, in ONE launch.

In the compiled FP8 decode step this input takes three inductor kernels per block (a split amax that also computes
SiLU * up, the amax's final reduction, then SiLU * up again, divided and rounded). Here one program per token reads
its row of the joined gate_up output, computes h = SiLU(gate) * up as the model does (rounded to bf16 after each
op where the model is bf16), keeps h in registers for the row's maximum, and rounds it with the layers' own
rounding (``kernels._quantize_tile``: IEEE division, ties to even). Codes and scales are those of
``ptq.quant.linear.fp8_rows`` / ``int8_rows`` of the same h.

    TRITON_INTERPRET=1 python scripts/silu_round_rows.py     # correctness, small shapes, CPU
    python scripts/silu_round_rows.py --bench                 # GPU: against torch.compile's kernels
"""

import argparse

import torch
import triton
import triton.language as tl

from ptq.quant import kernels as K
from ptq.quant.linear import fp8_rows, int8_rows
from ptq.quant.spec import ACT_SCALE_MIN


@triton.jit
def _round(v, BF16: tl.constexpr):
    """v rounded to bf16 (to nearest, ties to even) where the model computes in bf16 (fp32 models: v); spelled out
    in bits, as the interpreter's cast truncates."""
    if BF16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # finite values: no NaN or infinity here
        v = bits.to(tl.float32, bitcast=True)
    return v


@triton.jit
def _silu_round_kernel(gu_ptr, q_ptr, s_ptr, INTER, stride_m, SCALE_MIN: tl.constexpr, ACT: tl.constexpr,
                       QMAX: tl.constexpr, BLOCK: tl.constexpr, BF16: tl.constexpr):  # fmt: skip
    rm = tl.program_id(0) + tl.arange(0, 1)
    rk = tl.arange(0, BLOCK)
    mask = (rk < INTER)[None, :]
    row = gu_ptr + rm[:, None] * stride_m + rk[None, :]
    gate = tl.load(row, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + INTER, mask=mask, other=0.0).to(tl.float32)
    h = _round(_round(gate / (1.0 + tl.exp(-gate)), BF16) * up, BF16)  # 0 where masked
    x_scale = tl.maximum(tl.max(tl.abs(h), axis=1) / QMAX, SCALE_MIN)
    q = K._quantize_tile(h, x_scale, ACT)
    tl.store(q_ptr + rm[:, None] * INTER + rk[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rm, x_scale)


def silu_round_rows(gate_up: torch.Tensor, act: int, warps: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [M, 2I] (gate then up) -> codes [M, I] (E4M3 or int8) and fp32 scales [M, 1]."""
    m, inter = gate_up.shape[0], gate_up.shape[1] // 2
    q = torch.empty(m, inter, dtype=torch.int8 if act == K.ACT_INT8 else torch.float8_e4m3fn, device=gate_up.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=gate_up.device)
    _silu_round_kernel[(m,)](gate_up, q, s, inter, gate_up.stride(0), SCALE_MIN=ACT_SCALE_MIN, ACT=act,
                             QMAX=K.QMAX[act], BLOCK=triton.next_power_of_2(inter),
                             BF16=gate_up.dtype == torch.bfloat16, num_warps=warps)  # fmt: skip
    return q, s


def reference(gate_up: torch.Tensor, act: int) -> tuple[torch.Tensor, torch.Tensor]:
    inter = gate_up.shape[1] // 2
    h = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    return (int8_rows if act == K.ACT_INT8 else fp8_rows)(h)


def compare(got, want) -> tuple[float, float]:
    """(fraction of codes that differ, largest relative difference of the scales)."""
    differ = (got[0].float() != want[0].float()).float().mean().item()
    return differ, ((got[1] - want[1]).abs() / want[1]).max().item()


def check(device="cpu"):
    torch.manual_seed(0)
    for m, inter, dtype in [(1, 1000, torch.float32), (3, 1000, torch.bfloat16), (2, 96, torch.bfloat16)]:
        gate_up = torch.randn(m, 2 * inter, device=device).to(dtype) * 3
        for act in (K.ACT_FP8, K.ACT_INT8):
            differ, scale_err = compare(silu_round_rows(gate_up, act, warps=4), reference(gate_up, act))
            print(f"m={m} inter={inter} {dtype} act={act}: codes differing {differ:.2e}, scale error {scale_err:.1e}")
            # the same codes and scales (an exponential one ulp off could move a rare element across a boundary)
            assert differ < 2e-3 and scale_err < 1e-6, (differ, scale_err)


def bench():
    torch.manual_seed(0)
    inter = 14336
    compiled = torch.compile(reference)
    for m in (1, 16):
        gate_up = torch.randn(m, 2 * inter, device="cuda", dtype=torch.bfloat16) * 3
        for act, name in ((K.ACT_FP8, "fp8"), (K.ACT_INT8, "int8")):
            want = compiled(gate_up, act)
            t = triton.testing.do_bench_cudagraph(lambda g=gate_up, a=act: compiled(g, a), rep=50)
            print(f"rows={m} {name}: torch.compile {t * 1e3:.1f} us")
            for warps in (4, 8, 16, 32):
                got = silu_round_rows(gate_up, act, warps)
                differ, scale_err = compare(got, want)
                run = lambda g=gate_up, a=act, w=warps: silu_round_rows(g, a, w)  # noqa: E731
                t = triton.testing.do_bench_cudagraph(run, rep=50)
                print(f"rows={m} {name}: one kernel, {warps} warps {t * 1e3:.1f} us "
                      f"(codes differing from torch.compile's {differ:.1e}, scales {scale_err:.1e})")  # fmt: skip


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--bench", action="store_true")
    if p.parse_args().bench:
        bench()
    else:
        check()
