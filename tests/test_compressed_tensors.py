"""Saving quantized models in the compressed-tensors format (ptq.storage.compressed_tensors) and loading
them with transformers through compressed-tensors, on the CPU.

Scales are written in the model's dtype, as compressed-tensors does. The tiny models here are fp32, so
the loaded weights equal ptq's dequantized ones exactly (compressed-tensors computes s * (q - z) in fp32
as ptq does), except where a tolerance says why.
"""

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    CompressedTensorsConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import ptq
from ptq.models import get_submodule
from ptq.quant import WeightSpec, quantize_weight
from ptq.quant.activations import input_quantizer_of
from ptq.recipe import Recipe
from ptq.storage.compressed_tensors import (
    CompressedStore,
    compression_format,
    quantization_config,
    save,
    scale_and_zero,
    tensors_for,
    unquantized_linears,
    weight_args,
)
from ptq.storage.shards import INDEX

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.format import infer_module_format  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402

VOCAB = 128
CALIB = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
BF16_ROUNDING = 2.0**-8  # relative error of rounding to bfloat16 (8 significant bits, to nearest)


def tiny_model(kind: str, tie: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    sizes = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=tie,
    )  # fmt: skip
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**sizes)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**sizes)).eval()  # q/k/v with biases


def quantize_and_collect(model, recipe) -> dict:
    collected = {}
    ptq.quantize(model, recipe, calib=CALIB, device="cpu", on_quantized=collected.__setitem__)
    return collected


def checkpoint_parts(model, recipe, collected, dtype) -> tuple[dict, dict]:
    """Each linear's tensors (with its static input scale, if any) and the quantization_config."""
    tensors = {}
    for name, qw in collected.items():
        quantizer = input_quantizer_of(get_submodule(model, name))
        input_scale = quantizer.scale if quantizer is not None and quantizer.spec.calibrated else None
        tensors[name] = tensors_for(name, qw, input_scale, activations=recipe.activations, dtype=dtype)
    act_order = any(not qw.has_contiguous_groups() for qw in collected.values())
    return tensors, quantization_config(recipe, unquantized_linears(model, collected), act_order)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


# How transformers loads each case. "compressed": the default (the weights load packed and compressed-
# tensors decompresses them at the first forward; activations are quantized at run time). "dequantize":
# CompressedTensorsConfig(dequantize=True), the weights dequantized while loading and the model left dense,
# for the formats whose default load fails with compressed-tensors 0.20.1 on the CPU:
# - asymmetric int (pack-quantized): the library lays out its modules with compress() on the meta device,
#   which skips packing the zero point (compressors/pack_quantized/base.py), so transformers refuses the
#   checkpoint's packed int32 zero points: "Reinit due to size mismatch - ckpt: torch.Size([8, 2]) vs
#   model:torch.Size([64, 2])".
# - nvfp4, mxfp4, mxfp8: decompression makes bfloat16 weights whatever the model's dtype (nvfp4/helpers.py
#   unpack_fp4_from_uint8, mx_utils.py decompress_mx_scale), so an fp32 forward fails with "expected m1 and
#   m2 to have the same dtype, but got: float != c10::BFloat16" (the default load works in bfloat16).
COMPRESSED, DEQUANTIZE = "compressed", "dequantize"
FP32, BF16 = torch.float32, torch.bfloat16
W4_SYM = Recipe.build("rtn", bits=4, group_size=32, sym=True)
GPTQ_W4_SYM = Recipe.build("gptq", bits=4, group_size=32, sym=True)
W8A8 = Recipe.build("rtn", bits=8, group_size=-1, sym=True, act_bits=8)
W8A8_STATIC = Recipe.build("rtn", bits=8, group_size=-1, sym=True, act_bits=8, act_granularity="per_tensor")
FP8_STATIC = Recipe.build("rtn", "fp8_e4m3", act_format="fp8_e4m3", act_granularity="per_tensor")
# model, recipe, how transformers loads it, the checkpoint's dtype, the loaded weights' relative tolerance
CASES = {
    "w4a16-sym-g32": ("llama", W4_SYM, COMPRESSED, FP32, 0.0),
    "w4a16-sym-g32-qwen2": ("qwen2", W4_SYM, COMPRESSED, FP32, 0.0),
    # bf16 scales (a bf16 model): each loaded weight is s * (q - z) with s rounded to bf16
    "w4a16-sym-g32-bf16": ("llama", W4_SYM, COMPRESSED, BF16, BF16_ROUNDING),
    "w4a16-asym-g32": ("llama", Recipe.build("rtn", bits=4, group_size=32, sym=False), DEQUANTIZE, FP32, 0.0),
    "int4-sym-per-channel": ("llama", Recipe.build("rtn", bits=4, group_size=-1, sym=True), COMPRESSED, FP32, 0.0),
    # GPTQ's default: act-order with static groups (contiguous groups, actorder "static")
    "gptq-act-order-static-groups": ("qwen2", GPTQ_W4_SYM, COMPRESSED, FP32, 0.0),
    "w8a8-int": ("llama", W8A8, COMPRESSED, FP32, 0.0),
    "w8a8-int-static": ("qwen2", W8A8_STATIC, COMPRESSED, FP32, 0.0),
    "fp8-dynamic": ("llama", Recipe.build("rtn", "fp8_e4m3", act_format="fp8_e4m3"), COMPRESSED, FP32, 0.0),
    "fp8-static": ("qwen2", FP8_STATIC, COMPRESSED, FP32, 0.0),
    # the library decompresses NVFP4 into bfloat16 (the E2M1 values are exact, the products are rounded)
    "nvfp4a16": ("llama", Recipe.build("rtn", "nvfp4"), DEQUANTIZE, FP32, BF16_ROUNDING),
    "mxfp4a16": ("qwen2", Recipe.build("rtn", "mxfp4"), DEQUANTIZE, FP32, 0.0),  # exact: powers of 2
    "mxfp8a16": ("llama", Recipe.build("rtn", "mxfp8"), DEQUANTIZE, FP32, 0.0),
}  # fmt: skip


