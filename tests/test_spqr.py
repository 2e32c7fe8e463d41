"""SpQR: GPTQ's solve with small groups, quantized statistics and 16-bit outliers (ptq/methods/spqr.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import ptq
from ptq.methods.gptq import gptq_quantize
from ptq.methods.spqr import SpQRWeight, quantize_stat, spqr_quantize
from ptq.quant import WeightSpec
from ptq.quant.pack import StorageCount


def layer(rows: int = 64, columns: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, columns, generator=g)
    W[torch.rand(rows, columns, generator=g) < 0.01] *= 8  # a few large weights, as trained layers have
    X = torch.randn(4096, columns, generator=g) * torch.linspace(0.1, 3.0, columns)
    return W, 2 * X.T @ X / X.shape[0], X


def output_error(W, Wq, X) -> float:
    return ((X @ (W - Wq).T) ** 2).mean().item()


@pytest.mark.parametrize("act_order", [True, False])
def test_without_outliers_and_quantized_statistics_it_is_gptq(act_order):
    W, H, _ = layer()
    spec = WeightSpec(format="int", bits=3, group_size=128, sym=False)
    gptq, gptq_loss, _ = gptq_quantize(W, H.clone(), spec, percdamp=0.01, act_order=act_order, static_groups=False,
                                       loop="torch")  # fmt: skip
    spqr, spqr_loss, info = spqr_quantize(W, H.clone(), spec, percdamp=0.01, act_order=act_order, stat_bits=None,
                                          outlier_threshold=None)  # fmt: skip
    assert torch.equal(gptq.qweight, spqr.qweight) and torch.equal(gptq.scale, spqr.scale)
    assert torch.equal(gptq.dequantize(), spqr.dequantize()) and torch.equal(gptq_loss, spqr_loss)
    assert info["outliers"] == 0


def test_outliers_lower_the_error_and_are_kept_exactly():
    W, H, X = layer()
    spec = WeightSpec(format="int", bits=3, group_size=16, sym=False)
    plain, plain_loss, _ = spqr_quantize(W, H.clone(), spec, outlier_threshold=None)
    sparse, sparse_loss, info = spqr_quantize(W, H.clone(), spec, outlier_threshold=0.2)
    assert 0 < info["outlier_fraction"] < 0.05
    assert sparse_loss.sum() < plain_loss.sum()
    assert output_error(W, sparse.dequantize(), X) < output_error(W, plain.dequantize(), X)
    # the outliers hold the 16-bit values the dense matrix has at their positions; elsewhere the grid's values
    dense = sparse.dequantize()
    grid = super(SpQRWeight, sparse).dequantize()
    at = torch.zeros(W.numel(), dtype=torch.bool)
    at[sparse.outlier_index] = True
    assert torch.equal(dense.flatten()[at], sparse.outlier_value.float())
    assert torch.equal(dense.flatten()[~at], grid.flatten()[~at])


def test_statistics_take_at_most_two_to_the_stat_bits_values_per_group_of_rows():
    W, H, _ = layer(rows=64)
    spec = WeightSpec(format="int", bits=3, group_size=16, sym=False)
    q, _, _ = spqr_quantize(W, H.clone(), spec, stat_bits=3, stat_group=16)
    for rows in q.scale.split(16):
        for column in rows.T:
            assert len(column.unique()) <= 2**3
    assert torch.equal(q.zero, q.zero.round())  # zero points stay whole numbers: the codes stay integers
    values = torch.tensor([0.5, 1.0, 2.0, 8.0, 3.0])
    assert torch.allclose(quantize_stat(values, 8, 5), values, rtol=1e-2)  # 8 bits: nearly exact
    # a group of equal values (zero points of a symmetric layer) is kept as it is; a partial last group is filled
    assert torch.equal(quantize_stat(torch.full((16,), 4.0), 3, 16, integer=True), torch.full((16,), 4.0))
    partial = quantize_stat(torch.arange(20.0), 3, 16)
    assert (
        partial.shape == (20,)
        and torch.isfinite(partial).all()
        and (partial[16:] - torch.arange(16.0, 20)).abs().max() < 1
    )


def test_storage_counts_the_tensors_kept():
    W, H, _ = layer(rows=64, columns=256)
    spec = WeightSpec(format="int", bits=3, group_size=16, sym=False)
    q, _, info = spqr_quantize(W, H.clone(), spec, stat_bits=3, stat_group=16, outlier_threshold=0.2)
    rows, columns, groups = 64, 256, 16
    bits = (rows * columns * 3 + rows * groups * 2 * 3 + (rows // 16) * groups * 2 * 2 * 16
            + info["outliers"] * 32 + (rows + 1) * 32 + columns * 32)  # fmt: skip
    assert q.stored_bytes() == -(-bits // 8)
    fewer = SpQRWeight(q.qweight, q.scale, q.zero, q.g_idx, q.spec, None, q.outlier_index[:-1],
                       q.outlier_value[:-1], 3, 16)  # fmt: skip
    assert q.stored_bytes() - fewer.stored_bytes() == 4  # one outlier: a 16-bit value and a 16-bit column
    count = StorageCount()
    count.add("layer", q)
    assert count.summary(torch.nn.Linear(1, 1))["bits_per_weight"] == pytest.approx(8 * q.stored_bytes() / W.numel())
    # rows of a stacked group keep their own outliers
    top, bottom = q.rows(0, 40), q.rows(40, 64)
    assert top.outliers + bottom.outliers == q.outliers
    assert torch.equal(torch.cat([top.dequantize(), bottom.dequantize()]), q.dequantize())


def test_pipeline_runs_spqr_and_reports_bits_per_weight():
    model = tiny_model("llama")
    calib = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(1))
    kept = {}
    report = ptq.quantize(model, method="spqr", bits=3, group_size=16, calib=calib, device="cpu",
                          options={"spqr": {"stat_group": 8}}, on_quantized=kept.__setitem__)  # fmt: skip
    storage = report["storage"]
    assert storage["format"] == "spqr" and 3 < storage["bits_per_weight"] < 6
    layers = report["blocks"][0]["layers"]
    assert layers["self_attn.q_proj"]["loss"] > 0
    # each linear reports its own outliers (q, k and v are solved as one stack)
    for name in ("q", "k", "v"):
        assert layers[f"self_attn.{name}_proj"]["outliers"] == kept[f"model.layers.0.self_attn.{name}_proj"].outliers
    assert sum(q.outliers for q in kept.values()) > 0


def test_options_are_checked():
    with pytest.raises(ValueError, match="stat_bits"):
        ptq.quantize(tiny_model("llama"), method="spqr", bits=3, group_size=16, options={"spqr": {"stat_bits": 1}})
    with pytest.raises(ValueError, match="outlier_threshold"):
        ptq.quantize(tiny_model("llama"), method="spqr", bits=3, options={"spqr": {"outlier_threshold": -1}})


def test_progress_files_keep_the_outliers(tmp_path):
    """resume=true restores SpQR layers with their outliers and statistics (ptq/storage/progress.py)."""
    from ptq.storage.progress import Progress

    W, H, _ = layer()
    q, _, _ = spqr_quantize(W, H.clone(), WeightSpec(format="int", bits=3, group_size=16, sym=False))
    block = torch.nn.Module()
    block.linear = torch.nn.Linear(256, 64, bias=False)
    progress = Progress(tmp_path, {"method": "spqr"})
    progress.start(False)
    progress.save_block(0, block, {"linear": q}, {"layers": {}})
    restored, _ = progress.restore_block(0, block, torch.device("cpu"))
    assert isinstance(restored["linear"], SpQRWeight) and restored["linear"].outliers == q.outliers > 0
    assert torch.equal(restored["linear"].dequantize(), q.dequantize())
    assert restored["linear"].stored_bytes() == q.stored_bytes()
