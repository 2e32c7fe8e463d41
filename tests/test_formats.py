"""Every number format's grid, checked against code nobody here wrote.

Oracles:
- torch's own float8 casts (``torch.float8_e4m3fn`` / ``torch.float8_e5m2``, round to nearest even);
- compressed-tensors 0.20.1 (``calculate_qparams``, ``generate_gparam``, ``fake_quantize``, ``quantize``,
  ``cast_to_fp4``), the library whose checkpoints vLLM loads for FP8, NVFP4 and MX;
- the OCP Microscaling Formats v1.0 rules (Sec. 6.3) and the E2M1 table, written out by hand here.

Tolerances: every comparison below is exact (``torch.equal``, and bit patterns where it says "bits"). Both
sides do the same IEEE fp32 operations in the same order (amax / max; x / s; clamp; round; q * s), so
there is no rounding difference to tolerate; where the libraries differ by design (MX scale rounding,
NVFP4 blocks whose E4M3 scale underflows, asymmetric int zero points) the tests say how and compare only
what must agree.
"""

import math

import pytest
import torch
from torch import nn

from ptq.quant import FORMATS, ActSpec, WeightSpec, fake_quantize_weight, quantize_weight
from ptq.quant.pack import StorageCount

FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # NVFP4 / OCP MX v1.0 Table 5
ALL_FORMATS = ["int", "fp8_e4m3", "fp8_e5m2", "nvfp4", "mxfp4", "mxfp8"]
MX_EMAX = {"mxfp4": 2, "mxfp8": 8}  # OCP MX v1.0: largest exponent of E2M1 / E4M3 elements


def ct():
    """compressed-tensors' quantization modules (the oracle), imported only by the tests that use them."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs, quant_scheme
    from compressed_tensors.quantization.lifecycle import forward
    from compressed_tensors.quantization.utils import fp4_utils, helpers

    class CT:
        Args = QuantizationArgs
        schemes = quant_scheme
        fake_quantize = staticmethod(forward.fake_quantize)
        quantize = staticmethod(forward.quantize)
        calculate_qparams = staticmethod(helpers.calculate_qparams)
        compute_dynamic_scales_and_zp = staticmethod(helpers.compute_dynamic_scales_and_zp)
        generate_gparam = staticmethod(helpers.generate_gparam)
        cast_to_fp4 = staticmethod(fp4_utils.cast_to_fp4)

    return CT


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit for bit (signed zeros included), not just numerically equal."""
    assert a.dtype == b.dtype and a.shape == b.shape
    int_dtype = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
    diff = a.view(int_dtype) != b.view(int_dtype)
    assert not diff.any(), f"{int(diff.sum())} differ, e.g. {a[diff][:5].tolist()} vs {b[diff][:5].tolist()}"


