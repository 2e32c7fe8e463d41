"""The Triton kernels (``ptq.quant.kernels``) against dequantize-then-matmul, over odd shapes.

On CUDA they run as compiled kernels (bf16 activations; marked ``gpu``). Without CUDA the same checks run
in Triton's interpreter (fp32, on the CPU) in a child process, since the interpreter is chosen when the
kernels are defined."""

import os

import pytest
import torch

from ptq.quant import WeightSpec, quantize_weight
from ptq.quant.weight import QuantizedWeight
from tests.conftest import run_interpreted

triton = pytest.importorskip("triton", reason="Triton is not installed (it comes with CUDA builds of torch)")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
TOLERANCE = 1e-2 if ON_GPU else 1e-5  # relative error of the output: bf16 rounding on the GPU, fp32 order here
ROWS = [1, 7, 16, 33, 65] if INTERPRETED else [1, 7, 16, 33, 64, 2048]

needs_kernels = pytest.mark.skipif(
    not (ON_GPU or INTERPRETED), reason="without CUDA: run by test_kernels_in_triton_interpreter in a child process"
)


@pytest.mark.skipif(ON_GPU or INTERPRETED, reason="the interpreter's run of this file (CPU machines only)")
def test_kernels_in_triton_interpreter():
    run_interpreted("-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, timeout=900)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def act_order_weight(weight: torch.Tensor, spec: WeightSpec, seed: int = 0) -> QuantizedWeight:
    """RTN with groups over a random permutation of the columns (what GPTQ's act-order stores)."""
    in_features = weight.shape[1]
    perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
    permuted = quantize_weight(weight[:, perm], spec)
    inverse = torch.argsort(perm)
    g_idx = (torch.arange(in_features) // spec.group_size)[inverse].to(torch.int32)
    return QuantizedWeight(permuted.qweight[:, inverse].contiguous(), permuted.scale, permuted.zero, g_idx, spec)


def candidates_to_run(configs: list) -> list:
    """The candidate tiles to run here. In the interpreter a PREFETCH tile computes as the same tile without it
    (its L2 prefetch is PTX, a no-op there), so there only the first runs (its prefetch addresses and masks are
    still built); CUDA runs them all."""
    from ptq.quant import kernels

    first = next((c for c in configs if kernels.PREFETCH in c), None)
    return [c for c in configs if not INTERPRETED or kernels.PREFETCH not in c or c == first]


def inputs(rows: int, in_features: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed)).to(DEVICE, DTYPE)


@needs_kernels
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(
    "case",
    [("asym-g128", 128, False, False), ("sym-g128", 128, True, False), ("asym-g64", 64, False, False),
     ("act-order-g64", 64, False, True), ("per-channel", -1, True, False), ("g32-gathered", 32, False, False)],
)  # fmt: skip
def test_int4_layer_matches_dequantize_then_matmul(rows, case):
    """K = 320: not a multiple of 128-wide tiles, and a partial last group of 128."""
    from ptq.quant.linear import QuantLinear

    _, group, sym, act_order = case
    spec = WeightSpec("int", 4, group, sym)
    weight = torch.randn(96, 320, generator=torch.Generator().manual_seed(0))
    qw = act_order_weight(weight, spec) if act_order else quantize_weight(weight, spec)
    bias = torch.randn(96, generator=torch.Generator().manual_seed(2))
    layer = QuantLinear.from_quantized(qw, bias, DTYPE).to(DEVICE)
    x = inputs(rows, 320)
    want = x.float() @ layer.dequantized_weight(torch.float32).t() + bias.to(DEVICE)
    assert relative_error(layer(x), want) < TOLERANCE


@needs_kernels
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("group", [64, 128])
def test_act_order_layer_in_group_order_takes_the_contiguous_kernels(rows, group):
    """sort_groups (for inference): act-order's scattered groups stored in group order (K = 320: with groups of
    128 the last is partial); the layer gathers x and computes through the contiguous-group kernels."""
    from ptq.quant.linear import QuantLinear

    weight = torch.randn(96, 320, generator=torch.Generator().manual_seed(0))
    qw = act_order_weight(weight, WeightSpec("int", 4, group, False))
    layer = QuantLinear.from_quantized(qw, None, DTYPE).to(DEVICE)
    x = inputs(rows, 320)
    want = x.float() @ layer.dequantized_weight(torch.float32).t()
    assert layer.sort_groups()
    assert relative_error(layer(x), want) < TOLERANCE
    assert layer._plain_groups  # the kernels saw contiguous groups


@needs_kernels
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_w8a8_layers_match_their_exact_product(rows, fmt):
    """The codes the layers give the activations (per token) and the weights (per channel), multiplied
    exactly: the kernel's rounding is the reference's."""
    from ptq.quant.linear import Fp8Linear, Int8Linear

    cls = Int8Linear if fmt == "int8" else Fp8Linear
    weight = torch.randn(80, 200, generator=torch.Generator().manual_seed(0))
    layer = cls.from_weight(weight, None).to(DEVICE)
    x = inputs(rows, 200)
    assert relative_error(layer(x), exact_w8a8_product(layer, x, fmt)) < TOLERANCE


@pytest.mark.parametrize("rows", [1, 20])
def test_int8_layer_in_fp32_takes_any_shape(rows):
    """fp32 activations take the library's int8 product (not the kernels), which on CUDA wants K and N in
    multiples of 8: an odd-sized layer (stories260K's MLP) still computes the exact product."""
    from ptq.quant.linear import Int8Linear

    weight = torch.randn(172, 90, generator=torch.Generator().manual_seed(0))
    layer = Int8Linear.from_weight(weight, None).to(DEVICE)
    x = torch.randn(rows, 90, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert relative_error(layer(x), exact_w8a8_product(layer, x, "int8")) < 1e-6


def exact_w8a8_product(layer, x: torch.Tensor, fmt: str) -> torch.Tensor:
    """The product of the codes a W8A8 layer gives the activations (per token) and holds for the weights (per
    channel), in float64: what the kernels must compute up to their output's rounding."""
    qmax = 127.0 if fmt == "int8" else 448.0
    x_scale = (x.float().abs().amax(dim=1, keepdim=True) / qmax).clamp(min=1e-12)
    if fmt == "int8":
        qx = torch.round(x.float() / x_scale)
    else:
        qx = (x.float() / x_scale).clamp(-qmax, qmax).to(torch.float8_e4m3fn).float()
    return (qx.double() @ layer.dequantized_weight(torch.float32).double().t() * x_scale.double()).float()


@needs_kernels
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_layers_match_dequantize_then_matmul(rows, fmt):
    """K = 200: a partial last block for both formats (16 and 32), and an even byte count."""
    from ptq.quant.linear import CompactLinear

    weight = torch.randn(72, 200, generator=torch.Generator().manual_seed(0))
    layer = CompactLinear(quantize_weight(weight, WeightSpec.build(fmt)), None, DTYPE).to(DEVICE)
    assert layer.uses_fp4_kernel()
    x = inputs(rows, 200)
    want = x.float() @ layer.dequantized_weight(torch.float32).t()
    assert relative_error(layer(x), want) < TOLERANCE


@needs_kernels
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_dequantize_kernel_gives_the_stored_weight(fmt):
    """The many-token path's dequantize kernel, element for element: K = 201 (odd: the last byte's high nibble
    is padding), rows and byte columns that are not whole tiles, and every element's own block scale (to an
    fp32 ulp)."""
    from ptq.quant import kernels
    from ptq.quant.linear import CompactLinear

    weight = torch.randn(45, 201, generator=torch.Generator().manual_seed(0))
    layer = CompactLinear(quantize_weight(weight, WeightSpec.build(fmt)), None, DTYPE).to(DEVICE)
    group = layer.spec.group_size_for(layer.in_features)
    kind = kernels.SCALE_E4M3 if fmt == "nvfp4" else kernels.SCALE_E8M0
    got = kernels.dequantize_fp4(layer.codes, layer.scale, layer.tensor_scale, 201, group, kind, torch.float32)
    # NVFP4's scale is E4M3 over the global scale, which the kernel and the reference round in another order
    torch.testing.assert_close(got, layer.dequantized_weight(torch.float32), rtol=3e-7, atol=0)


@needs_kernels
@pytest.mark.parametrize("weight_kind", ["int4", "w8", "fp4"])
def test_every_candidate_tile_computes_the_same_product(weight_kind):
    """Each tile shape the tuner may choose gives the product, split-K's last-arrival reduction included,
    and gives it again on the next call."""
    from ptq.quant import kernels
    from ptq.quant.linear import CompactLinear, Int8Linear, QuantLinear

    weight = torch.randn(128, 512, generator=torch.Generator().manual_seed(0))
    x = inputs(3, 512)
    if weight_kind == "int4":
        layer = QuantLinear.from_quantized(quantize_weight(weight, WeightSpec("int", 4, 128, False)), None, DTYPE)
        layer = layer.to(DEVICE)
        args = (layer.qweight, layer.scales, 128, 512, (layer.qweight.stride(0), layer.scales.stride(0)), 128)
        kw = dict(zero=layer.qzeros, g_idx=None, tensor_scale=None, weight=kernels.INT4, act=0, scale_kind=0)
        want = x.float() @ layer.dequantized_weight(torch.float32).t()
    elif weight_kind == "w8":
        layer = Int8Linear.from_weight(weight, None).to(DEVICE)
        args = (layer.weight, layer.weight_scale, 128, 512, (512, 0), 0)
        kw = dict(zero=None, g_idx=None, tensor_scale=None, weight=kernels.W8, act=0, scale_kind=0)
        want = x.float() @ layer.dequantized_weight(torch.float32).t()
    else:
        layer = CompactLinear(quantize_weight(weight, WeightSpec.build("nvfp4")), None, DTYPE).to(DEVICE)
        args = (layer.codes, layer.scale, 128, 512, (layer.codes.stride(0), layer.scale.stride(0)), 16)
        kw = dict(zero=None, g_idx=None, tensor_scale=layer.tensor_scale, weight=kernels.FP4, act=0, scale_kind=0)
        want = x.float() @ layer.dequantized_weight(torch.float32).t()
    w, scale, n, k, strides, group = args
    for gemv, candidates in ((False, kernels.CANDIDATES), (True, kernels.GEMV_CANDIDATES)):
        rows = slice(0, 1) if gemv else slice(None)
        for config in candidates_to_run(candidates[kw["weight"]]):
            mma_kind = (kw["weight"], kw["scale_kind"])
            if kernels.MMA in config and not kernels.mma_applies(config, x[rows], w, scale, n, k, group, *mma_kind):
                continue  # test_int4_mma_tiles_over_odd_shapes and test_fp4_mma_tiles_over_odd_shapes run them
            g_idx = kw["g_idx"]
            if gemv and weight_kind == "int4" and kernels.COLUMNS not in config:  # the gathering kernel reads g_idx
                g_idx = (torch.arange(k, device=DEVICE) // group).to(torch.int32)
            launch = (config, x[rows], w, scale, kw["zero"], g_idx, kw["tensor_scale"], n, k, strides, group,
                      kw["weight"], kw["act"], g_idx is not None, kw["scale_kind"], gemv)  # fmt: skip
            got = kernels._launch(*launch)
            assert relative_error(got, want[rows]) < TOLERANCE, (gemv, config)
            again = kernels._launch(*launch)
            assert torch.equal(again, got), (gemv, config)  # split-K's counters were left at zero for the next call
    assert not kernels._counters[x.device].any()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="Gluon kernels run on CUDA only (the interpreter does not run them)")
@pytest.mark.parametrize("group,sym,dtype", [(128, False, torch.bfloat16), (128, True, torch.float16),
                                             (64, False, torch.bfloat16)])  # fmt: skip
def test_int4_mma_tiles_over_odd_shapes(group, sym, dtype):
    """Every MMA tile (ptq.quant.int4_mma: codes decoded into mma.sync's operand registers) against
    dequantize-then-matmul: rows 1, 7 and 33 (row blocks of 16 and 32, rows past M clamped), 16 or 32 groups split
    every way the table holds, both activation dtypes; again on the next call (split-K's counters reset)."""
    from ptq.quant import kernels
    from ptq.quant.linear import QuantLinear

    n, k = 768, 2048
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(group))
    layer = QuantLinear.from_quantized(quantize_weight(weight, WeightSpec("int", 4, group, sym)), None, dtype)
    layer = layer.to(DEVICE)
    w_t = layer.dequantized_weight(torch.float32).t()
    ran = 0
    for rows in (1, 7, 33):
        x = inputs(rows, k).to(dtype)
        want = x.float() @ w_t
        for config in kernels.CANDIDATES[kernels.INT4]:
            applies = kernels.MMA in config and kernels.mma_applies(config, x, layer.qweight, layer.scales, n, k, group)
            if not applies:
                continue
            launch = (config, x, layer.qweight, layer.scales, layer.qzeros, None, None, n, k,
                      (layer.qweight.stride(0), layer.scales.stride(0)), group, kernels.INT4, 0, False, 0)  # fmt: skip
            got = kernels._launch(*launch)
            assert got.dtype == dtype and relative_error(got, want) < TOLERANCE, (rows, config)
            assert torch.equal(kernels._launch(*launch), got), (rows, config)
            ran += 1
    assert ran == 3 * sum(kernels.MMA in c for c in kernels.CANDIDATES[kernels.INT4])
    assert not kernels._counters[x.device].any()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="Gluon kernels run on CUDA only (the interpreter does not run them)")
