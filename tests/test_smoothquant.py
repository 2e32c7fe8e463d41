import pytest
import torch

import ptq
from ptq.methods.smoothquant import SmoothQuant, smoothing_scales
from ptq.models import get_blocks
from ptq.pipeline import run_blocks
from ptq.quant import ActSpec, WeightSpec, fake_quantize_weight
from ptq.quant.activations import input_quantizer_of
from ptq.recipe import Recipe
from tests.conftest import tiny_model
from tests.test_awq import (
    SCALED_ARCHS,
    assert_same_blocks,
    block_outputs,
    randomize_norms,
    scaled_model,
)


@pytest.mark.parametrize("scope", ["norms", "all"])
@pytest.mark.parametrize("kind", SCALED_ARCHS)
def test_smoothing_alone_preserves_every_block(kind, scope):
    model = scaled_model(kind)
    randomize_norms(model)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(3))
    before = block_outputs(model, ids)
    step = SmoothQuant(WeightSpec("int", 8, -1, True), alpha=0.8, scope=scope)
    step.round_weights = False
    step.prepare(model.config)
    report = run_blocks(model, [step], calib, torch.device("cpu"), offload=False, batch_size=2)
    smoothed = [s for b in report["blocks"] for s in b["layers"].values() if "smooth_scale_max" in s]
    assert smoothed and any(abs(s["smooth_scale_max"] - 1) > 0.1 for s in smoothed)
    assert_same_blocks(before, block_outputs(model, ids))


def w8a8_error(x, weight, scales=None):
    """Output error of per-tensor static W8A8 (per-channel symmetric weights) on x, optionally smoothed."""
    if scales is not None:
        x, weight = x / scales, weight * scales
    w = fake_quantize_weight(weight, WeightSpec("int", 8, -1, True))
    xq = ActSpec("int", 8, "per_tensor").quantize_static(x, x.abs().max() / 127)
    return (xq @ w.t() - x @ weight.t()).pow(2).mean()


def test_smoothing_tames_planted_activation_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 256, generator=g)
    x[:, torch.randperm(256, generator=g)[:6]] *= 80  # outlier channels, as in OPT/LLaMA activations
    weight = torch.randn(128, 256, generator=g) * 0.05
    scales = smoothing_scales(x.abs().amax(dim=0), [weight], alpha=0.5)
    naive, smoothed = w8a8_error(x, weight), w8a8_error(x, weight, scales)
    assert smoothed < 0.1 * naive


def test_per_token_quantizer_matches_reference_formula():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.1, 0.2, -0.4, 0.3]])
    # max|x| per token maps to 127; 63.5 rounds half to even (-64)
    expected = torch.tensor([[127, -64, 32, 0], [32, 64, -127, 95]]) * torch.tensor([[1.0 / 127], [0.4 / 127]])
    torch.testing.assert_close(ActSpec("int", 8, "per_token").quantize_dynamic(x), expected)
    y = torch.randn(3, 5, 64) * 4
    scale = y.abs().amax(dim=-1, keepdim=True) / 7
    torch.testing.assert_close(ActSpec("int", 4, "per_token").quantize_dynamic(y), torch.round(y / scale) * scale)


def test_per_tensor_quantizer_matches_reference_formula_and_clips():
    x = torch.tensor([0.5, -1.0, 2.0, -3.0])
    scale = torch.tensor(1.0 / 127)  # calibrated on |x| <= 1: larger values clip to +-127 * scale
    expected = torch.tensor([64.0, -127.0, 127.0, -127.0]) / 127
    torch.testing.assert_close(ActSpec("int", 8, "per_tensor").quantize_static(x, scale), expected)


def test_static_scales_are_calibrated_on_the_calibration_inputs():
    model = tiny_model("llama")
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(3))
    q_proj = get_blocks(model)[0].self_attn.q_proj
    seen = []
    handle = q_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].abs().max()))
    with torch.no_grad():
        model(input_ids=calib)
    handle.remove()
    ptq.quantize(
        model,
        method="rtn",
        bits=8,
        group_size=-1,
        sym=True,
        calib=calib,
        device="cpu",
        batch_size=2,
        act_bits=8,
        act_granularity="per_tensor",
    )
    quantizer = input_quantizer_of(q_proj)
    assert quantizer.spec == ActSpec("int", 8, "per_tensor")
    torch.testing.assert_close(quantizer.scale, max(seen) / 127)


def test_activation_quantization_changes_the_forward():
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(0))
    logits = {}
    for act_bits in (None, 4):
        model = tiny_model("opt")
        ptq.quantize(model, method="rtn", bits=8, group_size=-1, sym=True, device="cpu", act_bits=act_bits)
        with torch.no_grad():
            logits[act_bits] = model(input_ids=ids).logits
    assert not torch.allclose(logits[None], logits[4])


@pytest.mark.parametrize("method", ["smoothquant", "smoothquant+gptq"])
def test_smoothquant_w8a8_end_to_end(method):
    model = tiny_model("llama")
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(3))
    report = ptq.quantize(
        model, method=method, bits=8, group_size=-1, sym=True, calib=calib, device="cpu", batch_size=2, act_bits=8
    )
    layers = report["blocks"][0]["layers"]
    assert "smooth_scale_max" in layers["self_attn.q_proj"]
    assert ("loss" in layers["self_attn.q_proj"]) == (method == "smoothquant+gptq")
    for block in get_blocks(model):
        for linear in (block.self_attn.q_proj, block.mlp.down_proj):
            assert input_quantizer_of(linear) is not None
            assert max(len(torch.unique(row)) for row in linear.weight) <= 256


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(method="smoothquant", options={"smoothquant": {"alpha": 1.5}}, act_bits=8),
            r"alpha=1.5 must lie in \[0, 1\]",
        ),
        (dict(method="smoothquant", options={"smoothquant": {"scope": "some"}}, act_bits=8), "scope='some' is unknown"),
        (dict(method="smoothquant"), "set an activation format"),
        (dict(method="rtn", act_bits=8, group_size=128), "group_size=-1 sym=true"),
        (dict(method="rtn", act_bits=8, sym=False), "group_size=-1 sym=true"),
        (dict(method="rtn", act_bits=8, act_granularity="per_channel"), "act_granularity='per_channel' is unknown"),
        (dict(method="rtn", act_bits=3), "act_bits=3 is outside 4..8"),
        (dict(method="none", act_bits=8), "activation quantization needs quantized weights"),
    ],
)
def test_bad_activation_and_smoothing_settings(kwargs, message):
    settings = dict(bits=8, group_size=-1, sym=True) | kwargs
    with pytest.raises(ValueError, match=message):
        Recipe.build(**settings)
