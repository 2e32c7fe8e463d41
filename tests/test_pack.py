"""The GPTQ checkpoint layout: exact round trips, the reference bit layout, and effective bits."""

import pytest
import torch
from conftest import tiny_model

from ptq import quantize
from ptq.methods.gptq import gptq_quantize
from ptq.quant import WeightSpec, quantize_weight
from ptq.quant.pack import PackError, nbytes, pack_gptq, pack_rows, unpack_gptq, unpack_rows


def reference_pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """A bit-by-bit packing, written independently: bit k of code i of each run of 32 goes to bit
    (i*bits + k) mod 32 of word (i*bits + k) // 32 of the run's words."""
    n, m = values.shape
    words = torch.zeros(n * bits // 32, m, dtype=torch.int64)
    for run in range(n // 32):
        for i in range(32):
            for k in range(bits):
                position = i * bits + k
                bit = (values[run * 32 + i] >> k) & 1
                words[run * bits + position // 32] |= bit << (position % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_rows_matches_the_bitwise_layout_and_round_trips(bits):
    torch.manual_seed(bits)
    values = torch.randint(0, 2**bits, (64, 5))
    values[0] = 2**bits - 1  # all ones: the sign bit of the int32 words is exercised
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 5)
    assert torch.equal(packed, reference_pack(values, bits))
    assert torch.equal(unpack_rows(packed, bits), values)


def test_four_bit_words_hold_eight_codes_lowest_first():
    values = torch.arange(8).reshape(8, 1).repeat(4, 1)  # codes 0..7 in every run
    assert pack_rows(values, 4)[0, 0].item() == 0x76543210


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_gptq_tensors_round_trip_exactly(bits, group_size, sym):
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    weight[:4] = weight[:4].abs()  # rows with min >= 0: asymmetric zero point 0 in every group
    qw = quantize_weight(weight, WeightSpec("int", bits, group_size, sym))
    tensors = pack_gptq(qw)
    groups = qw.spec.num_groups(128)
    assert tensors["qweight"].shape == (128 * bits // 32, 64)
    assert tensors["qzeros"].shape == (groups, 64 * bits // 32)
    assert tensors["scales"].shape == (groups, 64) and tensors["scales"].dtype == torch.float16
    back = unpack_gptq(tensors, qw.spec)
    assert torch.equal(back.qweight, qw.qweight)
    assert torch.equal(back.zero, qw.zero)
    assert torch.equal(back.g_idx, qw.g_idx)
    assert torch.equal(back.scale, qw.scale.half().float())
    if not sym:
        assert (qw.zero == 0).any()  # the case the format's zero - 1 convention must survive


@pytest.mark.parametrize("bits", [3, 4])
def test_act_order_g_idx_round_trips(bits):
    torch.manual_seed(1)
    x = torch.randn(512, 64) * torch.linspace(0.1, 3, 64)
    qw, _, _ = gptq_quantize(torch.randn(32, 64), x.t() @ x, WeightSpec("int", bits, 32, False), act_order=True)
    assert not torch.equal(qw.g_idx, torch.arange(64, dtype=torch.int32) // 32)  # permuted groups
    back = unpack_gptq(pack_gptq(qw), qw.spec)
    assert torch.equal(back.qweight, qw.qweight) and torch.equal(back.g_idx, qw.g_idx)
    assert torch.allclose(back.dequantize(), qw.dequantize(), rtol=1e-3, atol=1e-3)  # fp16 scales


def test_unpackable_settings_are_clear_errors():
    with pytest.raises(PackError, match="bits=5 has no packed GPTQ layout.*2, 3, 4, 8"):
        pack_gptq(quantize_weight(torch.randn(32, 64), WeightSpec("int", 5, 32, False)))
    with pytest.raises(PackError, match="48 input features are not a multiple of 32"):
        pack_gptq(quantize_weight(torch.randn(32, 48), WeightSpec("int", 4, 16, False)))


def test_bytes_follow_the_layout_formula():
    out_features, in_features = 4096, 4096
    qw = quantize_weight(torch.randn(out_features, in_features), WeightSpec("int", 4, 128, False))
    groups = in_features // 128
    expected = out_features * in_features * 4 // 8 + groups * out_features * (4 + 16) // 8 + in_features * 4
    assert nbytes(pack_gptq(qw)) == expected
    # 4 bits + (16-bit scale + 4-bit zero) / 128 + a 32-bit g_idx entry per column / 4096 rows
    assert 8 * expected / (out_features * in_features) == pytest.approx(4 + 20 / 128 + 32 / 4096)


def test_quantize_reports_effective_bits_of_what_it_would_store():
    model = tiny_model("llama")  # 48 and 80 features: counted zero-padded to 64 and 96
    params = sum(p.numel() for p in model.parameters())
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    linear_params = sum(m.weight.numel() for m in linears)
    report = quantize(model, method="rtn", bits=4, group_size=16, device="cpu")
    storage = report["storage"]
    assert storage["quantized_linears"] == len(linears) == storage["padded_linears"]
    assert storage["linear_weights"] == linear_params
    assert storage["other_params"] == params - linear_params
    expected = 0
    for m in linears:
        out_p, in_p = -(-m.out_features // 32) * 32, -(-m.in_features // 32) * 32
        groups = -(-m.in_features // 16)  # padding columns need no group of their own
        expected += out_p * in_p // 2 + groups * out_p * 20 // 8 + in_p * 4
    assert storage["linear_bytes"] == expected
    assert storage["bits_per_weight"] == pytest.approx(8 * expected / linear_params)
    assert storage["model_bytes"] == expected + 2 * (params - linear_params)

    fp = quantize(tiny_model("llama"), method="none", device="cpu")["storage"]
    assert fp["bits_per_weight"] is None and fp["bits_per_param"] == 16


@pytest.mark.parametrize("shape,group", [((16, 100), 32), ((8, 64), -1), ((8, 64), 64), ((4, 130), 128)])
def test_integer_weights_dequantize_to_exactly_the_fake_quantized_values(shape, group):
    from ptq.quant import fake_quantize_weight

    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    spec = WeightSpec("int", 3, group, False)
    qw = quantize_weight(weight, spec)
    assert torch.equal(qw.dequantize(), fake_quantize_weight(weight, spec))
    cols = qw.g_idx.long()  # the per-column gather that act-order layouts need
    assert torch.equal(qw.dequantize(), spec.dequantize(qw.qweight.float(), qw.scale[:, cols], qw.zero[:, cols]))


@pytest.mark.parametrize(
    "spec",
    [
        WeightSpec.build("nvfp4"),
        WeightSpec.build("mxfp4"),
        WeightSpec.build("mxfp8"),
        WeightSpec.build("fp8_e4m3"),
        WeightSpec.build("fp8_e4m3", group_size=0),
        WeightSpec("int", 4, 16, False),  # 40 output rows: not a GPTQ-packable shape
        WeightSpec("int", 3, -1, True),
        WeightSpec("int", 8, 0, False),
    ],
    ids=lambda s: s.describe(),
)
def test_compact_layers_hold_the_stored_form_and_compute_the_same_weights(spec):
    from ptq.quant.linear import CompactLinear, QuantLinear, quantized_linear

    g = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 96, generator=g) * torch.logspace(-2, 1, 96)
    qw = quantize_weight(weight, spec)
    layer = quantized_linear(qw, torch.randn(40, generator=g), torch.float32)
    assert isinstance(layer, CompactLinear) and not isinstance(layer, QuantLinear)
    assert torch.equal(layer.dequantized_weight(torch.float32), qw.dequantize())
    element_bits = spec.bits if spec.is_int else spec.fmt.element_bits
    assert layer.codes.numel() * layer.codes.element_size() == 40 * 96 * (4 if element_bits <= 4 else 8) // 8
    if not spec.is_int and spec.fmt.block_size:  # one byte per block scale (E4M3 or E8M0)
        assert layer.scale.element_size() == 1 and layer.scale.numel() == 40 * 96 // spec.group_size
    x = torch.randn(3, 96, generator=g)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, qw.dequantize(), layer.bias))