def load(folder, how):
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if how == DEQUANTIZE else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # the dequantize=True loads
@pytest.mark.parametrize("case", list(CASES))
def test_saved_checkpoint_loads_in_transformers_with_ptq_weights_and_logits(tmp_path, case):
    kind, recipe, how, dtype, weight_rtol = CASES[case]
    model = tiny_model(kind)
    collected = quantize_and_collect(model, recipe)
    with torch.no_grad():
        want = model(IDS).logits
    tensors, config = checkpoint_parts(model, recipe, collected, dtype)
    save(model.to(dtype), tensors, config, None, tmp_path / "ckpt")

    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    ct.QuantizationConfig.model_validate(saved)  # (c)
    assert saved["ignore"] == ["lm_head"]

    loaded = load(tmp_path / "ckpt", how)
    with torch.no_grad():
        got = loaded(IDS).logits  # the first forward also decompresses the "compressed" loads
    for name, qw in collected.items():  # (a)
        weight = get_submodule(loaded, name).weight
        assert weight.dtype == torch.float32
        torch.testing.assert_close(weight, qw.dequantize(), rtol=weight_rtol, atol=0)
    if how == COMPRESSED and recipe.activations is not None:
        assert get_submodule(loaded, "model.layers.0.mlp.down_proj").quantization_scheme.input_activations
    # (b) Only W8A8 differs (0.7% dynamic, 0.4% static): compressed-tensors' int8 activation grid is
    # [-128, 127] (quantization/utils/helpers.py, calculate_range), ptq's [-127, 127]; dynamic scales are
    # max|x| / 127.5 there, max|x| / 127 in ptq, which moves some roundings, and static ones saturate
    # inputs beyond the calibrated range at -128 instead of -127. Every other case computes the same numbers.
    assert relative_error(got, want) < 1e-2


