"""GPU paths give the CPU results (run on a machine with CUDA; skipped elsewhere)."""

import pytest
import torch

import ptq
from ptq.methods.gptq import gptq_quantize
from ptq.quant import QuantSpec
from tests.conftest import tiny_model
from tests.test_gptq import correlated_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU test)"),
]


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_solver_on_gpu_matches_cpu(act_order):
    X = correlated_inputs(1024, 256, seed=0)
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(128, 256, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(4, 64, False)
    cpu = gptq_quantize(W, H, spec, act_order=act_order)[0].dequantize()
    gpu = gptq_quantize(W.cuda(), H.cuda(), spec, act_order=act_order)[0].dequantize().cpu()
    # Different float summation orders can flip a rounding decision; almost all codes must agree.
    assert ((cpu - gpu).abs() > 1e-5).float().mean() < 0.01
    err_cpu = ((X @ (W - cpu).T) ** 2).sum()
    err_gpu = ((X @ (W - gpu).T) ** 2).sum()
    assert abs(err_gpu / err_cpu - 1) < 0.01


@pytest.mark.parametrize("offload", [False, True])
def test_gptq_pipeline_on_gpu_matches_cpu(offload):
    calib = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))
    x = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    on_cpu, on_gpu = tiny_model("llama"), tiny_model("llama")
    ptq.quantize(on_cpu, method="gptq", bits=4, group_size=16, calib=calib, device="cpu")
    ptq.quantize(on_gpu, method="gptq", bits=4, group_size=16, calib=calib, device="cuda", offload=offload)
    assert next(on_gpu.parameters()).device.type == ("cpu" if offload else "cuda")
    torch.testing.assert_close(on_gpu.cpu()(x).logits, on_cpu(x).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["awq", "smoothquant"])
@pytest.mark.parametrize("offload", [False, True])
def test_scaling_methods_on_gpu_match_cpu(method, offload):
    calib = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))
    x = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    settings = dict(bits=4, group_size=16) if method == "awq" else dict(bits=8, group_size=-1, sym=True, act_bits=8)
    on_cpu, on_gpu = tiny_model("llama"), tiny_model("llama")
    cpu = ptq.quantize(on_cpu, method=method, calib=calib, device="cpu", **settings)
    gpu = ptq.quantize(on_gpu, method=method, calib=calib, device="cuda", offload=offload, **settings)
    if method == "awq":  # the searches must make the same choices
        for b_cpu, b_gpu in zip(cpu["blocks"], gpu["blocks"], strict=True):
            for name, stats in b_cpu["layers"].items():
                assert stats.get("awq_alpha") == b_gpu["layers"][name].get("awq_alpha"), name
    # Float summation order can flip a rounding decision (of a weight, or of an activation for
    # W8A8), so logits agree closely on the whole, not to the last bit everywhere.
    got, want = on_gpu.cpu()(x).logits, on_cpu(x).logits
    assert (got - want).norm() < 1e-2 * want.norm()


SOLVER_CASES = [  # (bits, group, sym, act_order, static_groups, block_size, columns)
    (4, 128, False, False, False, 128, 512),  # the default: groups start on lazy-block boundaries
    (3, 64, True, False, False, 128, 576),  # two groups per block, a partial last block (SmolLM2's 576)
    (4, -1, False, False, False, 128, 256),  # per channel
    (4, 32, False, True, False, 128, 256),  # act-order, dynamic groups
    (4, 32, False, True, True, 128, 256),  # act-order, static groups
    (2, 100, False, False, False, 64, 300),  # a group spanning blocks: the PyTorch loop (no kernel)
]


@pytest.mark.parametrize("bits,group,sym,act_order,static_groups,block_size,columns", SOLVER_CASES)
def test_triton_column_loop_matches_the_pytorch_loop(
    monkeypatch, bits, group, sym, act_order, static_groups, block_size, columns
):
    from ptq.methods import gptq_kernel

    X = correlated_inputs(2048, columns, seed=2).cuda()
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(96, columns, generator=torch.Generator().manual_seed(3)).cuda()
    spec = QuantSpec(bits, group, sym)
    args = (W, H, spec, block_size, 0.01, act_order, static_groups)
    fast, fast_losses, _ = gptq_quantize(*args)
    monkeypatch.setattr(gptq_kernel, "available", lambda _w: False)
    slow, slow_losses, _ = gptq_quantize(*args)
    assert ((fast.qweight != slow.qweight).float().mean()) < 1e-3  # a rounding tie may flip, nothing more
    torch.testing.assert_close(fast.scale, slow.scale, rtol=1e-4, atol=1e-6)
    assert torch.equal(fast.g_idx, slow.g_idx)
    torch.testing.assert_close(fast_losses, slow_losses, rtol=1e-3, atol=1e-6)


def test_stories260k_gpu_quantized_weights_match_cpu():
    """The whole pipeline on the real model: GPU (Triton column loop, CUDA matmuls) vs CPU."""
    from tests.conftest import require_assets

    root = require_assets("models/stories260K", "data/wikitext-2/valid.tokens.txt")
    from ptq import data, models

    source = models.resolve_source(None, None, None, "models/stories260K", None, root)
    tokenizer = models.load_tokenizer(source)
    calib = data.load_calibration(tokenizer, "wikitext2_valid", None, 16, 256, 0, root).input_ids
    on_cpu, on_gpu = models.load_model(source, torch.float32), models.load_model(source, torch.float32)
    ptq.quantize(on_cpu, method="gptq", bits=4, group_size=32, calib=calib, device="cpu")
    ptq.quantize(on_gpu, method="gptq", bits=4, group_size=32, calib=calib, device="cuda")
    for (name, w_cpu), w_gpu in zip(on_cpu.state_dict().items(), on_gpu.cpu().state_dict().values(), strict=True):
        differ = ((w_cpu - w_gpu).abs() > 1e-5 * w_cpu.abs().max()).float().mean().item()
        assert differ < 0.01, (name, differ)  # rounding flips from fp32 order propagate, but stay rare