def test_fp4_mma_tiles_over_odd_shapes():
    """Every NVFP4 MMA tile (ptq.quant.fp4_mma: E2M1 pairs decoded and scaled into mma.sync's operand registers)
    against dequantize-then-matmul: rows 1, 7 and 33 (row blocks of 16 and 32, rows past M clamped), 4096 inputs split
    every way the table holds, with loads into registers or through the shared-memory ring; again on the next call
    (split-K's counters reset). The blocks' magnitudes span 10^5,
    so their E4M3 scales run from subnormal to 448; a second product sees only the smallest blocks (x zero elsewhere),
    which the first one's error would hide. MXFP4 and fp16 activations keep the other tiles."""
    from ptq.quant import kernels
    from ptq.quant.linear import CompactLinear

    n, k = 512, 4096
    gen = torch.Generator().manual_seed(3)
    block_magnitude = torch.logspace(-3, 2, k // 16)[torch.randperm(k // 16, generator=gen)]
    column_magnitude = block_magnitude.repeat_interleave(16)
    weight = torch.randn(n, k, generator=gen) * column_magnitude
    layer = CompactLinear(quantize_weight(weight, WeightSpec.build("nvfp4")), None, torch.bfloat16).to(DEVICE)
    assert (layer.scale.float() < 2**-6).any() and (layer.scale.float() > 256).any()  # subnormal E4M3 to large
    w_t = layer.dequantized_weight(torch.float32).t()
    small = (column_magnitude < 1e-2).to(DEVICE)
    ran = 0
    for rows in (1, 7, 33):
        for x in (inputs(rows, k).to(torch.bfloat16), inputs(rows, k).to(torch.bfloat16) * small):
            want = x.float() @ w_t
            for config in kernels.FP4_MMA + kernels.FP4_MMA_RING:
                assert kernels.mma_applies(config, x, layer.codes, layer.scale, n, k, 16, kernels.FP4), config
                launch = (config, x, layer.codes, layer.scale, None, None, layer.tensor_scale, n, k,
                          (layer.codes.stride(0), layer.scale.stride(0)), 16, kernels.FP4, 0, False,
                          kernels.SCALE_E4M3, rows == 1)  # fmt: skip
                got = kernels._launch(*launch)
                assert got.dtype == torch.bfloat16 and relative_error(got, want) < TOLERANCE, (rows, config)
                assert torch.equal(kernels._launch(*launch), got), (rows, config)
                ran += 1
    assert ran == 6 * len(kernels.FP4_MMA + kernels.FP4_MMA_RING)
    assert not kernels._counters[x.device].any()


@needs_kernels
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_every_w8a8_tile_gives_the_exact_product_of_the_codes(fmt, rows):
    """Every W8A8 tile the tuner may choose (one token: float or int32 sums, activations rounded inside or
    quantized first, the few-token tile's 8-bit dots; few tokens: rounded inside or the codes multiplied on the
    8-bit tensor cores) against the exact product of the codes the layer gives the activations, per token."""
    from ptq.quant import kernels
    from ptq.quant.linear import Fp8Linear, Int8Linear

    cls, act = (Int8Linear, kernels.ACT_INT8) if fmt == "int8" else (Fp8Linear, kernels.ACT_FP8)
    layer = cls.from_weight(torch.randn(96, 1000, generator=torch.Generator().manual_seed(0)), None).to(DEVICE)
    x = inputs(rows, 1000)
    want = exact_w8a8_product(layer, x, fmt)
    candidates = (kernels.GEMV_CANDIDATES if rows == 1 else kernels.CANDIDATES)[kernels.W8]
    assert any(kernels.CODES in config for config in candidates)
    launch = (layer.weight, layer.weight_scale.reshape(-1), None, None, None, 96, 1000, (1000, 0), 0, kernels.W8, act,
              False, 0, rows == 1)  # fmt: skip
    qx, x_scale = kernels._quantize_rows(x, act)
    for config in candidates_to_run(candidates):
        got = kernels._launch(config, x, *launch)
        assert relative_error(got, want) < TOLERANCE, config
        if kernels.CODES in config and kernels._w8_variant_applies(config, act, layer.weight):
            # the same tile given the codes (codes_matmul's path): the same bits
            given = kernels._launch(config, qx, *launch, x_scale=x_scale.reshape(-1), out_dtype=x.dtype)
            assert torch.equal(given, got), config


@needs_kernels
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_tiles_that_round_one_long_row_give_the_codes_products_bits(fmt):
    """One token over more than one of the ROUNDS tiles' scale loads (K > 8192): each program finds the row's scale
    and rounds its tiles to the codes ``_quantize_rows`` writes, so the product is the given codes' to the bit."""
    from ptq.quant import kernels
    from ptq.quant.linear import Fp8Linear, Int8Linear

    cls, act = (Int8Linear, kernels.ACT_INT8) if fmt == "int8" else (Fp8Linear, kernels.ACT_FP8)
    n, k = 72, 8192 + 1000
    layer = cls.from_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(0)), None).to(DEVICE)
    x = inputs(1, k)
    x[0, 8500] = 40.0  # the row's largest value lies in its second scale load
    want = exact_w8a8_product(layer, x, fmt)
    launch = (layer.weight, layer.weight_scale.reshape(-1), None, None, None, n, k, (k, 0), 0, kernels.W8, act, False,
              0, True)  # fmt: skip
    qx, x_scale = kernels._quantize_rows(x, act)
    configs = [c for c in kernels.GEMV_CANDIDATES[kernels.W8] if kernels.ROUNDS in c
               and kernels._w8_variant_applies(c, act, layer.weight)]  # fmt: skip
    assert configs
    for config in configs:
        got = kernels._launch(config, x, *launch)
        assert relative_error(got, want) < TOLERANCE, config
        given = kernels._launch(config, qx, *launch, x_scale=x_scale.reshape(-1), out_dtype=x.dtype)
        assert torch.equal(given, got), config