def fp8_ref(x: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """clamp(x / s, -max, max) cast to torch's float8, times s."""
    mx = torch.finfo(dtype).max
    return (x / s).clamp(-mx, mx).to(dtype).float() * s


def fp8_grid(dtype: torch.dtype) -> torch.Tensor:
    """Every finite non-negative value of a torch float8 dtype, from its 256 bit patterns (fp64, ascending)."""
    values = torch.arange(256, dtype=torch.uint8).view(dtype).double()
    return values[torch.isfinite(values) & (values >= 0)].unique()


def e2m1_ref(x: torch.Tensor) -> torch.Tensor:
    """Nearest of +-E2M1_VALUES (saturating at 6), ties to the even mantissa: in the ascending table the
    mantissa bit alternates 0, 1, 0, 1, ... so an even index is an even mantissa."""
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    a = x.double().abs().clamp(max=6.0).reshape(-1, 1)
    d = (a - grid).abs()
    nearest = d == d.min(dim=1, keepdim=True).values
    prefer_even = nearest * (2 - torch.arange(8) % 2)  # a tie is between two neighbours: the even one wins
    return (grid[prefer_even.argmax(dim=1)].reshape(x.shape) * x.double().sign()).to(x.dtype)


def e4m3_ref(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()


def mx_scale_ref(amax: float, emax: int) -> float:
    """OCP MX v1.0 Sec. 6.3: 2^(floor(log2(amax)) - emax), with E8M0's exponent range [-127, 127]."""
    if amax == 0:
        return 2.0**-127
    return 2.0 ** max(-127, min(127, math.frexp(amax)[1] - 1 - emax))


def make_weight(rows: int, cols: int, seed: int, decades: tuple[float, float] = (-4, 1)) -> torch.Tensor:
    """Gaussian rows whose magnitudes span ``decades`` (powers of ten): every row has its own range."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 10 ** torch.linspace(*decades, rows).reshape(-1, 1)


# 1. FP8 against torch's float8 casts.


@pytest.mark.parametrize("fmt", list(FP8))
@pytest.mark.parametrize("group", [-1, 32, 0])  # per channel, groups of 32 (80 columns: a partial last one), tensor
def test_fp8_weights_equal_torch_float8_cast(fmt, group):
    dtype = FP8[fmt]
    mx = torch.finfo(dtype).max
    w = make_weight(24, 80, seed=1)
    # Row 0: its max exactly at the format's max, so its scale is 1 (per channel) and the tiny values land
    # on the format's subnormals (e4m3: steps of 2^-9 below 2^-6; e5m2: 2^-16 below 2^-14), on exact ties
    # between subnormals, and below half the smallest subnormal (-> 0).
    tiny = 2.0 ** torch.arange(-20, -5, dtype=torch.float32)
    w[0, :40] = 0.0
    w[0, 0] = mx
    w[0, 1 : 1 + len(tiny)] = tiny
    w[0, 20:30] = torch.tensor([1, 3, 5, 7, 9, -1, -3, -5, 11, 13]) * 2.0 ** (-10 if fmt == "fp8_e4m3" else -17)
    w[0, 30:40] = -tiny[:10] * 1.3
    spec = WeightSpec.build(fmt, group_size=group)
    want = torch.empty_like(w)
    scales = []
    g = w.shape[1] if group <= 0 else group
    for start in range(0, w.shape[1], g):
        x = w[:, start : start + g]
        s = (w.abs().amax() if group == 0 else x.abs().amax(dim=1, keepdim=True)) / mx
        want[:, start : start + g] = fp8_ref(x, s, dtype)
        scales.append(s.expand(w.shape[0], 1))
    got = fake_quantize_weight(w, spec)
    assert_same_bits(got, want)
    qw = quantize_weight(w, spec)
    assert qw.qweight.dtype == dtype
    assert torch.equal(qw.scale, torch.cat(scales, dim=1))
    assert torch.equal(qw.dequantize(), want)
    if group == -1:
        # The row whose scale is exactly 1 shows the subnormal codes themselves.
        assert qw.scale[0].item() == 1.0
        assert torch.equal(qw.codes()[0], w[0].to(dtype).float())
        smallest = 2.0 ** (-9 if fmt == "fp8_e4m3" else -16)
        codes = qw.codes()[0].abs()
        assert ((codes > 0) & (codes < 2.0 ** (-6 if fmt == "fp8_e4m3" else -14))).sum() >= 5
        assert smallest in codes.tolist()


@pytest.mark.parametrize("fmt", list(FP8))
def test_fp8_saturates_with_a_given_scale(fmt):
    """GPTQ quantizes error-corrected columns with precomputed scales: values beyond the range must
    saturate at the format's max (a plain cast gives inf for e5m2, and NaN for e4m3fn in older torch)."""
    dtype = FP8[fmt]
    mx = torch.finfo(dtype).max
    spec = WeightSpec.build(fmt)
    x = torch.tensor([[0.5, 1.0, 1.1, 2.0, -3.0, 1e6, -1e30, 0.999]])
    s = torch.tensor([[1.0 / mx]])  # the range is [-1, 1]
    got = spec.fake_quantize(x, s, torch.zeros_like(s))
    assert_same_bits(got, fp8_ref(x, s, dtype))
    assert torch.isfinite(got).all()
    assert torch.equal(got[0, 2:7].abs(), torch.full((5,), mx) * s[0])
    assert torch.equal(spec.quantize(x, s, torch.zeros_like(s))[0, 2:7].abs(), torch.full((5,), mx))


@pytest.mark.parametrize("fmt", list(FP8))
def test_minifloat_generic_rounding_equals_torch_float8_cast(fmt):
    """The float64 path of MiniFloat.round (frexp / spacing / round half even) is ptq's own code:
    it must agree with torch's cast on random values, exact ties, the grid itself and beyond max."""
    dtype = FP8[fmt]
    element = FORMATS[fmt].element
    grid = fp8_grid(dtype)
    mx = grid[-1].item()
    assert element.max == mx == torch.finfo(dtype).max
    g = torch.Generator().manual_seed(2)
    # Random fp32 values (so the fp64 input is exactly the fp32 one torch casts) over every binade from far
    # below the smallest subnormal to far above max.
    lo, hi = math.log2(grid[1].item()) - 4, math.log2(mx) + 3
    magnitude = 2 ** (lo + (hi - lo) * torch.rand(20000, generator=g, dtype=torch.float64))
    random = (magnitude * torch.where(torch.rand(20000, generator=g) < 0.5, -1.0, 1.0)).float()
    ties = (grid[1:] + grid[:-1]) / 2  # every midpoint between neighbours, subnormals included
    above = torch.tensor([mx * 1.01, mx * 17 / 16, mx * 1.125, 2 * mx, 1e10, 3e38], dtype=torch.float64)
    below = grid[1] * torch.tensor([0.5, 0.49, 0.25], dtype=torch.float64)  # 0.5: tie with 0 -> 0
    x = torch.cat([random.double(), ties, grid, above, below])
    x = torch.cat([x, -x]).float()
    assert torch.equal(x.double().float(), x)  # every value exact in fp32: no double rounding in the oracle
    want = x.clamp(-mx, mx).to(dtype).double()
    assert_same_bits(element.round(x.double()), want)
    assert_same_bits(element.round(x), want.float())
    # The ties really are ties that round to the even neighbour (not all up, not all down).
    tie_result = element.round(ties)
    assert (tie_result == grid[1:]).any() and (tie_result == grid[:-1]).any()
    assert torch.equal(element.round(above), torch.full_like(above, mx))


# 2. compressed-tensors as the oracle.


def test_fp8_per_channel_equals_compressed_tensors():
    CT = ct()
    w = make_weight(32, 256, seed=3)
    args = CT.Args(num_bits=8, type="float", strategy="channel", symmetric=True)
    scale, zero = CT.calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), args)
    spec = WeightSpec.build("fp8_e4m3")
    qw = quantize_weight(w, spec)
    # Same fp32 arithmetic on both sides (amax / 448 there: max_val_pos / (896 / 2)): exact.
    assert torch.equal(qw.scale, scale)
    assert torch.equal(zero.float(), qw.zero)
    assert_same_bits(fake_quantize_weight(w, spec), CT.fake_quantize(w, scale, zero, args))
    codes = CT.quantize(w, scale, zero, args, dtype=torch.float8_e4m3fn)
    assert torch.equal(qw.qweight.view(torch.uint8), codes.view(torch.uint8))


