import os

import pytest
import torch

from ptq.quant import WeightSpec, fake_quantize_weight, group_qparams, quantize_weight


def reference_rtn(w: torch.Tensor, bits: int, group: int, sym: bool) -> torch.Tensor:
    """The GPTQ reference formulas, written out column group by column group (fp32, as the format
    defines: a float64 reference would round differently at exact .5 ties)."""
    w = w.float()
    maxq = 2**bits - 1
    out = torch.empty_like(w)
    g = w.shape[1] if group == -1 else group
    for start in range(0, w.shape[1], g):
        x = w[:, start : start + g]
        xmin = torch.minimum(x.min(1).values, torch.zeros(1, dtype=w.dtype))
        xmax = torch.maximum(x.max(1).values, torch.zeros(1, dtype=w.dtype))
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        scale = (xmax - xmin) / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
        q = torch.clamp(torch.round(x / scale[:, None]) + zero[:, None], 0, maxq)
        out[:, start : start + g] = scale[:, None] * (q - zero[:, None])
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [-1, 16, 128])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_matches_reference_formula(bits, group, sym):
    torch.manual_seed(bits * 100 + group)
    w = torch.randn(24, 96) * torch.rand(24, 1)
    got = quantize_weight(w, WeightSpec("int", bits, group, sym)).dequantize()
    want = reference_rtn(w, bits, group, sym).float()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("group", [-1, 16, 40])  # 40: a partial last group of 96 columns
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_weight_equals_quantize_then_dequantize(group, sym, dtype):
    torch.manual_seed(group + 7)
    w = (torch.randn(24, 96) * torch.rand(24, 1)).to(dtype)
    spec = WeightSpec("int", 3, group, sym)
    got = fake_quantize_weight(w, spec)
    assert got.dtype == dtype
    assert torch.equal(got, quantize_weight(w, spec).dequantize().to(dtype))


def test_partial_last_group_has_its_own_parameters():
    torch.manual_seed(0)
    w = torch.randn(8, 576)  # SmolLM2's width: 4 groups of 128 and one of 64
    w[:, 512:] *= 100  # the partial group's range must not leak into the others, nor theirs into it
    spec = WeightSpec("int", 4, 128, False)
    qw = quantize_weight(w, spec)
    assert qw.scale.shape == (8, 5)
    assert torch.equal(qw.g_idx[510:514].long(), torch.tensor([3, 3, 4, 4]))
    scale_last, _ = spec.params(w[:, 512:])
    torch.testing.assert_close(qw.scale[:, 4:5], scale_last)
    torch.testing.assert_close(qw.dequantize(), reference_rtn(w, 4, 128, False).float(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("sym", [False, True])
def test_dequantized_values_lie_on_the_grid(sym):
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    spec = WeightSpec("int", 3, 32, sym)
    qw = quantize_weight(w, spec)
    assert qw.qweight.max() <= spec.maxq and qw.qweight.min() >= 0
    levels = {round(v, 5) for v in qw.dequantize()[0, :32].tolist()}
    grid = {round(v, 5) for v in (qw.scale[0, 0] * (torch.arange(8) - qw.zero[0, 0])).tolist()}
    assert levels <= grid
    if sym:
        assert torch.all(qw.zero == 4)
    else:
        assert torch.equal(qw.zero, qw.zero.round())


def test_zero_row_and_zero_is_exact():
    w = torch.zeros(2, 8)
    w[1, 3] = 1.0
    spec = WeightSpec("int", 4, -1, False)
    deq = quantize_weight(w, spec).dequantize()
    assert torch.equal(deq[0], torch.zeros(8))
    assert deq[1, 0] == 0 and torch.isclose(deq[1, 3], torch.tensor(1.0))
    scale, zero = group_qparams(w, spec)
    assert torch.all(scale > 0)


@pytest.mark.parametrize("bits,group", [(1, 128), (9, 128), (4, -2), (4, 1.5)])
def test_spec_rejects_bad_values(bits, group):
    with pytest.raises(ValueError):
        WeightSpec("int", bits, group)


@pytest.mark.parametrize("module,name,value,fix", [
    ("ptq.quant.linear", "PTQ_W8A8_COMPILED_ROUNDING", "fast", "set it to torch or kernel"),
    ("ptq.quant.kernels", "PTQ_FP8_FAST_ACCUM", "yes", "set it to 1 (fast) or 0 (fp32 per K tile)"),
])  # fmt: skip
def test_an_unknown_kernel_switch_value_is_refused_at_import(module, name, value, fix):
    import subprocess
    import sys

    env = {**os.environ, name: value}
    result = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert f"{name}={value!r} is not a choice: {fix}" in result.stderr