@needs_kernels
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_codes_matmul_takes_activations_rounded_by_torch_ops(fmt, rows):
    """What a compiled W8A8 layer computes for few tokens: the activations rounded by torch ops (the layer's
    int8_rows / fp8_rows, which inductor fuses) and the tuned CODES tile given those codes, against the exact
    product of the same codes."""
    from ptq.quant import kernels
    from ptq.quant.linear import Fp8Linear, Int8Linear, fp8_rows, int8_rows

    cls, act, rounding = (Int8Linear, kernels.ACT_INT8, int8_rows) if fmt == "int8" else (Fp8Linear, kernels.ACT_FP8,
                                                                                          fp8_rows)  # fmt: skip
    layer = cls.from_weight(torch.randn(96, 1000, generator=torch.Generator().manual_seed(0)), None).to(DEVICE)
    x = inputs(rows, 1000)
    qx, x_scale = rounding(x)
    assert torch.equal(qx, kernels._quantize_rows(x, act)[0])  # the torch ops round as the kernel does
    got = kernels.codes_matmul(qx, x_scale, layer.weight, layer.weight_scale, 96, 1000, act, x.dtype)
    assert got.dtype == x.dtype and got.shape == (rows, 96)
    assert relative_error(got, exact_w8a8_product(layer, x, fmt)) < TOLERANCE