def test_nvfp4_equals_compressed_tensors():
    CT = ct()
    # 4.5 decades: the smallest rows' E4M3 block scales are subnormal (block max below 2^-6 * 6 / 2688
    # of the tensor's), and none underflows to 0 (below 2^-10 * 6 / 2688 = 2.2e-6 of it).
    w = make_weight(32, 256, seed=4, decades=(-3.5, 1))
    w[3, 5] = 0.0  # an exact zero and an all-zero block ride along
    w[4, 16:32] = 0.0
    args = CT.schemes.NVFP4A16["weights"]  # float, 4 bits, tensor_group, 16, E4M3 scales
    gscale = CT.generate_gparam(w.min(), w.max())  # 448 * 6 / amax, fp32
    blocks = w.reshape(32, 16, 16)
    scale, zero = CT.calculate_qparams(blocks.amin(dim=-1), blocks.amax(dim=-1), args, global_scale=gscale)
    # CT's ``scale`` is the E4M3 value stored in the checkpoint (kept in fp32); it divides by the global
    # scale when quantizing. ptq keeps the effective scale stored / global.
    spec = WeightSpec.build("nvfp4")
    qw = quantize_weight(w, spec)
    assert qw.tensor_scale.dtype == torch.float32
    assert torch.equal(qw.tensor_scale.reshape(1), gscale)
    # Blocks whose E4M3 scale rounds to 0 get 0.125 in CT (see the next test): here only the all-zero one.
    underflow = e4m3_ref(blocks.abs().amax(dim=-1) / 6.0 * gscale) == 0
    assert underflow.sum() == 1 and underflow[4, 1] and scale[4, 1] == 0.125
    ok = ~underflow
    assert torch.equal(qw.scale[ok], (scale / gscale)[ok])
    assert (scale[ok] < 2.0**-6).any()  # some stored block scales are E4M3 subnormals
    assert torch.equal(scale, scale.to(torch.float8_e4m3fn).float())
    want = CT.fake_quantize(w, scale, zero, args, global_scale=gscale)
    assert_same_bits(fake_quantize_weight(w, spec), want)
    assert torch.equal(qw.dequantize(), want)
    codes = CT.quantize(w, scale, zero, args, global_scale=gscale)
    assert torch.equal(qw.codes(), codes)


