"""GPU paths give the CPU results (run on a machine with CUDA; skipped elsewhere)."""

import pytest
import torch

import ptq
from ptq.methods.gptq import gptq_quantize
from ptq.quant import WeightSpec
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
    spec = WeightSpec("int", 4, 64, False)
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


@pytest.mark.parametrize("offload,activations", [(False, "auto"), (True, "auto"), (True, "device")])
def test_gptq_stages_continued_from_the_last_pass_equal_passes_from_the_start_in_bf16_on_gpu(
    offload, activations, monkeypatch
):
    """With the activations on the GPU, each true-sequential pass continues the block from the previous one, and
    the next block's inputs are finished from the last: bit for bit what passes from the block's start give. With
    the activations in host memory (offloading's default) nothing more is kept on the GPU."""
    from tests.test_pipeline import quantize_recording_shortcuts

    calib = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))
    settings = dict(calib=calib, device="cuda", offload=offload, activations=activations)
    fast, plain = tiny_model("llama").to(torch.bfloat16), tiny_model("llama").to(torch.bfloat16)
    events, outputs, _ = quantize_recording_shortcuts(monkeypatch, fast, shortcuts=True, **settings)
    on_host = offload and activations == "auto"
    assert events == ([] if on_host else ["attention", "mlp", "output", "attention", "mlp"])
    assert next(fast.parameters()).device.type == ("cpu" if offload else "cuda")
    _, plain_outputs, _ = quantize_recording_shortcuts(monkeypatch, plain, shortcuts=False, **settings)
    assert torch.equal(outputs[0], plain_outputs[0])
    for (name, a), b in zip(fast.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method", ["awq", "smoothquant"])
@pytest.mark.parametrize("offload", [False, True])
def test_scaling_methods_on_gpu_match_cpu(method, offload):
    calib = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))
    x = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    settings = dict(bits=4, group_size=16) if method == "awq" else dict(bits=8, group_size=-1, sym=True, act_bits=8)
    on_cpu, on_gpu = tiny_model("llama"), tiny_model("llama")
    cpu = ptq.quantize(on_cpu, method=method, calib=calib, device="cpu", **settings)
    gpu = ptq.quantize(on_gpu, method=method, calib=calib, device="cuda", offload=offload, **settings)
    got, want = on_gpu.cpu()(x).logits, on_cpu(x).logits
    if method == "awq":
        # On a tiny random model the grid's losses are nearly flat (a few % across alphas) and fp32
        # summation order moves them by ~0.2%, so the devices may pick neighbouring alphas: each
        # device's best candidate must be as good as the other's. (A decisive search must agree
        # exactly: test_awq_search_on_gpu_makes_the_cpu_choice.)
        chosen = [
            (stats["awq_loss"], b_gpu["layers"][name]["awq_loss"])
            for b_cpu, b_gpu in zip(cpu["blocks"], gpu["blocks"], strict=True)
            for name, stats in b_cpu["layers"].items()
            if "awq_loss" in stats
        ]
        assert chosen
        for loss_cpu, loss_gpu in chosen:
            assert abs(loss_gpu / loss_cpu - 1) < 0.05
        assert torch.isfinite(got).all()
    else:
        # Float summation order can flip a rounding decision of an activation for W8A8, so logits
        # agree closely on the whole, not to the last bit everywhere.
        assert (got - want).norm() < 1e-2 * want.norm()


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_search_on_gpu_makes_the_cpu_choice(bits):
    from ptq.methods.awq import AWQ
    from tests.test_awq import lone_linear_group, outlier_inputs

    spec = WeightSpec("int", bits, 32)
    x = outlier_inputs(512, 128, seed=0)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    block, group = lone_linear_group(weight)
    scales_cpu, alpha_cpu, losses_cpu = AWQ(spec).search_scale(group, [((x,), {})])
    block, group = lone_linear_group(weight)
    block.cuda()
    scales_gpu, alpha_gpu, losses_gpu = AWQ(spec).search_scale(group, [((x.cuda(),), {})])
    assert alpha_gpu == alpha_cpu > 0
    torch.testing.assert_close(scales_gpu.cpu(), scales_cpu)
    torch.testing.assert_close(losses_gpu.cpu(), losses_cpu, rtol=1e-3, atol=0)


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_scores_from_bf16_products_make_the_fp32_choice(bits):
    """With bf16 activations on CUDA the lone-linear search builds X^T X and scores E G on the tensor
    cores (ptq/methods/stats.py); the same bf16 values promoted to fp32 take the fp32 path. With G
    rounded to bf16 in one part the losses moved by 6.5e-4 here; split in two parts, by 2.5e-5 on an
    H100 (cuBLAS's bf16 reduction order; 2e-7 when emulated in float64), against gaps of 1.4e-2."""
    from ptq.methods.awq import AWQ
    from tests.test_awq import lone_linear_group, outlier_inputs

    spec = WeightSpec("int", bits, 128)
    x = outlier_inputs(8192, 1024, seed=0).bfloat16().cuda()
    weight = torch.randn(512, 1024, generator=torch.Generator().manual_seed(1)).bfloat16()
    block, group = lone_linear_group(weight)
    block.cuda()
    _, alpha_fast, losses_fast = AWQ(spec).search_scale(group, [((x,), {})])
    _, alpha_fp32, losses_fp32 = AWQ(spec).search_scale(group, [((x.float(),), {})])
    assert alpha_fast == alpha_fp32 > 0
    worst = ((losses_fast - losses_fp32).abs() / losses_fp32).max().item()
    gaps = (losses_fp32[1:] - losses_fp32[:-1]).abs() / losses_fp32[1:]
    print(f"bf16 scoring: worst relative loss error {worst:.2e}; smallest gap between neighbours {gaps.min():.2e}")
    assert worst < 1e-4


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
    W = torch.randn(384, columns, generator=torch.Generator().manual_seed(3)).cuda()  # rows: a stable fraction
    spec = WeightSpec("int", bits, group, sym)
    args = (W, H, spec, block_size, 0.01, act_order, static_groups)
    fast, fast_losses, _ = gptq_quantize(*args)
    monkeypatch.setattr(gptq_kernel, "available", lambda *_args: False)
    slow, slow_losses, _ = gptq_quantize(*args)
    # fp32 rounding order may flip a code that sits on a rounding boundary; the flip then changes
    # the errors spread over that row's later columns, so only a few rows may differ, and slightly.
    assert (fast.qweight != slow.qweight).float().mean() < 1e-2
    assert torch.equal(fast.g_idx, slow.g_idx)
    rows_differ = (fast.qweight != slow.qweight).any(dim=1)
    assert rows_differ.float().mean() <= 0.05
    torch.testing.assert_close(fast.scale[~rows_differ], slow.scale[~rows_differ], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast_losses[~rows_differ], slow_losses[~rows_differ], rtol=1e-3, atol=1e-6)
    assert abs(fast_losses.sum() / slow_losses.sum() - 1) < 5e-3


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