@needs_kernels
@pytest.mark.parametrize("even", [False, True])
@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8", "nvfp4", "mxfp4"])
def test_one_token_kernels_over_several_k_tiles(fmt, even):
    """The one-token kernels that read whole columns (INT4) or rows (W8, FP4) of the weight, every candidate,
    over several K tiles and split-K: K = 4640 partial in N, K, the group and the tiles; or even (the unmasked
    path: N a multiple of every tile's columns, K of its K tile). W8A8 against the exact product of the
    layer's codes."""
    from ptq.quant import kernels
    from ptq.quant.linear import CompactLinear, Fp8Linear, Int8Linear, QuantLinear

    n, k = ((1024 if fmt == "int4" else 32), 4096) if even else (96, 4640)

    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    x = inputs(1, k)
    act = kernels.ACT_NONE
    if fmt == "int4":
        layer = QuantLinear.from_quantized(quantize_weight(weight, WeightSpec("int", 4, 128, False)), None, DTYPE)
        layer = layer.to(DEVICE)
        args = (layer.qweight, layer.scales, layer.qzeros, None, (layer.qweight.stride(0), layer.scales.stride(0)), 128)
        kind, marker, want = kernels.INT4, kernels.COLUMNS, x.float() @ layer.dequantized_weight(torch.float32).t()
    elif fmt in ("int8", "fp8"):
        cls, act, qmax = (Int8Linear, kernels.ACT_INT8, 127.0) if fmt == "int8" else (Fp8Linear, kernels.ACT_FP8, 448.0)
        layer = cls.from_weight(weight, None).to(DEVICE)
        args = (layer.weight, layer.weight_scale, None, None, (k, 0), 0)
        x_scale = (x.float().abs().amax(dim=1, keepdim=True) / qmax).clamp(min=1e-12)
        qx = torch.round(x.float() / x_scale) if fmt == "int8" else (x.float() / x_scale).to(torch.float8_e4m3fn)
        want = (qx.double() @ layer.dequantized_weight(torch.float32).double().t() * x_scale.double()).float()
        kind, marker = kernels.W8, kernels.ROWS
    else:
        layer = CompactLinear(quantize_weight(weight, WeightSpec.build(fmt)), None, DTYPE).to(DEVICE)
        block = 16 if fmt == "nvfp4" else 32
        strides = (layer.codes.stride(0), layer.scale.stride(0))
        args = (layer.codes, layer.scale, None, layer.tensor_scale, strides, block)
        kind, marker, want = kernels.FP4, kernels.ROWS, x.float() @ layer.dequantized_weight(torch.float32).t()
    w, scale, zero, tensor_scale, strides, group = args
    scale_kind = kernels.SCALE_E4M3 if fmt == "nvfp4" else kernels.SCALE_E8M0
    configs = [c for c in kernels.GEMV_CANDIDATES[kind] if marker in c]
    assert configs
    for config in candidates_to_run(configs):

        def run(config=config):
            return kernels._launch(config, x, w, scale, zero, None, tensor_scale, n, k, strides, group, kind, act,
                                   False, scale_kind, True)  # fmt: skip

        got = run()
        assert relative_error(got, want) < TOLERANCE, config
        assert torch.equal(run(), got), config  # split-K's counters were left at zero for the next call
    assert not kernels._counters[x.device].any()