def test_nvfp4_block_whose_e4m3_scale_underflows():
    """A deliberate, documented difference. A block with max|x| / 6 * global below 2^-10 has an E4M3 scale
    that rounds to 0. compressed-tensors then uses 0.125 (its "eps" for E4M3) as the stored scale, so the
    block becomes zeros; ptq stores E4M3's smallest subnormal 2^-9 instead and keeps codes up to 3.
    Both are valid NVFP4 encodings; ptq's is closer to the weights."""
    CT = ct()
    w = torch.zeros(1, 32)
    w[0, 0] = 2688.0  # global scale 448 * 6 / 2688 = 1
    w[0, 16:20] = torch.tensor([0.005, 0.002, -0.004, 0.0004])
    qw = quantize_weight(w, WeightSpec.build("nvfp4"))
    assert qw.tensor_scale.item() == 1.0
    assert qw.scale[0].tolist() == [448.0, 2.0**-9]
    # By hand: 0.005 / 2^-9 = 2.56 -> 3; 0.002 / 2^-9 = 1.02 -> 1; -2.05 -> -2; 0.205 -> 0.
    want = torch.tensor([3.0, 1.0, -2.0, 0.0]) * 2.0**-9
    assert torch.equal(qw.dequantize()[0, 16:20], want)
    assert torch.equal(fake_quantize_weight(w, WeightSpec.build("nvfp4"))[0, 16:20], want)
    args = CT.schemes.NVFP4A16["weights"]
    gscale = CT.generate_gparam(w.min(), w.max())
    blocks = w.reshape(1, 2, 16)
    scale, zero = CT.calculate_qparams(blocks.amin(dim=-1), blocks.amax(dim=-1), args, global_scale=gscale)
    assert scale[0, 1].item() == 0.125
    assert torch.equal(CT.fake_quantize(w, scale, zero, args, global_scale=gscale)[0, 16:20], torch.zeros(4))


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_mx_equals_compressed_tensors_where_its_scale_follows_ocp(fmt):
    """compressed-tensors 0.20.1 computes MX scales as vLLM's reference does (mxfp_utils.generate_mx_scales):
    it first rounds max|x| to a power of two, rounding *up* when the mantissa is >= 1.75, then subtracts
    the element's emax. OCP MX v1.0 (Sec. 6.3), and ptq, take floor(log2(max|x|)) and let the largest
    elements saturate. So the two agree exactly on blocks whose max|x| = m * 2^e has m < 1.75, and on the
    others CT's scale is exactly twice ptq's; this test checks both halves of that statement."""
    CT = ct()
    w = make_weight(32, 256, seed=5)
    w[2, 32:64] = 0.0
    args = {"mxfp4": CT.schemes.MXFP4A16, "mxfp8": CT.schemes.MXFP8A16}[fmt]["weights"]
    blocks = w.reshape(32, 8, 32)
    scale, zero = CT.calculate_qparams(blocks.amin(dim=-1), blocks.amax(dim=-1), args)
    spec = WeightSpec.build(fmt)
    qw = quantize_weight(w, spec)
    amax = blocks.abs().amax(dim=-1)
    mantissa, _ = torch.frexp(amax)  # amax = mantissa * 2^e, mantissa in [0.5, 1)
    agree = (amax == 0) | (2 * mantissa < 1.75)
    assert 0.5 < agree.float().mean() < 0.95  # both kinds of block are present
    assert torch.equal(qw.scale[agree], scale[agree])
    assert torch.equal(scale[~agree], 2 * qw.scale[~agree])
    want = CT.fake_quantize(w, scale, zero, args).reshape(32, 8, 32)
    assert torch.equal(fake_quantize_weight(w, spec).reshape(32, 8, 32)[agree], want[agree])
    assert torch.equal(qw.dequantize().reshape(32, 8, 32)[agree], want[agree])