def test_half_precision_gram_products_stay_far_below_the_damping():
    from ptq.methods.stats import GRAM_ROWS, add_gram, complete_gram

    width = 2 * GRAM_ROWS + 512  # three row blocks: the lower ones are mirrored from the upper
    x = (torch.randn(16384, width, device="cuda") * torch.linspace(0.01, 30, width, device="cuda")).bfloat16()
    fast = torch.zeros(width, width, device="cuda")
    for part in x.split(4096):
        add_gram(fast, part, "auto")
    complete_gram(fast)
    exact = x.double().T @ x.double()
    slow = torch.zeros(width, width, device="cuda")
    add_gram(slow, x, "fp32")
    assert torch.equal(fast[GRAM_ROWS:, :GRAM_ROWS], fast[:GRAM_ROWS, GRAM_ROWS:].T)
    err_fast = ((fast.double() - exact).norm() / exact.norm()).item()
    err_slow = ((slow.double() - exact).norm() / exact.norm()).item()
    # fp32 sums of exact products; cuBLAS's bf16 reduction order is coarser (2.8e-5 measured on an
    # H100, 1.8e-6 for fp32 products): both far below the 1e-2 damping GPTQ adds to H.
    assert err_slow < 1e-5 and err_fast < 1e-4


@pytest.mark.parametrize("group", [64, 128])
def test_int4_kernel_matches_dequantize_then_matmul(group):
    from ptq.quant import quantize_weight
    from ptq.quant.linear import QuantLinear

    torch.manual_seed(0)
    weight = torch.randn(512, 1024, device="cuda")
    qw = quantize_weight(weight, WeightSpec("int", 4, group, False))
    layer = QuantLinear.from_quantized(qw, None, torch.bfloat16).cuda()
    x = torch.randn(3, 17, 1024, device="cuda", dtype=torch.bfloat16)
    want = layer(x)  # dequantize (fp16 scales), then a bf16 matmul
    layer.use_int4_kernel()
    got = layer(x)
    assert layer.qweight is None and layer.int4_weight is not None
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


