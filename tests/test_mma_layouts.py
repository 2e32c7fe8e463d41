"""The index algebra of ``ptq.quant.int4_mma`` and ``ptq.quant.fp4_mma``, on the CPU (the kernels themselves run on
CUDA only: tests/test_kernels.py): their layouts place every element once, a lane holds the words and activations
its mma.sync fragments take, the weights' and the activations' permutations of K agree slot for slot, and the FP4
decode's PTX, run instruction by instruction, gives every code times its block scale."""

import math

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (it comes with CUDA builds of torch)")
from ptq.quant import fp4_mma, int4_mma, kernels  # noqa: E402

pytestmark = pytest.mark.skipif(int4_mma.gluon is None, reason="this Triton has no Gluon")

# (words per lane, warps, groups of 64 inputs per load) of every MMA tile in the tuner's table
TILES = sorted({(c[0] // (8 * c[3]), c[3]) for c in kernels.CANDIDATES[kernels.INT4] if kernels.MMA in c})


def coordinates(layout) -> list[tuple[int, ...]]:
    """The element each (register, lane, warp) holds, indexed by register + lane and warp bits above it: a linear
    layout XORs the bases of the index's set bits."""
    bases = layout.reg_bases + layout.lane_bases + layout.warp_bases
    held = []
    for index in range(2 ** len(bases)):
        coordinate = [0] * len(layout.shape)
        for bit, base in enumerate(bases):
            if index >> bit & 1:
                coordinate = [a ^ b for a, b in zip(coordinate, base, strict=True)]
        held.append(tuple(coordinate))
    return held


def lane_elements(layout) -> dict[tuple[int, int], set[tuple[int, ...]]]:
    """(lane, warp) -> the elements it holds."""
    registers = 2 ** len(layout.reg_bases)
    held = coordinates(layout)
    return {(index % 32, index // 32): set(held[index * registers : (index + 1) * registers])
            for index in range(len(held) // registers)}  # fmt: skip


@pytest.mark.parametrize("cols,warps", TILES)
@pytest.mark.parametrize("chunks", [1, 2])
def test_word_layouts_place_every_word_once(cols, warps, chunks):
    for layout in (int4_mma.word_layout(warps, cols, chunks), int4_mma.word3_layout(warps, cols)):
        held = coordinates(layout)
        assert len(set(held)) == len(held) == math.prod(layout.shape)
        assert all(0 <= i < n for coordinate in held for i, n in zip(coordinate, layout.shape, strict=True))


@pytest.mark.parametrize("cols,warps", TILES)
def test_a_lane_holds_both_halves_of_its_two_word_rows_of_contiguous_columns(cols, warps):
    held = lane_elements(int4_mma.word3_layout(warps, cols))
    for warp in range(warps):
        for lane in range(32):
            c, q = lane % 4, lane // 4
            columns = [(8 * warp + q) * cols + t for t in range(cols)]
            want = {(row, n, half) for row in (2 * c, 2 * c + 1) for n in columns for half in (0, 1)}
            assert held[lane, warp] == want, (lane, warp)


@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("chunks", [1, 2])
def test_a_lane_holds_the_sixteen_inputs_its_k_slots_take(block_m, chunks):
    held = lane_elements(int4_mma.x_layout(4, block_m, chunks))
    for warp in range(4):  # every warp holds the same activations
        for lane in range(32):
            c, q = lane % 4, lane // 4
            want = {(m, 64 * chunk + 16 * c + i) for m in range(q, block_m, 8) for chunk in range(chunks)
                    for i in range(16)}  # fmt: skip
            assert held[lane, warp] == want


@pytest.mark.parametrize("cols,warps", TILES)
def test_weights_and_activations_take_one_permutation_of_k(cols, warps):
    """After the kernel's reshapes and permutes, K slot s of the weights and of the activations is the same input
    for every output slot, each input once per column, and output slot v holds the column the kernel writes it to."""
    block_n, block_m = 8 * cols * warps, 16
    row, column, e, j0, j1 = torch.meshgrid(*(torch.arange(n) for n in (8, block_n, 2, 2, 2)), indexing="ij")
    # the decoded chunk as joined in _chunk_product: [word row, column, e, j0, j1] holds code j + 4e of the row's word
    code_input = 8 * row + (j0 + 2 * j1) + 4 * e

    def as_operand(labels):
        return labels.reshape(2, 2, 2, warps, 8, cols, 2, 2, 2).permute(int4_mma.B_ORDER).reshape(64, block_n)

    b_input, b_column = as_operand(code_input), as_operand(column)
    x_input = torch.arange(64).expand(block_m, 64)
    a_input = x_input.reshape(block_m, 2, 2, 2, 2, 2, 2).permute(int4_mma.A_ORDER).reshape(block_m, 64)
    assert torch.equal(a_input, b_input[:, :1].t().expand(block_m, 64))  # the same input in every slot
    assert torch.equal(b_input, b_input[:, :1].expand(64, block_n))
    assert torch.equal(b_input[:, 0].sort().values, torch.arange(64))
    v = torch.arange(block_n)
    log_width = int(math.log2(8 * warps))
    out_column = (v >> log_width) + cols * (v & 7) + 8 * cols * ((v >> 3) & (warps - 1))  # as _int4_mma_kernel
    assert torch.equal(b_column, out_column.expand(64, block_n))
    assert torch.equal(out_column.sort().values, v)
    s = torch.arange(64)  # the slot formula of the module's docstring: s = e + 2c + 8u + 16j <- 16c + 8u + 4e + j
    e_, c_, u_, j_ = s & 1, (s >> 1) & 3, (s >> 3) & 1, s >> 4
    assert torch.equal(b_input[:, 0], 16 * c_ + 8 * u_ + 4 * e_ + j_)


# (columns per lane, warps) of every FP4 MMA tile in the tuner's table
FP4_TILES = sorted({(c[0] // (8 * c[3]), c[3]) for c in kernels.FP4_MMA})


@pytest.mark.parametrize("cols,warps", FP4_TILES)
def test_fp4_words_sit_where_the_operand_takes_them(cols, warps):
    """Every half-word held once; lane (c, q) of warp w holds halves 4c..4c + 3 (words 2c, 2c + 1) of columns
    q + 8w + 8 WARPS t; the [column, word, half] view is the same placement."""
    for layout in (fp4_mma.word_layout(warps, cols), fp4_mma.word3_layout(warps, cols)):
        held = coordinates(layout)
        assert len(set(held)) == len(held) == math.prod(layout.shape)
    flat, shaped = lane_elements(fp4_mma.word_layout(warps, cols)), lane_elements(fp4_mma.word3_layout(warps, cols))
    for warp in range(warps):
        for lane in range(32):
            c, q = lane % 4, lane // 4
            columns = [q + 8 * warp + 8 * warps * t for t in range(cols)]
            assert flat[lane, warp] == {(n, h) for n in columns for h in range(4 * c, 4 * c + 4)}
            assert shaped[lane, warp] == {(n, h // 2, h % 2) for n, h in flat[lane, warp]}


@pytest.mark.parametrize("cols,warps", FP4_TILES)
def test_fp4_weights_and_activations_take_one_permutation_of_k(cols, warps):
    """After _chunk_product's joins, reshapes and permutes, K slot s of the weights holds the input the activations'
    slot s holds (int4_mma's permutation), and output slot v is column v of the program's block."""
    block_n = 8 * cols * warps
    column, word, e, j0, j1 = torch.meshgrid(*(torch.arange(n) for n in (block_n, 8, 2, 2, 2)), indexing="ij")
    code_input = 8 * word + (j0 + 2 * j1) + 4 * e  # [column, word, e, j0, j1] holds code j + 4e of the word

    def as_operand(labels):
        order = (8, 7, 5, 3, 4, 6, 0, 1, 2)  # fp4_mma._B_ORDER
        return labels.reshape(cols, warps, 8, 2, 2, 2, 2, 2, 2).permute(order).reshape(64, block_n)

    assert fp4_mma._B_ORDER.value == (8, 7, 5, 3, 4, 6, 0, 1, 2)
    b_input, b_column = as_operand(code_input), as_operand(column)
    s = torch.arange(64)
    e_, c_, u_, j_ = s & 1, (s >> 1) & 3, (s >> 3) & 1, s >> 4
    a_input = torch.arange(64).reshape(1, 2, 2, 2, 2, 2, 2).permute(int4_mma.A_ORDER).reshape(64)
    assert torch.equal(b_input, (16 * c_ + 8 * u_ + 4 * e_ + j_)[:, None].expand(64, block_n))
    assert torch.equal(a_input, b_input[:, 0])
    assert torch.equal(b_column, torch.arange(block_n).expand(64, block_n))
    # lane c's inputs of a chunk are 16c..16c + 15: one NVFP4 block, the scale _block_scales gives its words
    assert torch.equal(b_input[c_ == 1, 0].sort().values, torch.arange(16, 32))


def run_ptx(text: str, operands: dict[str, int]) -> dict[str, int]:
    """The decode's PTX on 32-bit registers: mov, shl, shr.u32, and, lop3 (its truth table) and fma.rn.bf16x2
    (per 16-bit half: the exact a b + c rounded to bf16 by torch, subnormals kept)."""
    regs = dict(operands)

    def value(token: str) -> int:
        return int(token, 16) if token.startswith("0x") else regs[token]

    def bf16(bits: int) -> float:
        return torch.tensor([bits], dtype=torch.int16 if bits < 32768 else torch.int32).to(torch.int16).view(
            torch.bfloat16).double().item()  # fmt: skip

    def to_bits(v: float) -> int:
        return torch.tensor([v], dtype=torch.float64).to(torch.bfloat16).view(torch.int16).item() & 0xFFFF

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        if op == "mov.b32":
            out = value(src[0])
        elif op == "shl.b32":
            out = value(src[0]) << int(src[1])
        elif op == "shr.u32":
            out = value(src[0]) >> int(src[1])
        elif op == "and.b32":
            out = value(src[0]) & value(src[1])
        elif op == "lop3.b32":
            a, b, c, lut = (value(t) for t in src)
            out = sum(((lut >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1))) & 1) << i for i in range(32))
        elif op == "fma.rn.bf16x2":
            a, b, c = (value(t) for t in src)
            halves = [to_bits(bf16(a >> h & 0xFFFF) * bf16(b >> h & 0xFFFF) + bf16(c >> h & 0xFFFF)) for h in (0, 16)]
            out = halves[0] | halves[1] << 16
        else:
            raise AssertionError(f"the emulator does not know {op}")
        regs[d] = out & 0xFFFFFFFF
    return regs


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


@pytest.mark.parametrize("scale", [2.0**-9, 2.0**-7 * 1.625, 1.0, 3.25, 448.0])
def test_fp4_decode_gives_each_code_times_its_scale(scale):
    """Words holding every code in every position: output register j holds codes j and j + 4 of the word, each the
    E2M1 value times the block scale times 2^-8 (fp4_mma.SCALE_DOWN undoes it), exactly, for E4M3 scales from the
    smallest subnormal to the largest. The decode's PTX is the module's own text."""
    scale_bits = torch.tensor([scale * fp4_mma.SCALE_UP.value]).to(torch.bfloat16).view(torch.int16).item() & 0xFFFF
    assert float(torch.tensor([scale_bits], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)) == (
        scale * fp4_mma.SCALE_UP.value)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    words = [int(w) & 0xFFFFFFFF for w in torch.randint(-(2**31), 2**31, (64,), generator=gen)]
    words += [sum(((c + i) % 16) << (4 * i) for i in range(8)) for c in range(16)]
    for word in words:
        regs = run_ptx(fp4_mma._DECODE, {"$4": word, "$5": scale_bits * 65537, "$6": scale_bits * 65537})
        for j in range(4):
            for half, code_position in ((0, j), (1, j + 4)):
                code = word >> (4 * code_position) & 15
                want = (-1 if code & 8 else 1) * E2M1[code & 7] * scale * 2.0**-8
                bits = regs[f"${j}"] >> (16 * half) & 0xFFFF
                got = torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(torch.bfloat16).double().item()
                assert got == want, (hex(word), j, half)