def test_nvfp4_w4a4_loads_with_its_calibrated_input_global_scale(tmp_path):
    """W4A4 NVFP4: block scales of the activations dynamic, their global scale calibrated and stored as
    ``input_global_scale``. compressed-tensors 0.20.1 runs NVFP4 only in bfloat16 on the CPU (see above) and
    drops activation quantization with dequantize=True, so the default load runs once in bfloat16 (which
    decompresses the weights, their products rounded to bfloat16), then the loaded model is cast to fp32
    and compared with ptq's model whose quantized weights are rounded to bfloat16 the same way: both then
    quantize the same fp32 activations, and must agree."""
    recipe = Recipe.build("rtn", "nvfp4", act_format="nvfp4")
    model = tiny_model("qwen2")
    collected = quantize_and_collect(model, recipe)
    tensors, config = checkpoint_parts(model, recipe, collected, BF16)
    assert config["config_groups"]["group_0"]["input_activations"]["dynamic"] == "local"
    save(model.to(BF16), tensors, config, None, tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=BF16).eval()
    with torch.no_grad():
        loaded(IDS)
    torch.nn.Module.float(loaded)  # transformers' own .float() refuses quantized models
    model.float()
    for name in collected:
        ours = get_submodule(model, name)
        theirs = get_submodule(loaded, name)
        assert theirs.input_global_scale.item() == input_quantizer_of(ours).scale.item()
        ours.weight.data = ours.weight.data.to(BF16).float()
    with torch.no_grad():
        assert relative_error(loaded(IDS).logits, model(IDS).logits) < 1e-6


