"""The index algebra of ``ptq.quant.int4_mma``, on the CPU (the kernel itself runs on CUDA only: tests/test_kernels.py):
its layouts place every element once, a lane holds the words and activations its mma.sync fragments take, and the
weights' and the activations' permutations of K agree slot for slot."""

import math

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (it comes with CUDA builds of torch)")
from ptq.quant import int4_mma, kernels  # noqa: E402

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