@pytest.mark.parametrize(
    ("fmt", "block", "scale", "values"),
    [
        # amax 5 = 1.25 * 2^2: scale 2^(2-2) = 1; elements as they are, rounded on E2M1.
        ("mxfp4", [5.0, -1.2, 0.3, 2.6], 1.0, [4.0, -1.0, 0.5, 3.0]),
        # amax 0.3 = 1.2 * 2^-2: scale 2^(-2-2) = 1/16; 0.3 * 16 = 4.8 -> 4; 0.1 * 16 = 1.6 -> 1.5.
        ("mxfp4", [0.3, 0.1, -0.05], 2.0**-4, [4.0, 1.5, -1.0]),
        # amax 7 = 1.75 * 2^2: scale 1 (floor, not rounded up); 7 saturates to 6, 6.5 too.
        ("mxfp4", [7.0, 6.5, -7.0, 5.0], 1.0, [6.0, 6.0, -6.0, 4.0]),
        # amax 4 (an exact power of two): scale 1.
        ("mxfp4", [4.0, 0.25, 0.75], 1.0, [4.0, 0.0, 1.0]),
        # E4M3 elements: amax 5 -> 2^(2-8) = 2^-6; 5 * 64 = 320 is an E4M3 value.
        ("mxfp8", [5.0, 0.01], 2.0**-6, [320.0, 0.625]),
        # amax 500 = 1.95 * 2^8: scale 2^0; 500 saturates at 448, 470 -> 448, 300 -> 288 (spacing 32).
        ("mxfp8", [500.0, 470.0, -300.0], 1.0, [448.0, 448.0, -288.0]),
        # An fp32 subnormal block: the scale clamps at E8M0's smallest, 2^-127, and 2^-130 / 2^-127 = 1/8 -> 0.
        ("mxfp4", [2.0**-130], 2.0**-127, [0.0]),
    ],
)
def test_mx_shared_scale_follows_ocp_rules(fmt, block, scale, values):
    w = torch.zeros(2, 64)
    w[1, 32 : 32 + len(block)] = torch.tensor(block)
    assert scale == mx_scale_ref(max(abs(v) for v in block), MX_EMAX[fmt])
    qw = quantize_weight(w, WeightSpec.build(fmt))
    assert qw.scale[1, 1].item() == scale
    assert qw.codes()[1, 32 : 32 + len(block)].tolist() == values
    got = fake_quantize_weight(w, WeightSpec.build(fmt))
    assert got[1, 32 : 32 + len(block)].tolist() == [v * scale for v in values]
    assert torch.equal(got, qw.dequantize())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [-1, 32])
def test_symmetric_int_equals_compressed_tensors(bits, group):
    """ptq: s = 2 max|x| / (2^b - 1), codes 0..2^b-1 around z = 2^(b-1). compressed-tensors: signed codes
    -2^(b-1)..2^(b-1)-1, s = max|x| / ((2^b - 1) / 2). The same grid; both scales are one correctly
    rounded division of the same real number, so they are equal, and so are the values."""
    CT = ct()
    w = make_weight(16, 128, seed=6)
    strategy = {"strategy": "channel"} if group == -1 else {"strategy": "group", "group_size": group}
    args = CT.Args(num_bits=bits, type="int", symmetric=True, **strategy)
    blocks = w.reshape(16, -1, w.shape[1] if group == -1 else group)
    scale, zero = CT.calculate_qparams(blocks.amin(dim=-1), blocks.amax(dim=-1), args)
    spec = WeightSpec.build("int", bits=bits, group_size=group, sym=True)
    qw = quantize_weight(w, spec)
    assert torch.equal(qw.scale, scale)
    assert torch.equal(qw.zero, torch.full_like(qw.scale, 2 ** (bits - 1)))
    assert_same_bits(fake_quantize_weight(w, spec), CT.fake_quantize(w, scale, zero, args))
    codes = CT.quantize(w, scale, zero, args)
    assert torch.equal(qw.codes() - 2 ** (bits - 1), codes)
    assert codes.min() == -(2 ** (bits - 1))  # the most negative value uses the extra negative code


