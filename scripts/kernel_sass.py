"""Read a one-token kernel's machine code for Hopper without a GPU: instructions per weight code, spills.

    python scripts/kernel_sass.py --kernel fp4 --tiles 4,4:8,4:8,2:16,4
    python scripts/kernel_sass.py --kernel w8 --tiles 8,4:16,4 --fp8
    python scripts/kernel_sass.py --kernel fp4-mma --tiles 32,4:64,4:128,4 --unroll 2
    python scripts/kernel_sass.py --kernel fp4-dequantize --tiles 32,4
    python scripts/kernel_sass.py --kernel fp4-skinny --tiles 64,4 --mx

Compiles ``ptq.quant.kernels``' ``_fp4_gemv_kernel`` or ``_w8_gemv_kernel`` for sm_90 with Triton's own compiler
and ptxas (they come with the Triton wheel; no device needed), disassembles it with the wheel's cuobjdump, and
prints per tile (BLOCK_N, num_warps) the static instruction count, how many weight codes a thread handles per K
tile, their ratio, local-memory traffic (STL/LDL: spills) and the commonest opcodes. The integer arguments are
declared divisible by 16, as Triton specializes them at a real launch (K, N and the row strides of the shapes
the benchmark uses); without that the loads are not vectorized and the listing is not the one that runs.
One K tile per program (TILES=1, no split-K), so the count is the loop body plus the program's fixed part.
``fp4-mma``: ``ptq.quant.fp4_mma``'s Gluon kernel at one token (16-row MMA blocks), one loop step of ``--unroll``
64-input chunks per program, counted with the program's fixed part. ``fp4-dequantize``: the many-token path's NVFP4
dequantize kernel (``--tiles`` BLOCK_N,num_warps; 128 codes per row of a tile), one tile per program. ``fp4-skinny``:
the few-token tile for FP4 weights that the MMA tile does not take (``--mx``: MXFP4's E8M0 blocks of 32, else NVFP4's
E4M3 blocks of 16), 16 rows, one K tile of 128.
"""

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ptq.quant import fp4_mma, int4_mma, kernels

OPCODE = re.compile(r"/\*[0-9a-f]{4,5}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


def _signature(kind: str, fp8: bool) -> dict[str, str]:
    if kind == "fp4":
        return {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp8e4nv", "ts_ptr": "*fp32", "y_ptr": "*bf16",
                "ws_ptr": "*fp32", "cnt_ptr": "*i32", "N": "i32", "K": "i32", "stride_w": "i32",
                "stride_s": "i32"}  # fmt: skip
    weight = "*fp8e4nv" if fp8 else "*i8"
    return {"x_ptr": weight, "w_ptr": weight, "s_ptr": "*fp32", "xs_ptr": "*fp32", "y_ptr": "*bf16",
            "ws_ptr": "*fp32", "cnt_ptr": "*i32", "N": "i32", "K": "i32", "stride_w": "i32"}  # fmt: skip


def compile_sm90(fn, signature: dict, constants: dict, warps: int, unaligned: tuple = (), gluon: bool = False):
    """``fn`` compiled for sm_90 with the launch's specializations: every argument but ``unaligned`` declared
    divisible by 16, the constants as constexprs."""
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n not in unaligned}
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as source_kind
    else:
        source_kind = ASTSource
    source = source_kind(fn, {**signature, **{name: "constexpr" for name in constants}}, constexprs=constants,
                         attrs=attrs)  # fmt: skip
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def compile_fp4_mma(block_n: int, warps: int, unroll: int):
    """``fp4_mma._fp4_mma_kernel`` compiled for sm_90 at one token (N = 4096, K one loop step, no split-K), and the
    codes each thread decodes per loop step."""
    cols, n, k = block_n // (8 * warps), 4096, 64 * unroll
    signature = {"x_ptr": "*bf16", "w_ptr": "*i16", "s_ptr": "*fp8e4nv", "ts_ptr": "*fp32", "y_ptr": "*bf16",
                 "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32"}  # fmt: skip
    constants = dict(N=n, K=k, STRIDE_X=k, STRIDE_Y=n, STRIDE_W=k // 4, STRIDE_S=k // 16, SPLIT_K=1,
                     BLOCK_M=16, COLS=cols, WARPS=warps, UNROLL=unroll, STAGES=1,
                     WORD_LAYOUT=fp4_mma.word_layout(warps, cols), WORD3_LAYOUT=fp4_mma.word3_layout(warps, cols),
                     X_LAYOUT=int4_mma.x_layout(warps, 16, 1), SMEM_LAYOUT=int4_mma.SMEM_LAYOUT)  # fmt: skip
    compiled = compile_sm90(fp4_mma._fp4_mma_kernel, signature, constants, warps, ("ts_ptr", "M"), gluon=True)
    return compiled, 16 * cols * unroll


