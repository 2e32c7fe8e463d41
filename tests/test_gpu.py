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