@needs_kernels
@pytest.mark.parametrize("m,n,k", [(65, 96, 200), (130, 264, 512)])
def test_every_int8_gemm_tile_gives_the_library_products_bits(m, n, k):
    """ptq's one-pass int8 GEMM (every candidate tile, edges partial) against torch._int_mm and the scaling
    pass: int32 sums are exact and the scales are applied in the same order, so the outputs are equal."""
    from ptq.quant import kernels

    g = torch.Generator().manual_seed(m)
    qx = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(DEVICE)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(DEVICE)
    x_scale = (torch.rand(m, 1, generator=g) / 100).to(DEVICE)
    w_scale = (torch.rand(n, generator=g) / 100).to(DEVICE)
    exact = (qx.double() @ w.double().t()) * x_scale.double() * w_scale.double()
    want = kernels._launch_w8a8_gemm(kernels.LIBRARY, qx, x_scale, w, w_scale, DTYPE)
    assert relative_error(want, exact) < TOLERANCE
    for config in kernels.W8A8_GEMM_CANDIDATES:
        got = kernels._launch_w8a8_gemm(config, qx, x_scale, w, w_scale, DTYPE)
        assert torch.equal(got, want), config
    assert torch.equal(kernels.w8a8_matmul(qx, x_scale, w, w_scale, DTYPE), want)  # the tuned choice


@needs_kernels
@pytest.mark.parametrize("fast_accum", [False, True])
@pytest.mark.parametrize("m,n,k", [(65, 96, 200), (130, 272, 512)])  # 272, 512: torch._scaled_mm's shapes too
def test_every_fp8_gemm_tile_gives_the_product_of_the_codes(m, n, k, fast_accum, monkeypatch):
    """ptq's one-pass FP8 GEMM (every candidate tile, edges partial) against the exact product of the E4M3
    codes and their scales, and against torch._scaled_mm where it runs (CUDA, multiples of 16), summed either
    way (PTQ_FP8_FAST_ACCUM)."""
    from ptq.quant import kernels

    monkeypatch.setattr(kernels, "FP8_FAST_ACCUM", fast_accum)
    g = torch.Generator().manual_seed(m)
    qx = (torch.randn(m, k, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn).to(DEVICE)
    w = (torch.randn(n, k, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn).to(DEVICE)
    x_scale = (torch.rand(m, 1, generator=g) / 100).to(DEVICE)
    w_scale = (torch.rand(n, generator=g) / 100).to(DEVICE)
    exact = (qx.double() @ w.double().t()) * x_scale.double() * w_scale.double()
    args = (qx, x_scale, w, w_scale, DTYPE, fast_accum)
    outputs = {config: kernels._launch_w8a8_gemm(config, *args) for config in kernels.W8A8_GEMM_CANDIDATES}
    if ON_GPU and n % 16 == 0 and k % 16 == 0:
        outputs[kernels.LIBRARY] = kernels._launch_w8a8_gemm(kernels.LIBRARY, *args)
    outputs["tuned"] = kernels.w8a8_matmul(qx, x_scale, w, w_scale, DTYPE)
    for config, got in outputs.items():
        assert got.dtype == DTYPE and got.shape == (m, n), config
        assert relative_error(got, exact) < TOLERANCE, config


@needs_kernels
@pytest.mark.parametrize("rows", [5, 70])  # decode (each row in one tile) and prefill (tiles along the row)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantize_rows_gives_the_reference_codes(fmt, rows):
    from ptq.quant import kernels

    x = inputs(rows, 300)
    act, qmax = (kernels.ACT_INT8, 127.0) if fmt == "int8" else (kernels.ACT_FP8, 448.0)
    q, scale = kernels.quantize_rows(x, act)
    want_scale = (x.float().abs().amax(dim=1, keepdim=True) / qmax).clamp(min=1e-12)
    torch.testing.assert_close(scale, want_scale, rtol=0, atol=0)
    if fmt == "int8":
        assert torch.equal(q, torch.round(x.float() / want_scale).to(torch.int8))
    else:
        want = (x.float() / want_scale).clamp(-qmax, qmax).to(torch.float8_e4m3fn)
        assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))


