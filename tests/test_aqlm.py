"""AQLM: additive multi-codebook quantization (ptq/methods/aqlm.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

import ptq
from ptq.methods.aqlm import (
    AQLM,
    AQLMWeight,
    aqlm_quantize,
    beam_search,
    decode,
    fit_codebooks,
    fit_scales,
    nominal_codebooks,
    row_errors,
)
from ptq.methods.gptq import gptq_quantize
from ptq.quant import WeightSpec
from ptq.quant.linear import LayoutLinear, quantized_linear

SPEC = WeightSpec(format="int", bits=2, group_size=128, sym=False)


def layer(rows: int = 48, columns: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, columns, generator=g)
    X = torch.randn(2048, columns, generator=g) @ torch.randn(columns, columns, generator=g) * 0.3
    X = X * torch.linspace(0.2, 2.0, columns)  # unequal input channels, correlated: H is far from a multiple of I
    return W, 2 * X.T @ X / X.shape[0]


def error(W, C, codes, H, scale=None) -> torch.Tensor:
    Q = decode(C, codes.long()).reshape(W.shape[0], -1)
    return row_errors(W, Q if scale is None else scale * Q, H)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_beam_search_never_increases_any_rows_error(beam_size):
    W, H = layer()
    g = torch.Generator().manual_seed(3)
    C = torch.randn(2, 32, 8, generator=g)
    codes = torch.randint(0, 32, (48, 8, 2), generator=g, dtype=torch.int32)
    before = error(W, C, codes, H)
    new = beam_search(W, H, C, codes, beam_size)
    after = error(W, C, new, H)
    assert (after <= before).all() and after.sum() < 0.8 * before.sum()
    again = beam_search(W, H, C, new, beam_size)  # from its own result: still no row gets worse
    assert (error(W, C, again, H) <= after).all()


def test_wider_beams_find_lower_errors_and_the_search_uses_h():
    W, H = layer()
    g = torch.Generator().manual_seed(4)
    C = torch.randn(2, 32, 8, generator=g)
    codes = torch.randint(0, 32, (48, 8, 2), generator=g, dtype=torch.int32)
    narrow, wide = (error(W, C, beam_search(W, H, C, codes, b), H).sum() for b in (1, 8))
    assert wide < narrow
    # with H = I the search minimizes the plain squared error instead: after a few sweeps each, it scores worse
    # under the real H
    aware, plain = codes, codes
    for _ in range(3):
        aware, plain = beam_search(W, H, C, aware, 8), beam_search(W, torch.eye(64), C, plain, 8)
    assert error(W, C, aware, H).sum() < 0.8 * error(W, C, plain, H).sum()


def test_scale_and_codebook_updates_are_least_squares_solutions():
    W, H = layer()
    g = torch.Generator().manual_seed(5)
    C = torch.randn(1, 16, 8, generator=g)
    codes = torch.randint(0, 16, (48, 8, 1), generator=g, dtype=torch.int32)
    scale = fit_scales(W, decode(C, codes.long()).reshape(48, -1), H)
    base = error(W, C, codes, H, scale)
    for factor in (0.98, 1.02):  # the closed form beats any nearby scale
        assert (error(W, C, codes, H, scale * factor) >= base - 1e-3).all()
    fitted = fit_codebooks(W, H, C, codes, scale, steps=200)
    best = error(W, fitted, codes, H, scale).sum()
    assert best < base.sum()
    for _ in range(5):  # and any perturbation of the fitted codebooks is worse (it is the minimum)
        bumped = fitted + 0.01 * torch.randn(fitted.shape, generator=g)
        assert error(W, bumped, codes, H, scale).sum() > best


def test_aqlm_beats_gptq_at_two_bits_per_weight_on_a_layer():
    W, H = layer(rows=64, columns=256)
    q, losses, info = aqlm_quantize(W, H.clone(), SPEC, codebooks=2, codebook_bits=8, group=8, beam_size=4)
    assert info["relative_error"] < info["relative_error_init"]
    assert torch.allclose(losses, row_errors(W, q.dequantize(), H) / 2, rtol=1e-4)
    gptq, _, _ = gptq_quantize(W, H.clone(), WeightSpec(format="int", bits=2, group_size=64), act_order=True,
                               loop="torch")  # fmt: skip
    assert row_errors(W, q.dequantize(), H).sum() < row_errors(W, gptq.dequantize(), H).sum()


def test_storage_counts_codes_codebooks_and_scales():
    W, H = layer(rows=64, columns=256)
    q, _, _ = aqlm_quantize(W, H.clone(), SPEC, codebooks=2, codebook_bits=8, group=8, rounds=1)
    assert q.codes.shape == (64, 32, 2) and q.codebooks.shape == (1, 2, 256, 8) and q.scale.shape == (64, 1)
    bits = 64 * 32 * 2 * 8 + 2 * 256 * 8 * 16 + 64 * 16
    assert q.stored_bytes() == bits // 8
    assert int(q.codes.max()) < 256 and int(q.codes.min()) >= 0  # every code fits its 8 bits
    assert torch.equal(q.codebooks, q.codebooks.half().float()) and torch.equal(q.scale, q.scale.half().float())


def test_stacked_linears_keep_their_own_codebooks():
    W, H = layer(rows=48, columns=64)
    step = AQLM(SPEC, codebooks=1, codebook_bits=6, rounds=1)
    q, losses, _ = step.solve_weight(W, H.clone(), None, parts=[32, 16])
    assert q.codebooks.shape[0] == 2 and q.part_rows == (32, 16)
    top, bottom = q.rows(0, 32), q.rows(32, 48)
    assert torch.equal(torch.cat([top.dequantize(), bottom.dequantize()]), q.dequantize())
    alone, _, _ = aqlm_quantize(W[32:], H.clone(), SPEC, 1, 6, 8, 8, 1)
    assert torch.equal(bottom.dequantize(), alone.dequantize())
    assert top.stored_bytes() + bottom.stored_bytes() >= q.stored_bytes()
    with pytest.raises(ValueError, match="not one of the stacked linears"):
        q.rows(0, 16)


def test_nominal_bits_choose_the_codebooks():
    assert nominal_codebooks(2, 8) == (1, 16)
    assert nominal_codebooks(3, 8) == (2, 12)
    assert nominal_codebooks(4, 8) == (2, 16)
    step = AQLM(WeightSpec(bits=3), codebooks=3, codebook_bits=8)
    assert (step.solver["codebooks"], step.solver["codebook_bits"]) == (3, 8)


def test_pipeline_runs_aqlm_from_the_api_and_reports_exact_bits(tmp_path):
    model = tiny_model("llama")
    calib = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(1))
    kept = {}
    options = {"aqlm": {"codebooks": 2, "codebook_bits": 4, "group": 8, "beam_size": 2, "rounds": 2}}
    report = ptq.quantize(model, method="aqlm", bits=2, calib=calib, device="cpu", options=options,
                          on_quantized=kept.__setitem__)  # fmt: skip
    storage = report["storage"]
    assert storage["format"] == "aqlm"
    expected = sum(q.stored_bytes() for q in kept.values())
    assert storage["linear_bytes"] == expected
    weights = sum(math.prod(q.shape) for q in kept.values())
    assert storage["bits_per_weight"] == pytest.approx(8 * expected / weights)
    layers = report["blocks"][0]["layers"]
    assert layers["self_attn.q_proj"]["loss"] > 0 and layers["self_attn.q_proj"]["relative_error"] > 0
    # q, k and v are solved as one stack but each reports its own solve
    assert len({layers[f"self_attn.{n}_proj"]["relative_error"] for n in "qkv"}) == 3
    for name, q in kept.items():  # the model computes with the codes' weights
        linear = model.get_submodule(name)
        assert torch.equal(linear.weight, q.dequantize().to(linear.weight.dtype))
        assert q.codebooks.shape[0] == 1  # each linear its own codebooks, q/k/v included


def test_block_finetuning_lowers_the_block_output_error():
    model = tiny_model("llama")
    calib = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(1))
    options = {"aqlm": {"codebooks": 1, "codebook_bits": 4, "rounds": 1, "beam_size": 1, "finetune_epochs": 5,
                        "finetune_lr": 1e-2}}  # fmt: skip
    report = ptq.quantize(model, method="aqlm", bits=2, calib=calib, device="cpu", options=options)
    for block in report["blocks"]:
        stats = block["layers"]["self_attn.q_proj"]
        assert stats["finetune_error_after"] < stats["finetune_error_before"]
    assert all(p.requires_grad for p in model.parameters())  # the model's parameters are left as they were


def test_options_and_unsupported_settings_are_refused():
    with pytest.raises(ValueError, match="beam_size"):
        AQLM(SPEC, beam_size=0)
    with pytest.raises(ValueError, match="codebooks and codebook_bits go together"):
        AQLM(SPEC, codebooks=2)
    with pytest.raises(ValueError, match="codebook_bits"):
        AQLM(SPEC, codebooks=1, codebook_bits=17)
    with pytest.raises(ValueError, match="does not divide"):
        ptq.quantize(tiny_model("llama"), method="aqlm", bits=2, options={"aqlm": {"group": 7}})


def test_progress_files_and_layout_linear_keep_the_codebooks(tmp_path):
    from ptq.storage.progress import Progress

    W, H = layer()
    q, _, _ = aqlm_quantize(W, H.clone(), SPEC, codebooks=2, codebook_bits=4, rounds=1)
    block = torch.nn.Module()
    block.linear = torch.nn.Linear(64, 48, bias=False)
    progress = Progress(tmp_path, {"method": "aqlm"})
    progress.start(False)
    progress.save_block(0, block, {"linear": q}, {"layers": {}})
    restored, _ = progress.restore_block(0, block, torch.device("cpu"))
    assert isinstance(restored["linear"], AQLMWeight) and restored["linear"].part_rows == (48,)
    assert torch.equal(restored["linear"].dequantize(), q.dequantize())
    linear = quantized_linear(q, None, torch.float32)
    assert isinstance(linear, LayoutLinear)
    x = torch.randn(5, 64)
    assert torch.allclose(linear(x), x @ q.dequantize().T)