def test_int8_kernel_on_gpu_matches_cpu():
    from ptq.quant.linear import Int8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    x = torch.randn(1, 5, 256)  # a decode-sized batch: padded to the 17 rows torch._int_mm needs
    # The same int8 codes on both devices (rounding at the symmetric grid's exact ties may differ between
    # devices: tests/test_method_formats.py and the pipeline tests cover quantization itself).
    cpu = Int8Linear.from_weight(linear.weight, linear.bias)
    gpu = Int8Linear.from_weight(linear.weight, linear.bias).cuda()
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8", "fp8_e4m3"])
def test_gptq_float_formats_in_the_triton_loop_match_the_cpu_loop(fmt):
    """Float formats with known group scales (GPTQ's default: activation order, static groups) run in
    the Triton column loop on CUDA; its minifloat rounding must give the CPU loop's codes."""
    from ptq.methods import gptq_kernel

    X = correlated_inputs(1024, 256, seed=0)
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(128, 256, generator=torch.Generator().manual_seed(1))
    spec = WeightSpec.build(fmt)
    assert gptq_kernel.available(W.cuda(), spec, groups_known=True)
    cpu = gptq_quantize(W, H, spec, act_order=True, static_groups=True)[0]
    gpu = gptq_quantize(W.cuda(), H.cuda(), spec, act_order=True, static_groups=True)[0]
    # static groups: from the original weights on both (CUDA divides by a scalar as a multiplication by
    # its reciprocal, so a scale may differ in its last bit)
    torch.testing.assert_close(gpu.scale.cpu(), cpu.scale, rtol=2e-7, atol=0)
    cpu_w, gpu_w = cpu.dequantize(), gpu.dequantize().cpu()
    assert ((cpu_w - gpu_w).abs() > 1e-6).float().mean() < 0.01
    err_cpu = ((X @ (W - cpu_w).T) ** 2).sum()
    err_gpu = ((X @ (W - gpu_w).T) ** 2).sum()
    assert abs(err_gpu / err_cpu - 1) < 0.01


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "fp8_e4m3"])
def test_compact_layers_compute_on_gpu_as_on_cpu(fmt):
    from ptq.quant import quantize_weight
    from ptq.quant.linear import CompactLinear

    W = torch.randn(128, 256, generator=torch.Generator().manual_seed(2))
    layer = CompactLinear(quantize_weight(W, WeightSpec.build(fmt)), None, torch.float32)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3))
    want = layer(x)
    layer.cuda()
    assert torch.equal(layer.dequantized_weight(torch.float32).cpu(), layer.cpu().dequantized_weight(torch.float32))
    torch.testing.assert_close(layer.cuda()(x.cuda()).cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["bf16", "w4a16", "w4a16-actorder", "w8a8", "fp8", "nvfp4", "mxfp4"])
def test_joined_projections_on_the_kernels_and_in_a_cuda_graph(fmt):
    """ptq.fuse on CUDA: the joined products (ptq's one-token and few-token kernels, cuBLAS for bf16; act-order
    with its inputs in group order) give the separate layers' logits up to bf16 rounding, and a decode step with
    them replays from a CUDA graph, and so does a prefill (``ptq.bench.infer``'s graphed prefill)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ptq.bench.infer import convert, graphed_decode, measure
    from ptq.fuse import fuse_projections, sort_act_order_groups

    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    convert(model, fmt, group_size=128)
    ids = torch.randint(0, 256, (1, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        want = [model(input_ids=ids[:, :n]).logits.float() for n in (1, 16)]
        assert sort_act_order_groups(model) == (14 if fmt == "w4a16-actorder" else 0)  # 7 linears in each block
        assert fuse_projections(model) == 4
        got = [model(input_ids=ids[:, :n]).logits.float() for n in (1, 16)]
    for g, w in zip(got, want, strict=True):
        assert ((g - w).norm() / w.norm()).item() < 2e-2
    assert graphed_decode(model, ids, steps=4) > 0
    timed = measure(model, 256, prefill_len=16, decode_batches=[1], prompt=8, steps=2, repeat=2)
    assert "prefill_graphed_error" not in timed, timed.get("prefill_graphed_error")  # the prefill replays
    assert timed["prefill_graphed_tokens_per_s"] > 0 and timed["prefill_host_s"] > 0


@pytest.mark.parametrize("rows", [1, 16, 300])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_w8a8_layers_compiled_match_eager(fmt, rows):
    """Under torch.compile a W8A8 layer rounds the activations with torch ops (which inductor fuses into what
    wrote x) instead of the quantize kernel, then multiplies the codes (few tokens: ``codes_matmul``'s tiles):
    the same codes, but where inductor's division rounds a tie the other way, so the compiled output is the
    eager one up to rare codes and the sums' order."""
    from ptq.quant.linear import Fp8Linear, Int8Linear

    cls = Int8Linear if fmt == "int8" else Fp8Linear
    torch.manual_seed(0)
    layer = cls.from_weight(torch.randn(384, 512) * 0.02, None).cuda()
    x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)  # 300: more than the few-token tiles take
    with torch.no_grad():
        eager = layer(x).float()
        compiled = torch.compile(layer, dynamic=False)(x).float()
    assert ((compiled - eager).norm() / eager.norm()).item() < 1e-3