def test_sharded_checkpoint_with_tied_embeddings_and_tokenizer(tmp_path):
    class Tokenizer:
        def save_pretrained(self, folder):
            (folder / "tokenizer.json").write_text("{}")

    model = tiny_model("llama", tie=True)
    collected = quantize_and_collect(model, W4_SYM)
    tensors, config = checkpoint_parts(model, W4_SYM, collected, torch.float32)
    files = save(model, tensors, config, Tokenizer(), tmp_path / "ckpt", max_shard_size="20KB")
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and INDEX in files and "tokenizer.json" in files and "config.json" in files
    weight_map = json.loads((tmp_path / "ckpt" / INDEX).read_text())["weight_map"]
    assert set(weight_map.values()) == set(shards)
    assert "lm_head.weight" not in weight_map and "model.embed_tokens.weight" in weight_map  # tied: once
    assert "model.layers.0.self_attn.q_proj.weight_packed" in weight_map
    assert "model.layers.0.self_attn.q_proj.weight" not in weight_map
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["dtype"] == "float32" and saved["use_cache"] is True
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt"]  # no temporary folder left

    loaded = load(tmp_path / "ckpt", COMPRESSED)
    with torch.no_grad():
        assert relative_error(loaded(IDS).logits, model(IDS).logits) < 1e-6
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_a_failed_save_leaves_no_folder(tmp_path):
    class FailingTokenizer:
        def save_pretrained(self, folder):
            raise RuntimeError("disk full")

    model = tiny_model("llama")
    collected = quantize_and_collect(model, W4_SYM)
    tensors, config = checkpoint_parts(model, W4_SYM, collected, torch.float32)
    with pytest.raises(RuntimeError, match="disk full"):
        save(model, tensors, config, FailingTokenizer(), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        save(model, tensors, config, None, tmp_path / "taken")


def random_weight(out_features=64, in_features=128) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(tensor.numel(), dtype=tensor.dtype).copy_(tensor.reshape(-1)).view(torch.uint8)


LAYOUTS = {
    "int4-asym-g32": WeightSpec("int", 4, 32, False),
    "int3-asym-g32": WeightSpec("int", 3, 32, False),  # codes straddle int32 words
    "int4-asym-per-channel": WeightSpec("int", 4, -1, False),
    "int4-asym-per-tensor": WeightSpec("int", 4, 0, False),
    "int8-sym-g32": WeightSpec("int", 8, 32, True),
    "fp8-per-channel": WeightSpec.build("fp8_e4m3"),
    "fp8-g32": WeightSpec("fp8_e4m3", 8, 32, True),
    "fp8-per-tensor": WeightSpec("fp8_e4m3", 8, 0, True),
    "nvfp4": WeightSpec.build("nvfp4"),
    "mxfp4": WeightSpec.build("mxfp4"),
    "mxfp8": WeightSpec.build("mxfp8"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tensors_are_what_the_library_compressor_writes_and_decompress_to_ptq_weights(layout):
    """Bit for bit the tensors of compressed-tensors' own compress() given ptq's dequantized weight and
    parameters (in the library's conventions: signed zero points, E4M3 block scales times the global
    scale), and its decompress() gives back ptq's weight."""
    spec = LAYOUTS[layout]
    qw = quantize_weight(random_weight(), spec)
    fmt = compression_format(spec, None)
    scheme = QuantizationScheme.model_validate({"targets": ["Linear"], "weights": weight_args(spec), "format": fmt})
    compressor = BaseCompressor.get_value_from_registry(fmt)
    scale, zero = scale_and_zero(qw)
    dense = {"weight": qw.dequantize(), "weight_scale": scale}
    if spec.is_int:
        dense["weight_zero_point"] = (zero - 2 ** (spec.bits - 1)).to(torch.int8)
    if spec.format == "nvfp4":
        dense |= {"weight_scale": qw.scale * qw.tensor_scale, "weight_global_scale": qw.tensor_scale.reshape(1)}
    theirs = compressor.compress(dense, scheme)
    ours = tensors_for("layer", qw, dtype=torch.float32)
    assert set(ours) == set(theirs)
    for key, tensor in ours.items():
        assert tensor.dtype == theirs[key].dtype and tensor.shape == theirs[key].shape, key
        assert torch.equal(as_bytes(tensor), as_bytes(theirs[key])), key
    rtol = BF16_ROUNDING if spec.format == "nvfp4" else 0.0  # decompressed in bfloat16
    torch.testing.assert_close(
        compressor.decompress(ours, scheme)["weight"].float(), qw.dequantize(), rtol=rtol, atol=0
    )


def test_bf16_scales_round_once():
    qw = quantize_weight(random_weight(), WeightSpec("int", 4, 32, False))
    tensors = tensors_for("layer", qw, dtype=torch.bfloat16)
    assert tensors["weight_scale"].dtype == torch.bfloat16
    torch.testing.assert_close(tensors["weight_scale"].float(), qw.scale, rtol=BF16_ROUNDING, atol=0)


CONFIGS = {
    **{case: recipe for case, (_, recipe, *_) in CASES.items()},
    "int3-asym-g32": Recipe.build("rtn", bits=3, group_size=32, sym=False),
    "int4-asym-per-tensor": Recipe.build("rtn", bits=4, group_size=0),
    "int4-a8-int": Recipe.build("rtn", bits=4, group_size=-1, sym=True, act_bits=8),
    "fp8-weights-only": Recipe.build("rtn", "fp8_e4m3"),
    "fp8-g32-weights-only": Recipe.build("rtn", "fp8_e4m3", group_size=32),
    "gptq-in-order": Recipe.build("gptq", options={"gptq": {"act_order": False}}),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_quantization_config_is_what_the_library_reads_and_infers(case):
    recipe = CONFIGS[case]
    config = quantization_config(recipe, ["lm_head"], act_order=False)
    parsed = ct.QuantizationConfig.model_validate(config)
    scheme = config["config_groups"]["group_0"]
    assert parsed.format == scheme["format"] == config["format"] and config["quantization_status"] == "compressed"
    for args in (scheme["weights"], scheme["input_activations"]):
        if args is not None:  # written as the library's pydantic model serializes it
            assert QuantizationArgs.model_validate(args).model_dump() == args
    # the format compressed-tensors itself picks for this scheme (compressors/format.py)
    inferred = infer_module_format(torch.nn.Linear, QuantizationScheme.model_validate({**scheme, "format": None}))
    assert inferred.value == config["format"]
    assert scheme["weights"].get("actorder") == ("static" if case.startswith("gptq-act-order") else None)


def test_act_order_with_dynamic_groups_is_refused_naming_what_saves():
    recipe = Recipe.build(
        "gptq", bits=4, group_size=32, sym=True, options={"gptq": {"act_order": True, "static_groups": False}}
    )
    model = tiny_model("llama")
    collected = quantize_and_collect(model, recipe)
    permuted = {name: qw for name, qw in collected.items() if not qw.has_contiguous_groups()}
    assert permuted
    name, qw = next(iter(permuted.items()))
    with pytest.raises(ValueError, match="static_groups=true"):
        tensors_for(name, qw, dtype=torch.float32)
    for act_order in (True, False):  # from the weights, or from the recipe itself
        with pytest.raises(ValueError, match="actorder='group'"):
            quantization_config(recipe, [], act_order)
    with pytest.raises(ValueError, match="removed"):  # compressed-tensors 0.20 has no g_idx layout
        QuantizationArgs(num_bits=4, group_size=32, actorder="group")


@pytest.mark.parametrize(
    "recipe",
    [
        Recipe.build("none"),
        Recipe.build("rtn", "fp8_e5m2"),
        Recipe.build("rtn", "mxfp4", act_format="mxfp4"),
    ],
    ids=["full-precision", "fp8_e5m2", "mxfp4-activations"],
)
def test_unsupported_recipes_raise_naming_what_can_be_saved(recipe):
    with pytest.raises(ValueError, match="compressed-tensors holds int weights .* mxfp4 or mxfp8 weights alone"):
        quantization_config(recipe, [], act_order=False)


def test_unsupported_layers_raise(tmp_path):
    qw = quantize_weight(random_weight(32, 48), WeightSpec("int", 4, 32, True))
    with pytest.raises(ValueError, match="48 input features are not a multiple of group_size=32"):
        tensors_for("layer", qw)
    with pytest.raises(ValueError, match="need their calibrated input_scale"):
        tensors_for("layer", quantize_weight(random_weight(), WeightSpec("int", 8, -1, True)),
                    activations=ptq.ActSpec("int", 8, "per_tensor"))  # fmt: skip
    with pytest.raises(ValueError, match="model.embed_tokens is Embedding"):
        save(tiny_model("llama"), {"model.embed_tokens": {}}, {}, None, tmp_path / "ckpt")


def test_the_pipeline_writes_each_block_as_it_finishes(tmp_path):
    """CompressedStore takes each block when it is final: its tensors leave memory shard by shard, the
    destination appears only at the end, and the folder equals a save of the whole model at once."""
    model = tiny_model("llama")
    out = tmp_path / "streamed"
    store = CompressedStore(model, W4_SYM, out, max_shard_size="8KB")  # a block is ~26 KB at 4 bits
    written_after_block = []

    def block_done(prefix, block):
        store.block_done(prefix, block)
        written_after_block.append((len(store.folder.shards), len(store.pending)))

    collected = {}

    def add(name, qw):
        collected[name] = qw
        store.add(name, qw)

    ptq.quantize(model, W4_SYM, calib=CALIB, device="cpu", on_quantized=add, on_block_done=block_done)
    assert written_after_block[0][0] >= 1 and all(pending == 0 for _, pending in written_after_block)
    assert written_after_block[1][0] > written_after_block[0][0]
    assert not out.exists() and store.folder.buffer_bytes <= 8_000
    files = store.save(model, None)
    shards = [b for f, b in files.items() if f.endswith(".safetensors")]
    assert INDEX in files and len(shards) > 6 and max(shards) < 34_000  # the 32 KB embedding alone
    at_once = tmp_path / "at-once"
    tensors, config = checkpoint_parts(model, W4_SYM, collected, torch.float32)
    save(model, tensors, config, None, at_once)
    assert json.loads((out / "config.json").read_text()) == json.loads((at_once / "config.json").read_text())
    from safetensors.torch import load_file

    def everything(folder):
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    streamed, whole = everything(out), everything(at_once)
    assert set(streamed) == set(whole) and all(torch.equal(streamed[k], whole[k]) for k in whole)


def test_a_failed_run_discards_the_blocks_already_written(tmp_path):
    model = tiny_model("llama")
    store = CompressedStore(model, W4_SYM, tmp_path / "ckpt", max_shard_size="1KB")

    def fail_in_block_1(prefix, block):
        store.block_done(prefix, block)
        if prefix.endswith(".1"):
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        ptq.quantize(model, W4_SYM, calib=CALIB, device="cpu", on_quantized=store.add, on_block_done=fail_in_block_1)
    assert [p.name for p in tmp_path.iterdir()][0].endswith(".partial")  # what a crash would leave
    store.discard()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="max_shard_size='5 parsecs'"):
        CompressedStore(model, W4_SYM, tmp_path / "other", max_shard_size="5 parsecs")
