"""Every method with every weight format where the math allows, and the combinations that do not."""

import pytest
import torch

import ptq
from ptq.methods.gptq import gptq_quantize
from ptq.quant import WeightSpec, quantize_weight
from ptq.recipe import Recipe, RecipeError
from tests.conftest import tiny_model
from tests.test_gptq import correlated_inputs

FLOAT_FORMATS = ["fp8_e4m3", "fp8_e5m2", "nvfp4", "mxfp4", "mxfp8"]


def output_error(X, W, Q):
    return ((X @ (W - Q).T) ** 2).sum().item()


@pytest.mark.parametrize("fmt", FLOAT_FORMATS)
@pytest.mark.parametrize("order", [dict(act_order=True, static_groups=True), dict()])
def test_gptq_through_a_float_format_beats_round_to_nearest(fmt, order):
    X = correlated_inputs(512, 64, seed=0)
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    spec = WeightSpec.build(fmt)
    qw, losses, _ = gptq_quantize(W, H, spec, **order)
    rtn = quantize_weight(W, spec)
    assert qw.qweight.dtype == rtn.qweight.dtype and torch.equal(qw.g_idx, rtn.g_idx)  # contiguous groups
    codes = qw.codes()
    grid = set((rtn.spec.fmt.decode(rtn.spec.fmt.encode(codes))).flatten().tolist())
    assert grid == set(codes.flatten().tolist())  # every code is on the format's grid
    assert output_error(X, W, qw.dequantize()) < 0.8 * output_error(X, W, rtn.dequantize())


def test_gptq_nvfp4_global_scale_comes_from_the_original_weights():
    X = correlated_inputs(256, 32, seed=0)
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    spec = WeightSpec.build("nvfp4")
    qw, _, _ = gptq_quantize(W, 2 / 256 * X.T @ X, spec)
    assert torch.equal(qw.tensor_scale, quantize_weight(W, spec).tensor_scale)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "awq+gptq"])
@pytest.mark.parametrize("fmt", ["int", *FLOAT_FORMATS])
def test_every_method_quantizes_in_every_format(method, fmt):
    model = tiny_model("llama")
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x).logits
    calib = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    group = 16 if fmt in ("int", "fp8_e4m3") else None
    report = ptq.quantize(model, method=method, format=fmt, group_size=group, calib=calib, device="cpu", batch_size=2)
    with torch.no_grad():
        after = model(x).logits
    assert torch.isfinite(after).all() and not torch.equal(after, before)
    assert (after - before).norm() < 0.5 * before.norm()
    assert report["storage"]["quantized_linears"] == 2 * 7
    expected = {"nvfp4": 4.5, "mxfp4": 4.25, "mxfp8": 8.25}  # int: tests/test_pack.py
    if fmt in expected:  # block scales counted; partial blocks (80 = 2.5 x 32) pay a whole scale
        assert expected[fmt] <= report["storage"]["bits_per_weight"] < expected[fmt] + 0.1


@pytest.mark.parametrize(
    "scheme",
    [
        dict(format="fp8_e4m3", act_format="fp8_e4m3"),  # W8A8 FP8, dynamic per token
        dict(format="fp8_e4m3", group_size=0, act_format="fp8_e4m3", act_granularity="per_tensor"),  # static
        dict(format="nvfp4", act_format="nvfp4"),
        dict(format="mxfp4", act_format="mxfp4"),
        dict(format="mxfp8", act_format="mxfp8"),
    ],
)
@pytest.mark.parametrize("method", ["rtn", "smoothquant", "smoothquant+gptq"])
def test_activation_formats_with_every_method(method, scheme):
    model = tiny_model("llama")
    calib = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    report = ptq.quantize(model, method=method, calib=calib, device="cpu", batch_size=2, **scheme)
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.isfinite(model(x).logits).all()
    calibrated = [s for b in report["blocks"] for s in b["layers"].values() if "act_scale" in s]
    # calibrated: the static per-tensor scale, or NVFP4's global scale
    assert bool(calibrated) == (scheme.get("act_granularity") == "per_tensor" or scheme["act_format"] == "nvfp4")


def test_combinations_that_make_no_sense_are_one_clear_error():
    with pytest.raises(RecipeError, match="awq.clip searches a clipping range per group"):
        Recipe.build("awq", "fp8_e4m3", group_size=0)
    with pytest.raises(ValueError, match="act_format=nvfp4 needs format=nvfp4 weights"):
        Recipe.build("rtn", "mxfp4", act_format="nvfp4")
    with pytest.raises(ValueError, match="give either a recipe or settings"):
        ptq.quantize(tiny_model("llama"), Recipe(), bits=4)


def test_linears_reading_one_input_share_the_nvfp4_global_scale():
    """q/k/v and gate/up become one fused layer in inference engines, which keep one global scale."""
    model = tiny_model("llama")
    quantized = {}
    ptq.quantize(model, method="rtn", format="nvfp4", device="cpu", on_quantized=quantized.__setitem__)
    block = "model.layers.0."
    scales = {name.removeprefix(block): qw.tensor_scale.item() for name, qw in quantized.items() if block in name}
    assert scales["self_attn.q_proj"] == scales["self_attn.k_proj"] == scales["self_attn.v_proj"]
    assert scales["mlp.gate_proj"] == scales["mlp.up_proj"]
    assert scales["self_attn.q_proj"] != scales["mlp.gate_proj"]
    weights = dict(model.named_parameters())
    amax = max(weights[f"{block}self_attn.{p}_proj.weight"].abs().max().item() for p in "qkv")
    assert scales["self_attn.q_proj"] == pytest.approx(448 * 6 / amax)