def model_perplexity(model, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
    with torch.no_grad():
        logits = model(tokens).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    return logits, loss.exp().item()


@needs_kernels
@pytest.mark.parametrize("fmt", ["w4-g64", "w4-act-order", "w8a8", "fp8", "nvfp4", "mxfp4"])
def test_quantized_models_compute_through_the_kernels_what_the_dequantize_path_computes(tmp_path, monkeypatch, fmt):
    """A model of real quantized layers (a GPTQ checkpoint loaded back for INT4; the layers a compressed-tensors
    load builds for the rest) scores the same perplexity through the kernels as through dequantize-then-matmul,
    the path evaluation's fake quantization matches (tests/test_checkpoint.py), and each of its layers gives the
    same outputs both ways from the same inputs (prefill, few tokens, one token)."""
    import ptq
    from ptq.checkpoint import PackedStore, load_quantized
    from ptq.models import block_linears, get_blocks, get_weight
    from ptq.quant import ActSpec, kernels
    from ptq.quant.linear import StoredLayer, quantized_linear
    from ptq.recipe import Recipe
    from tests.test_checkpoint import packable_llama

    model = packable_llama()
    if fmt.startswith("w4"):
        options = {"gptq": {"act_order": True, "static_groups": False}} if fmt == "w4-act-order" else None
        recipe = Recipe.build("gptq", bits=4, group_size=64, options=options)
        store = PackedStore(recipe, tmp_path / "ckpt")
        calib = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))
        ptq.quantize(model, recipe, calib=calib, device="cpu", on_quantized=store.add, on_block_done=store.block_done)
        store.save(model, None)
        model = load_quantized(str(tmp_path / "ckpt"), DTYPE)
    else:
        specs = {"w8a8": (WeightSpec("int", 8, -1, True), ActSpec("int", 8, "per_token")),
                 "fp8": (WeightSpec("fp8_e4m3", 8, -1, True), ActSpec("fp8_e4m3", 8, "per_token")),
                 "nvfp4": (WeightSpec.build("nvfp4"), None), "mxfp4": (WeightSpec.build("mxfp4"), None)}  # fmt: skip
        weights, act = specs[fmt]
        for block in get_blocks(model):
            for name, linear in block_linears(model, block).items():
                layer = quantized_linear(quantize_weight(get_weight(linear), weights), linear.bias, DTYPE, act)
                block.set_submodule(name, layer)
        model = model.to(DTYPE)
    model = model.to(DEVICE)
    tokens = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    calls = []
    original = kernels.skinny_matmul
    monkeypatch.setattr(kernels, "skinny_matmul", lambda *a, **k: calls.append(a[0].shape[0]) or original(*a, **k))
    inputs = {"prefill": tokens, "few tokens": tokens[:, :8], "one token": tokens[:1, :2]}  # 80, 16 and 2 rows
    through_kernels = {name: model_perplexity(model, t) for name, t in inputs.items()}
    with torch.no_grad():  # one token per call, as decoding runs the linears
        one_row = model(tokens[:1, :1]).logits.float()
    assert {1, 2, 16} <= set(calls), calls  # the one-token and few-token kernels ran (prefill: cuBLAS after them)
    monkeypatch.setattr(kernels, "ENABLED", False)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, StoredLayer)}
    assert len(layers) == 14, list(layers)
    seen = {}  # per input and layer: what the layer took and gave on the dequantize path

    def watched(name):
        return [m.register_forward_hook(lambda m, a, y, key=(name, layer): seen.__setitem__(key, (a[0], y)))
                for layer, m in layers.items()]  # fmt: skip

    # with rounded activations (W8A8) a last-bit difference in one layer can move a code of the next: compared
    # layer by layer on the same inputs, and end to end by perplexity
    whole_logits = fmt not in ("w8a8", "fp8")
    for name, t in inputs.items():
        hooks = watched(name)
        (logits, perplexity), (want_logits, want) = through_kernels[name], model_perplexity(model, t)
        for hook in hooks:
            hook.remove()
        assert abs(perplexity / want - 1) < 5e-3, (name, perplexity, want)
        assert not whole_logits or relative_error(logits, want_logits) < TOLERANCE, name
    with torch.no_grad():
        hooks = watched("one row")
        want_one_row = model(tokens[:1, :1]).logits.float()
        for hook in hooks:
            hook.remove()
        assert not whole_logits or relative_error(one_row, want_one_row) < TOLERANCE
        monkeypatch.setattr(kernels, "ENABLED", True)
        for (name, layer), (x, want_y) in seen.items():  # every layer on the same input through the kernels
            assert relative_error(layers[layer](x), want_y) < TOLERANCE, (name, layer)


