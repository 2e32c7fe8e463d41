import json

import pytest
import torch

from ptq.bench.quant import RandomCheckpoint, main, shape_config
from ptq.lazy import meta_model


def test_random_checkpoint_draws_the_same_tensor_for_the_same_name_and_seed():
    model = meta_model(shape_config("smollm2-135m", 1), torch.bfloat16)
    a, b = RandomCheckpoint(model, 0, torch.device("cpu")), RandomCheckpoint(model, 1, torch.device("cpu"))
    name = "model.layers.0.mlp.down_proj.weight"
    first = a.read(name)
    assert first.shape == (576, 1536) and first.dtype == torch.bfloat16 and first.device.type == "cpu"
    assert torch.equal(first, a.read(name))
    assert not torch.equal(first, b.read(name))  # another seed
    assert not torch.equal(first[:, :576], a.read("model.layers.0.self_attn.q_proj.weight"))  # another name
    assert abs(first.float().std().item() - model.config.initializer_range) < 1e-3
    assert torch.equal(a.read("model.layers.0.input_layernorm.weight"), torch.ones(576, dtype=torch.bfloat16))
    assert a.bytes_read == (2 * first.numel() + 576 * 576 + 576) * 2  # down twice, q, the norm


def test_random_lazy_benchmark_reads_every_block_through_the_lazy_path(tmp_path, capsys):
    out = tmp_path / "record.json"
    main(["--shape", "smollm2-135m", "--layers", "2", "--method", "gptq", "--nsamples", "4", "--seqlen", "32",
          "--batch-size", "2", "--repeat", "1", "--random-lazy", "--offload", "--out", str(out)])  # fmt: skip
    record = json.loads(out.read_text())
    assert record["random_lazy"] and record["offload"] and record["median_seconds"] > 0
    assert len(record["runs"][0]["block_s"]) == 2
    assert record["runs"][0]["peak_bytes_per_rank"] == [[0, record["runs"][0]["peak_rss_bytes"]]]  # CPU: no GPU bytes
    model = meta_model(shape_config("smollm2-135m", 2), torch.bfloat16)
    every_parameter = sum(p.numel() * 2 for p in model.parameters())  # tied head: the embedding once
    assert record["runs"][0]["checkpoint_bytes_read"] == every_parameter


def test_random_lazy_needs_offload():
    with pytest.raises(SystemExit):
        main(["--shape", "smollm2-135m", "--layers", "1", "--random-lazy"])


def test_kernel_records_compare_each_format_with_bf16_once_it_is_measured():
    from ptq.bench.kernels import add_speedups

    record = {"formats": [{"format": "w4a16", "block_seconds": {1: 2.0}}]}
    add_speedups(record)  # bf16 not measured yet (a run cut short): nothing to compare with
    assert "block_speedup_vs_bf16" not in record["formats"][0]
    record["formats"].insert(0, {"format": "bf16", "block_seconds": {1: 3.0}})
    add_speedups(record)
    assert record["formats"][1]["block_speedup_vs_bf16"] == {1: 1.5}
    assert record["formats"][0]["block_speedup_vs_bf16"] == {1: 1.0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message a machine without a GPU gets")
@pytest.mark.parametrize("module", ["ptq.bench.infer", "ptq.bench.kernels"])
def test_kernel_benchmarks_say_they_need_a_gpu(module):
    import importlib

    with pytest.raises(SystemExit, match=f"{module} measures CUDA kernels: run it on a machine with a GPU"):
        importlib.import_module(module).main(["--formats", "bf16"])


def test_inference_records_name_the_kernel_switches_they_ran_under(monkeypatch):
    from ptq.bench.infer import kernel_settings
    from ptq.quant import kernels
    from ptq.quant import linear as quantized_linears

    monkeypatch.setattr(kernels, "FP8_FAST_ACCUM", False)
    monkeypatch.setattr(quantized_linears, "COMPILED_ROUNDING", "kernel")
    settings = kernel_settings()
    assert settings["PTQ_FP8_FAST_ACCUM"] is False and settings["PTQ_W8A8_COMPILED_ROUNDING"] == "kernel"
    assert set(settings) == {"PTQ_KERNELS", "PTQ_KERNEL_TUNE", "PTQ_KERNEL_TILE_STORE", "PTQ_FP8_FAST_ACCUM",
                             "PTQ_W8A8_COMPILED_ROUNDING"}  # fmt: skip


@pytest.mark.parametrize("name,kind", [
    ("nvjet_sm90_tst_128x8_64x12_2x1_v_bz_splitK_TNT", "linear"), ("_int4_gemv_kernel", "linear"),
    ("_skinny_kernel", "linear"), ("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16_knob_3", "attention"),
    ("triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_add", "attention"),
    ("_decode_attention_kernel", "attention"), ("triton_poi_fused_add_cat_cos_decode_attention_mul_2", "attention"),
    ("triton_red_fused__to_copy_abs_amax_clamp_codes_matmul_div_mul_silu_view_9", "other"),
    ("triton_per_fused_add_mean_mul_pow_rsqrt_3", "other"),
])  # fmt: skip
def test_kernels_are_told_apart_by_name_as_profiles_and_scripts_count_them(name, kind):
    """Inductor names its fused kernels after every op they touch (ptq's codes_matmul included): its rounding
    and norm kernels are not matmuls; cuBLAS's nvjet kernels are."""
    from ptq.bench.infer import kernel_kind

    assert kernel_kind(name) == kind


def test_static_decode_step_gives_the_next_tokens_logits_of_a_dynamic_cache():
    from transformers import DynamicCache

    from ptq.bench.infer import static_decode_step
    from tests.conftest import tiny_model

    model = tiny_model("llama").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        step = static_decode_step(model, ids, steps=3)
        cache = DynamicCache()
        first = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        assert torch.equal(step.token, first)
        expected = model(input_ids=first, past_key_values=cache, use_cache=True).logits[:, -1]
        assert torch.allclose(step().logits[:, -1], expected, atol=1e-5)
        step.token.copy_(expected.argmax(-1, keepdim=True))  # the caller moves the step on, as graphed_decode does
        step.position.add_(1)
        after = model(input_ids=step.token, past_key_values=cache, use_cache=True).logits[:, -1]
        assert torch.allclose(step().logits[:, -1], after, atol=1e-5)
        step.restart()  # the prompt's cache again, whatever steps ran since (graphed_decode's warm-up)
        assert torch.equal(step.token, first) and step.position.item() == ids.shape[1]
        assert torch.allclose(step().logits[:, -1], expected, atol=1e-5)