def test_asymmetric_int4_groups_equal_compressed_tensors():
    """The same grid: both take [min(x, 0), max(x, 0)] / 15 as the scale; CT's zero point is
    round(-8 - min / s) on signed codes -8..7, ptq's round(-min / s) on 0..15, i.e. CT's + 8. CT adds its
    (fp32) zero point before rounding x / s, ptq after, which could differ at a value within an fp32 ulp of
    a .5 tie; no such value occurs in practice (none in 16 x 256 random weights)."""
    CT = ct()
    w = make_weight(16, 256, seed=7) + 0.3 * torch.rand(16, 1)  # off-centre rows
    args = CT.Args(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    blocks = w.reshape(16, 8, 32)
    scale, zero = CT.calculate_qparams(blocks.amin(dim=-1), blocks.amax(dim=-1), args)
    spec = WeightSpec.build("int", bits=4, group_size=32, sym=False)
    qw = quantize_weight(w, spec)
    assert torch.equal(qw.scale, scale)
    assert torch.equal(qw.zero - 8, zero.float())
    assert (qw.zero != 8).any()
    # Numerically equal; not bit for bit: where round(x / s) is -0.0, ptq's clamp(...) * s keeps the sign
    # of zero while CT's (q - zp) * s gives +0.0.
    assert torch.equal(fake_quantize_weight(w, spec), CT.fake_quantize(w, scale, zero, args))
    assert torch.equal(qw.codes() - 8, CT.quantize(w, scale, zero, args))


# 3. E2M1.


def test_e2m1_representable_values():
    element = FORMATS["nvfp4"].element
    assert element is FORMATS["mxfp4"].element
    assert element.values.tolist() == E2M1_VALUES
    grid = torch.tensor(E2M1_VALUES)
    both = torch.cat([grid, -grid])
    assert torch.equal(element.round(both), both)
    assert torch.equal(element.round(both.double()), both.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_e2m1_ties_to_even_and_saturation(dtype):
    element = FORMATS["nvfp4"].element
    table = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0, 7.0: 6.0}
    table |= {0.2: 0.0, 0.26: 0.5, 0.74: 0.5, 1.3: 1.5, 2.6: 3.0, 4.9: 4.0, 5.1: 6.0, 6.0: 6.0, 1e30: 6.0}
    x = torch.tensor(list(table), dtype=dtype)
    want = torch.tensor(list(table.values()), dtype=dtype)
    assert torch.equal(element.round(x), want)
    assert torch.equal(element.round(-x), -want)  # sign preserved
    assert torch.signbit(element.round(torch.tensor([-0.1], dtype=dtype))).all()


def test_e2m1_random_values_equal_independent_rounding_and_compressed_tensors():
    CT = ct()
    element = FORMATS["nvfp4"].element
    g = torch.Generator().manual_seed(8)
    x = torch.randn(20000, generator=g) * 3
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    x = torch.cat([x, ties, -ties])
    want = e2m1_ref(x)
    assert torch.equal(element.round(x), want)
    assert torch.equal(element.round(x.double()), want.double())
    # compressed-tensors' thresholds (cast_to_fp4, the CPU path) after its clamp to [-6, 6].
    assert torch.equal(CT.cast_to_fp4(x.clamp(-6, 6)), want)


def test_e2m1_nibble_encoding_round_trips():
    fmt = FORMATS["nvfp4"]
    grid = torch.tensor(E2M1_VALUES)
    values = torch.cat([grid, -grid[1:]])
    nibbles = fmt.encode(values)
    assert nibbles.dtype == torch.uint8
    # sign << 3 | magnitude index
    assert nibbles.tolist() == list(range(8)) + list(range(9, 16))
    assert torch.equal(fmt.decode(nibbles), values)
    decoded = fmt.decode(torch.arange(16, dtype=torch.uint8))
    assert decoded.tolist() == E2M1_VALUES + [-v for v in E2M1_VALUES]
    # 0b1000 is E2M1's negative zero; it decodes to -0.0 and re-encodes as +0 (the same number).
    assert torch.equal(fmt.encode(decoded), torch.tensor(list(range(8)) + [0] + list(range(9, 16)), dtype=torch.uint8))
    w = make_weight(8, 64, seed=9)
    qw = quantize_weight(w, WeightSpec.build("nvfp4"))
    assert qw.qweight.dtype == torch.uint8 and int(qw.qweight.max()) <= 15
    assert torch.equal(fmt.encode(qw.codes()), qw.qweight)


# 4. Edge cases, every format.


def spec_for(fmt: str) -> WeightSpec:
    return WeightSpec.build(fmt, group_size=32) if fmt == "int" else WeightSpec.build(fmt)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_zero_rows_and_blocks_dequantize_to_exact_zeros(fmt):
    spec = spec_for(fmt)
    w = make_weight(8, 64, seed=10)
    w[3] = 0.0
    w[5, 32:] = 0.0
    qw = quantize_weight(w, spec)
    assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all()
    for got in (qw.dequantize(), fake_quantize_weight(w, spec)):
        assert torch.isfinite(got).all()
        assert torch.equal(got[3], torch.zeros(64)) and torch.equal(got[5, 32:], torch.zeros(32))
    zeros = torch.zeros(4, 64)
    qz = quantize_weight(zeros, spec)
    assert torch.isfinite(qz.scale).all() and (qz.scale > 0).all()
    assert qz.tensor_scale is None or torch.isfinite(qz.tensor_scale)
    assert torch.equal(qz.dequantize(), zeros) and torch.equal(fake_quantize_weight(zeros, spec), zeros)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8", "fp8_e4m3", "int"])
def test_partial_last_block_scale_comes_from_its_real_columns(fmt):
    """40 columns: NVFP4 blocks 16 + 16 + 8, MX 32 + 8, int / fp8 groups of 32: 32 + 8. The last 8 columns
    are far smaller than the rest, so a scale borrowed from elsewhere would show."""
    spec = WeightSpec.build(fmt, group_size=32 if fmt in ("int", "fp8_e4m3") else None, sym=None)
    w = make_weight(6, 40, seed=11, decades=(0, 1))
    w[:, -8:] *= 1e-2
    last = w[:, -8:]
    amax = last.abs().amax(dim=1, keepdim=True)
    if fmt == "nvfp4":
        g = 448.0 * 6.0 / w.abs().amax()
        scale = e4m3_ref(amax / 6.0 * g) / g
        want = e2m1_ref(last / scale) * scale
    elif fmt in MX_EMAX:
        scale = torch.tensor([[mx_scale_ref(a, MX_EMAX[fmt])] for a in amax.flatten().tolist()])
        want = (e2m1_ref(last / scale) if fmt == "mxfp4" else e4m3_ref(last / scale)) * scale
    elif fmt == "fp8_e4m3":
        scale = amax / 448.0
        want = fp8_ref(last, scale, torch.float8_e4m3fn)
    else:
        xmin, xmax = last.amin(dim=1, keepdim=True).clamp(max=0), last.amax(dim=1, keepdim=True).clamp(min=0)
        scale = (xmax - xmin) / 15
        zero = torch.round(-xmin / scale)
        want = scale * (torch.clamp(torch.round(last / scale) + zero, 0, 15) - zero)
    qw = quantize_weight(w, spec)
    assert qw.scale.shape[1] == (3 if fmt == "nvfp4" else 2)
    assert torch.equal(qw.scale[:, -1:], scale)
    assert torch.equal(qw.dequantize()[:, -8:], want)
    assert torch.equal(fake_quantize_weight(w, spec)[:, -8:], want)
    assert (want != 0).float().mean() > 0.5  # the small block is represented, not flushed


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_fp32_subnormal_values_next_to_normal_ones(fmt):
    spec = spec_for(fmt)
    w = make_weight(4, 64, seed=12)
    w[1, ::3] = torch.tensor(1e-40)  # fp32 subnormals in rows with normal values: they round to 0
    w[2, :32] = -1e-42
    want = fake_quantize_weight(w, spec)
    qw = quantize_weight(w, spec)
    assert torch.isfinite(want).all() and torch.isfinite(qw.scale).all()
    assert torch.equal(qw.dequantize(), want)
    assert (want[1, ::3].abs() <= 1e-40).all()


# NVFP4's global scale 448 * 6 / amax overflows fp32 once max|W| < 2688 / FLT_MAX ~ 7.9e-36 (an all-tiny
# tensor): it must then be 1, as compressed-tensors' generate_gparam makes it, not inf (which made the block
# scales 0 and every exact zero NaN before FloatFormat.tensor_scale guarded it).
@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("amax", [1e-37, 1e-40])
def test_all_tiny_weight_stays_finite(fmt, amax):
    spec = spec_for(fmt)
    w = torch.zeros(2, 32)
    w[0, :4] = torch.tensor([amax, -amax / 2, amax / 3, 0.0])
    got = fake_quantize_weight(w, spec)
    assert torch.isfinite(got).all(), got
    qw = quantize_weight(w, spec)
    assert qw.tensor_scale is None or torch.isfinite(qw.tensor_scale)
    assert torch.equal(qw.dequantize(), got)
    assert (got - w).abs().max() <= amax
    assert torch.equal(got[1], torch.zeros(32))


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_weights_are_refused(fmt, bad):
    w = make_weight(4, 64, seed=13)
    w[2, 7] = bad
    with pytest.raises(ValueError, match="non-finite"):
        quantize_weight(w, spec_for(fmt))


# 5. Activations.


def test_fp8_dynamic_per_token_equals_torch_cast():
    g = torch.Generator().manual_seed(14)
    x = torch.randn(3, 7, 96, generator=g) * 10 ** torch.linspace(-6, 3, 21).reshape(3, 7, 1)
    x[0, 0, 5] = 1e-30  # far below the token's range: E4M3 subnormal or 0
    x[1, 2] = 0.0
    got = ActSpec.build("fp8_e4m3").quantize_dynamic(x)
    tokens = x.reshape(-1, 96)
    s = tokens.abs().amax(dim=1, keepdim=True) / 448.0
    want = fp8_ref(tokens, s, torch.float8_e4m3fn).reshape(x.shape)
    live = torch.ones(3, 7, dtype=torch.bool)
    live[1, 2] = False
    assert_same_bits(got[live], want[live])
    assert torch.equal(got[1, 2], torch.zeros(96))  # an all-zero token: zeros, not NaN


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int"])
def test_static_per_tensor_activations_saturate_beyond_the_calibrated_range(fmt):
    spec = ActSpec.build(fmt, granularity="per_tensor")
    scale = spec.static_scale(torch.tensor(2.0))
    qmax = 448.0 if fmt == "fp8_e4m3" else 127.0
    assert scale.item() == torch.tensor(2.0 / qmax, dtype=torch.float32).item()
    x = torch.tensor([[0.0, 0.3, -1.0, 1.999, 2.5, -3.0, 100.0, -1e6]])
    got = spec.quantize_static(x, scale)
    if fmt == "fp8_e4m3":
        want = fp8_ref(x, scale, torch.float8_e4m3fn)
    else:
        want = torch.clamp(torch.round(x / scale), -127, 127) * scale
    assert_same_bits(got, want)
    assert torch.equal(got[0, 4:].abs(), torch.full((4,), qmax) * scale)
    assert got[0, 4:].abs().max() <= 2.0 * (1 + 1e-6)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8"])
def test_block_activations_equal_the_weight_quantizer(fmt):
    """48 features: NVFP4 blocks 3 x 16, MX 32 + a partial 16. NVFP4's global scale is the calibrated
    one (``static_scale`` of a max|x| seen in calibration), not this input's own."""
    g = torch.Generator().manual_seed(15)
    x = torch.randn(2, 5, 48, generator=g) * 10 ** torch.linspace(-3, 2, 10).reshape(2, 5, 1)
    spec = ActSpec.build(fmt)
    calibrated = spec.static_scale(torch.tensor(250.0)) if fmt == "nvfp4" else None
    got = spec.quantize_dynamic(x, calibrated)
    want = fake_quantize_weight(x.reshape(10, 48), WeightSpec.build(fmt), calibrated).reshape(x.shape)
    assert_same_bits(got, want)
    assert spec.calibrated == (fmt == "nvfp4")
    if fmt == "nvfp4":
        assert calibrated.item() == pytest.approx(448 * 6 / 250.0)
        with pytest.raises(ValueError, match="calibrated global scale"):
            spec.quantize_dynamic(x)


def test_nvfp4_activations_equal_compressed_tensors_dynamic_blocks():
    CT = ct()
    g = torch.Generator().manual_seed(16)
    x = torch.randn(12, 64, generator=g) * 10 ** torch.linspace(-2, 2, 12).reshape(12, 1)
    args = CT.schemes.NVFP4["input_activations"]  # dynamic "local": block scales per call, global given
    gscale = CT.generate_gparam(x.min(), x.max())
    scale, zero = CT.compute_dynamic_scales_and_zp(x, args, module=None, global_scale=gscale)
    want = CT.fake_quantize(x, scale, zero, args, global_scale=gscale)
    spec = ActSpec.build("nvfp4")
    assert_same_bits(spec.quantize_dynamic(x, spec.static_scale(x.abs().amax())), want)


# 6. Storage.


@pytest.mark.parametrize(
    ("fmt", "bits_per_weight"),
    [
        ("nvfp4", 4 + 8 / 16 + 32 / (256 * 512)),  # E2M1 + an E4M3 scale per 16 + one fp32 global scale
        ("mxfp4", 4 + 8 / 32),  # E2M1 + an E8M0 scale per 32
        ("mxfp8", 8 + 8 / 32),
        ("fp8_e4m3", 8 + 32 / 512),  # one fp32 scale per output channel
        ("fp8_e5m2", 8 + 32 / 512),
    ],
)
def test_effective_bits_per_weight(fmt, bits_per_weight):
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(512, 256, bias=False))
    count = StorageCount()
    count.add("lin", quantize_weight(make_weight(256, 512, seed=17), WeightSpec.build(fmt)))
    summary = count.summary(model)
    assert summary["bits_per_weight"] == pytest.approx(bits_per_weight, rel=1e-12)
    assert summary["other_params"] == 0