@needs_kernels
@pytest.mark.parametrize("intermediate", [100, 98])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_swiglu_tiles_give_the_mlps_product(fmt, intermediate):
    """A SwiGLU MLP's first product at one token (``swiglu_matmul``), every tile the tuner may choose: h = SiLU(gate)
    * up as the model computes it from the joined product (each op's output rounded to the activations' dtype). Odd
    sizes: outputs that fill no whole tile, K in no whole tile."""
    import torch.nn.functional as F

    from ptq.quant import kernels
    from ptq.quant.linear import Fp8Linear, Int8Linear, fp8_rows, int8_rows, join_outputs

    cls, act, rounding = (Int8Linear, kernels.ACT_INT8, int8_rows) if fmt == "int8" else (Fp8Linear, kernels.ACT_FP8,
                                                                                          fp8_rows)  # fmt: skip
    hidden, gen = 200, torch.Generator().manual_seed(0)
    gate, up = (cls.from_weight(torch.randn(intermediate, hidden, generator=gen) / hidden**0.5, None).to(DEVICE)
                for _ in range(2))  # fmt: skip
    joined = join_outputs([gate, up])
    x = inputs(1, hidden) * 3
    qx, x_scale = rounding(x)
    product = kernels.codes_matmul(qx, x_scale, joined.weight, joined.weight_scale, 2 * intermediate, hidden, act,
                                   torch.float32)  # fmt: skip
    g, u = product.to(DTYPE).chunk(2, dim=-1)  # the joined output in the model's dtype, rounded to nearest
    want = F.silu(g) * u
    swiglu = [c for c in kernels.GEMV_CANDIDATES[kernels.W8] if kernels.ROWS in c and kernels.CODES in c
              and kernels._w8_variant_applies(c, act, joined.weight)]  # fmt: skip
    assert swiglu
    for config in candidates_to_run(swiglu):
        h = kernels._launch_w8_gemv(config, qx, joined.weight, joined.weight_scale, 2 * intermediate, hidden, hidden,
                                    act, x_scale, x.dtype, swiglu=True)  # fmt: skip
        assert h.shape == (1, intermediate) and h.dtype == x.dtype
        assert relative_error(h, want) < TOLERANCE, config
        if DTYPE != torch.float32:  # other sums' order than the product above: a rare element one rounding step away
            assert (h != want).float().mean().item() < 0.02, config
    h = kernels.swiglu_matmul(qx, x_scale, joined.weight, joined.weight_scale, 2 * intermediate, hidden, act, x.dtype)
    assert relative_error(h, want) < TOLERANCE


@needs_kernels
@pytest.mark.parametrize("k", [4097, 14336])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_one_long_row_is_rounded_by_many_programs_as_by_one(fmt, k):
    """One token of a long row (a decode step's MLP) is rounded by several programs that each find the row's scale:
    the codes and the scale of the layers' own rounding."""
    from ptq.quant import kernels
    from ptq.quant.linear import fp8_rows, int8_rows

    act, rounding = (kernels.ACT_INT8, int8_rows) if fmt == "int8" else (kernels.ACT_FP8, fp8_rows)
    x = inputs(1, k) * 5
    q, scale = kernels._quantize_rows(x, act)
    want_q, want_scale = rounding(x)
    assert torch.equal(scale, want_scale) and torch.equal(q.float(), want_q.float())