def compile_fp4_dequantize(block_n: int, warps: int):
    """``kernels._dequantize_fp4_kernel`` for NVFP4 (blocks of 16, each tile's scales once per block) compiled for
    sm_90, and the codes each thread writes."""
    signature = {"w_ptr": "*u8", "s_ptr": "*fp8e4nv", "ts_ptr": "*fp32", "out_ptr": "*bf16", "N": "i32", "K": "i32",
                 "B": "i32", "stride_w": "i32", "stride_s": "i32"}  # fmt: skip
    constants = dict(SCALE_KIND=kernels.SCALE_E4M3, BLOCK_N=block_n, BLOCK_B=64, GROUP=16)
    compiled = compile_sm90(kernels._dequantize_fp4_kernel, signature, constants, warps, ("ts_ptr",))
    return compiled, block_n * 128 // (32 * warps)


def compile_fp4_skinny(block_n: int, warps: int, mx: bool):
    """``kernels._skinny_kernel``'s FP4 tile (16 rows, BLOCK_K 128, one K tile) compiled for sm_90, and the codes each
    thread decodes."""
    import triton.language as tl

    block_k = 128
    signature = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*u8" if mx else "*fp8e4nv", "z_ptr": "*u8", "g_ptr": "*u8",
                 "ts_ptr": "*fp32", "xs_ptr": "*fp32", "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
                 "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "stride_w": "i32",
                 "stride_s": "i32", "group": "i32"}  # fmt: skip
    constants = dict(WEIGHT=kernels.FP4, ACT=0, ACT_ORDER=False,
                     SCALE_KIND=kernels.SCALE_E8M0 if mx else kernels.SCALE_E4M3, DOT=tl.bfloat16, BLOCK_M=16,
                     BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=1, QMAX=1.0, TILES=1, ROW_TILES=1, NIBBLE_DOTS=False,
                     CODES=False, INT_DOT=False, SWAP=False, FP4_BLOCK=32 if mx else 16)  # fmt: skip
    compiled = compile_sm90(kernels._skinny_kernel, signature, constants, warps, ("ts_ptr", "M"))
    return compiled, block_n * block_k // (32 * warps)


def compile_tile(kind: str, block_n: int, warps: int, fp8: bool = False):
    """The kernel compiled for sm_90 at one tile, and the weight codes each thread handles per K tile."""
    if kind == "fp4":
        fn, block_k = kernels._fp4_gemv_kernel, 32 * 32 * warps
        constants = dict(SCALE_KIND=kernels.SCALE_E4M3, BLOCK=16, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=1,
                         TILES=1, EVEN=True, STAGES=1)  # fmt: skip
    else:  # the codes variant W8A8 calls take at one token (E4M3 float sums, or int8 int32 sums)
        fn, block_k = kernels._w8_gemv_kernel, 16 * 32 * warps
        act = kernels.ACT_FP8 if fp8 else kernels.ACT_INT8
        constants = dict(ACT=act, QMAX=kernels.QMAX[act], BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=1, TILES=1,
                         ROW_TILES=1, INT_SUMS=not fp8, CODES=True, EVEN=True, STAGES=1)  # fmt: skip
    return compile_sm90(fn, _signature(kind, fp8), constants, warps, ("ts_ptr",)), block_n * block_k // (32 * warps)


def opcodes(cubin: bytes) -> collections.Counter:
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        listing = subprocess.run([str(tools / "cuobjdump"), "-sass", file.name], capture_output=True, text=True,
                                 check=True)  # fmt: skip
    return collections.Counter(OPCODE.findall(listing.stdout))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", choices=("fp4", "w8", "fp4-mma", "fp4-dequantize", "fp4-skinny"), default="fp4")
    p.add_argument("--tiles", default="4,4:8,4:8,2", help="BLOCK_N,num_warps pairs separated by ':'")
    p.add_argument("--fp8", action="store_true", help="w8: E4M3 weights and activations (default int8)")
    p.add_argument("--unroll", type=int, default=2, help="fp4-mma: 64-input chunks per loop step")
    p.add_argument("--mx", action="store_true", help="fp4-skinny: MXFP4 (default NVFP4)")
    args = p.parse_args()
    for tile in args.tiles.split(":"):
        block_n, warps = (int(v) for v in tile.split(","))
        if args.kernel == "fp4-mma":
            compiled, codes = compile_fp4_mma(block_n, warps, args.unroll)
        elif args.kernel == "fp4-dequantize":
            compiled, codes = compile_fp4_dequantize(block_n, warps)
        elif args.kernel == "fp4-skinny":
            compiled, codes = compile_fp4_skinny(block_n, warps, args.mx)
        else:
            compiled, codes = compile_tile(args.kernel, block_n, warps, args.fp8)
        counts = opcodes(compiled.asm["cubin"])
        total = sum(counts.values())
        common = ", ".join(f"{op} {n}" for op, n in counts.most_common(8))
        print(f"{args.kernel} BLOCK_N={block_n} warps={warps}: {total} instructions, {codes} codes per thread, "
              f"{total / codes:.2f} per code, STL {counts['STL']} LDL {counts['LDL']}; {common}")  # fmt: skip


if __name__ == "__main__":
    main()