@needs_kernels
@pytest.mark.parametrize("fmt", ["w8a8", "fp8"])
def test_a_fused_swiglu_model_decodes_as_the_layers_do(fmt):
    """A tiny Llama converted to W8A8 and fused (``SwiGLU`` in each block): one token's logits, eager and compiled
    (aot_eager), as the unfused model's; more tokens take the layers' own products."""
    from ptq.bench.infer import convert
    from ptq.fuse import SwiGLU, fuse_projections
    from tests.conftest import tiny_model

    model = tiny_model("llama").to(DEVICE, DTYPE)
    convert(model, fmt, group_size=16)
    ids = torch.randint(0, 96, (1, 1), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    prompt = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad():
        want, want_prompt = model(ids).logits, model(prompt).logits
        assert fuse_projections(model) == 4
        assert all(isinstance(block.mlp, SwiGLU) for block in model.model.layers)
        got = model(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        got_compiled = compiled(ids).logits
        torch._dynamo.reset()
        got_prompt = model(prompt).logits
    assert relative_error(got, want) < TOLERANCE
    assert relative_error(got_compiled, want) < TOLERANCE
    assert relative_error(got_prompt, want_prompt) < TOLERANCE


@needs_kernels
@pytest.mark.parametrize("fmt", ["w4a16", "w4a16-actorder", "w8a8", "fp8", "nvfp4"])
@pytest.mark.parametrize("rows", [1, 16, 65])
def test_compiled_layers_keep_the_kernels_whole(fmt, rows):
    """torch.compile traces the layers without breaking the graph (the kernels are PyTorch operators,
    ``ptq::quantized_matmul`` and the others) and computes what they compute eagerly. A W8A8 layer's few tokens take
    another path there (torch ops round x, ``codes_matmul`` multiplies the codes; the tuner may give it another tile
    than the eager call's, so another order of the sums): that path's eager result, to the bit."""
    from ptq.bench.infer import make_layer
    from ptq.quant import kernels
    from ptq.quant.linear import fp8_rows, int8_rows

    torch._dynamo.reset()
    weight = (torch.randn(96, 256, generator=torch.Generator().manual_seed(0)) * 0.02).to(DEVICE, DTYPE)
    layer = make_layer(fmt, weight)
    x = inputs(rows, 256)
    eager = layer(x)  # the first call finds the layer's group layout (a data-dependent check, once)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    if fmt in ("w8a8", "fp8") and rows <= kernels.SKINNY_ROWS:
        act, rounding = (kernels.ACT_INT8, int8_rows) if fmt == "w8a8" else (kernels.ACT_FP8, fp8_rows)
        same_path = kernels.codes_matmul(*rounding(x), layer.weight, layer.weight_scale, 96, 256, act, x.dtype)
        assert torch.equal(got, same_path)
        assert relative_error(got, eager) < TOLERANCE
    else:
        assert relative_error(got, eager) < 1e-6


@needs_kernels
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("how", ["setting", "layer"])
@pytest.mark.parametrize("fmt", ["w8a8", "fp8"])
def test_compiled_w8a8_layers_can_leave_the_rounding_to_the_kernel(fmt, how, rows, monkeypatch):
    """With PTQ_W8A8_COMPILED_ROUNDING=kernel, or on a layer whose ``rounds_own_input`` is set, a compiled W8A8 layer
    hands a few tokens' x to the operator that eager calls use (the tile rounds it), not to torch ops and
    ``codes_matmul``: the same bits as eagerly."""
    from ptq.bench.infer import make_layer
    from ptq.quant import kernels, linear

    def not_this_path(*args, **kwargs):
        raise AssertionError("codes_matmul called: the activations were rounded by torch ops")

    monkeypatch.setattr(kernels, "codes_matmul", not_this_path)
    torch._dynamo.reset()
    weight = (torch.randn(96, 256, generator=torch.Generator().manual_seed(0)) * 0.02).to(DEVICE, DTYPE)
    layer = make_layer(fmt, weight)
    if how == "setting":
        monkeypatch.setattr(linear, "COMPILED_ROUNDING", "kernel")
    else:
        assert linear.COMPILED_ROUNDING == "torch"
        layer.rounds_own_input = True
    x = inputs(rows, 256)
    eager = layer(x)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), eager)
    torch._dynamo.reset()


def test_the_tuner_times_each_w8_variant_only_where_it_changes_the_tile():
    """Variants that ``_launch`` would run as the plain tile (int32 sums for FP8, codes for weight-only 8-bit, the
    FP8 transposed product for int8, DP4A on rows that are not whole words) are not candidates; every applicable
    variant stays one."""
    from ptq.quant import kernels

    int8_w, fp8_w = torch.zeros(4, 4, dtype=torch.int8), torch.zeros(4, 4, dtype=torch.float8_e4m3fn)
    for table in (kernels.CANDIDATES, kernels.GEMV_CANDIDATES):
        configs = table[kernels.W8]
        int8 = [c for c in configs if kernels._w8_variant_applies(c, kernels.ACT_INT8, int8_w)]
        fp8 = [c for c in configs if kernels._w8_variant_applies(c, kernels.ACT_FP8, fp8_w)]
        weight_only = [c for c in configs if kernels._w8_variant_applies(c, kernels.ACT_NONE, int8_w)]
        assert configs[0] in int8 and configs[0] in fp8 and configs[0] in weight_only  # the untuned default
        assert not any(kernels.SWAP in c for c in int8) and not any(kernels.INT_SUMS in c for c in fp8)
        assert not any(kernels.CODES in c or kernels.INT_SUMS in c or kernels.SKINNY in c for c in weight_only)
        assert any(kernels.CODES in c for c in int8) and any(kernels.CODES in c for c in fp8)
        for applicable in (int8, fp8):  # tiles that round inside, into the 8-bit dots, with and without SWAP
            assert any(kernels.ROUNDS in c and kernels.SWAP not in c for c in applicable)
        assert any(kernels.ROUNDS in c and kernels.SWAP in c for c in fp8)
        if table is kernels.CANDIDATES:
            assert any(kernels.SWAP in c for c in fp8)
        else:
            assert any(kernels.INT_SUMS in c for c in int8) and any(kernels.SKINNY in c for c in fp8)
            assert any(kernels.DP4A in c for c in int8) and not any(kernels.DP4A in c for c in fp8)
            odd_rows = torch.zeros(4, 6, dtype=torch.int8)  # rows of 6 bytes: not whole int32 words
            applies = [c for c in configs if kernels._w8_variant_applies(c, kernels.ACT_INT8, odd_rows)]
            assert applies and not any(kernels.DP4A in c for c in applies)
    # over 16 rows a ROUNDS tile would run as its CODES tile (see _launch): not timed there
    for rows, rounds in ((16, True), (17, False)):
        x = torch.zeros(rows, 4)
        for act, w in ((kernels.ACT_INT8, int8_w), (kernels.ACT_FP8, fp8_w)):
            tiles = kernels._candidates(kernels.W8, act, x, w, None, False, False, 0, 4, 4, False, 0)
            assert any(kernels.ROUNDS in c for c in tiles) == rounds
