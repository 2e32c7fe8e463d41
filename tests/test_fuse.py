"""Joined projections for inference (ptq/fuse.py, ptq.quant.linear.join_outputs): q, k, v and gate, up as one
product each give the model's outputs unchanged, in every format whose stored form joins."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from ptq.bench.infer import convert
from ptq.checkpoint import module_bytes
from ptq.fuse import SharedInput, SharedInputPart, fuse_projections
from ptq.quant import WeightSpec, quantize_weight
from ptq.quant.linear import CompactLinear, QuantLinear, join_outputs

LLAMA = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)  # fmt: skip


def tiny_model(fmt: str, config=LLAMA, cls=LlamaForCausalLM):
    torch.manual_seed(0)
    model = cls(config).eval()
    convert(model, fmt, group_size=32)
    return model


@pytest.mark.parametrize("fmt", ["bf16", "w4a16", "w4a16-sym", "w4a16-actorder", "w8a8", "fp8", "nvfp4", "mxfp4"])
def test_joined_projections_give_the_same_outputs(fmt):
    model = tiny_model(fmt)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        before = module_bytes(model)
        assert fuse_projections(model) == 2 * LLAMA.num_hidden_layers  # q, k, v and gate, up in each block
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert isinstance(model.model.layers[0].self_attn.k_proj, SharedInputPart)
    # the same stored numbers: only QuantLinear's per-layer copies of g_idx become one
    assert module_bytes(model) <= before
    if not fmt.startswith("w4a16"):
        assert module_bytes(model) == before
    assert all(m._outputs is None for m in model.modules() if isinstance(m, SharedInput))  # products released


def test_layers_that_do_not_join_stay_as_they_are():
    """NVFP4 layers with their own fp32 global scales do not join; ptq.bench.infer's conversion gives the linears
    that read one input one global scale, as ptq's methods store them, and those join."""
    model = tiny_model("nvfp4")
    attention = model.model.layers[0].self_attn
    assert torch.equal(attention.q_proj.tensor_scale, attention.v_proj.tensor_scale)
    own = [CompactLinear(quantize_weight(torch.randn(32, 64) * s, WeightSpec.build("nvfp4")), None, torch.float32)
           for s in (1.0, 3.0)]  # fmt: skip
    assert not torch.equal(own[0].tensor_scale, own[1].tensor_scale)
    assert join_outputs(own) is None
    assert fuse_projections(model) == 2 * LLAMA.num_hidden_layers
    w = torch.randn(32, 64)
    int4 = QuantLinear.from_quantized(quantize_weight(w, WeightSpec("int", 4, 32, False)), None, torch.float32)
    int8 = QuantLinear.from_quantized(quantize_weight(w, WeightSpec("int", 8, 32, False)), None, torch.float32)
    assert join_outputs([int4, int8]) is None  # different specs
    assert join_outputs([int4, torch.nn.Linear(64, 32)]) is None  # different kinds
    assert join_outputs([int4]) is None


def test_biases_join_and_any_call_order_gives_each_part_its_own_output():
    """Qwen2's q, k, v have biases (its MLP has none). A part called first, or with another input, computes
    the product anew: the result never depends on the order of the calls."""
    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = tiny_model("w8a8", config, Qwen2ForCausalLM)
    attention = model.model.layers[0].self_attn
    separate = [attention.q_proj, attention.k_proj, attention.v_proj]
    assert all(layer.bias is not None for layer in separate)
    x, y = torch.randn(3, 64), torch.randn(3, 64)
    with torch.no_grad():
        want_x, want_y = [layer(x) for layer in separate], [layer(y) for layer in separate]
        assert fuse_projections(model) == 2
        parts = [attention.q_proj, attention.k_proj, attention.v_proj]
        for index in (2, 0):  # v first, then q: each from its own product
            torch.testing.assert_close(parts[index](x), want_x[index], rtol=0, atol=0)
        torch.testing.assert_close(parts[1](y), want_y[1], rtol=0, atol=0)  # another input: computed anew
        torch.testing.assert_close(parts[1](x), want_x[1], rtol=0, atol=0)


@pytest.mark.parametrize(("fmt", "act", "swiglu"), [("fp8", "silu", True), ("w8a8", "silu", True),
                                                    ("w4a16", "silu", False), ("fp8", "gelu", False)])  # fmt: skip
def test_only_silu_mlps_of_w8a8_layers_become_swiglu_modules(fmt, act, swiglu):
    """The MLP becomes one ``SwiGLU`` module where its two-launch product applies (SiLU, W8A8 layers of one kind);
    elsewhere gate and up stay parts of their joined product. The outputs are the model's either way."""
    from ptq.fuse import SwiGLU

    config = LlamaConfig(**{**LLAMA.to_dict(), "hidden_act": act})
    model = tiny_model(fmt, config)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        assert fuse_projections(model) == 2 * LLAMA.num_hidden_layers
        got = model(ids).logits
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, SwiGLU) == swiglu
    assert swiglu or isinstance(mlp.gate_proj, SharedInputPart)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["fp8", "w8a8", "w4a16"])
def test_fp8_attention_outputs_round_their_own_input(fmt):
    """Only the attention's output projection of FP8 models is told to round its input inside its product under
    torch.compile (nothing before it for inductor to fuse a rounding into); int8's and the MLP's down projection
    are not."""
    model = tiny_model(fmt, LLAMA)
    fuse_projections(model)
    block = model.model.layers[0]
    o_proj = block.self_attn.o_proj
    assert getattr(o_proj, "rounds_own_input", False) == (fmt == "fp8")
    down = block.mlp.down_proj
    assert not getattr(down, "rounds_own_input", False)


def test_the_kernel_benchmark_times_the_joined_shapes():
    from ptq.bench.kernels import block_linear_shapes

    plain, joined = block_linear_shapes("llama-3-8b"), block_linear_shapes("llama-3-8b", joined=True)
    assert joined["qkv"] == (sum(plain[name][0] for name in "qkv"), plain["q"][1])
    assert joined["gate_up"] == (plain["gate"][0] + plain["up"][0], plain["gate"][1])
    assert sum(n * k for n, k in joined.values()) == sum(n * k for n, k in plain.values())


def test_qwen3_norms_after_the_projections_see_the_same_slices():
    """Qwen3 normalizes q and k per head after the projections: the slices of the joined product are what
    its norms read, so the logits are unchanged."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip
    model = tiny_model("w4a16", config, Qwen3ForCausalLM)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
        assert fuse_projections(model) == 4
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-6, atol=1e-6)


def act_order_layer(out_features: int = 64, in_features: int = 128, seed: int = 0) -> QuantLinear:
    from ptq.bench.infer import act_order_rtn

    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed + 1))
    return QuantLinear.from_quantized(act_order_rtn(weight, WeightSpec("int", 4, 32, False), seed), None,
                                      torch.float32)  # fmt: skip


def test_an_act_order_layer_with_its_inputs_in_group_order_computes_the_same():
    """sort_groups stores the input features group by group (contiguous groups for the kernels) and gathers
    x into that order per call; what the layer computes and reports as its weight does not change."""
    layer = act_order_layer()
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(2))
    want, stored = layer(x), layer.quantized_weight()
    assert layer.sort_groups()
    assert torch.equal(layer.g_idx.long(), torch.arange(128) // 32)  # the stored groups are contiguous now
    assert not torch.equal(layer.k_order.long(), torch.arange(128))
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)  # the same products, summed in another order
    again = layer.quantized_weight()  # in the model's order, as the checkpoint stored it
    for name in ("qweight", "scale", "zero", "g_idx"):
        assert torch.equal(getattr(again, name), getattr(stored, name)), name
    assert "k_order" in layer.state_dict()  # a state dict says its layout is not the checkpoint's
    assert not layer.sort_groups()  # once
    plain = QuantLinear.from_quantized(quantize_weight(torch.randn(64, 128), WeightSpec("int", 4, 32, False)), None,
                                       torch.float32)  # fmt: skip
    assert not plain.sort_groups() and plain.k_order is None  # contiguous groups already


def test_sorted_layers_join_when_they_share_one_order():
    """q, k, v read one input, so GPTQ's act-order gives them one order: their joined layer gathers x once."""
    from ptq.fuse import sort_act_order_groups

    q, k, other = act_order_layer(64), act_order_layer(32), act_order_layer(32, seed=3)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(4))
    want = torch.cat([q(x), k(x)], dim=-1)
    model = torch.nn.ModuleList([q, k, other])
    assert sort_act_order_groups(model) == 3
    joined = join_outputs([q, k])
    assert joined is not None and torch.equal(joined.k_order, q.k_order)
    torch.testing.assert_close(joined(x), want, rtol=1e-5, atol=1e-5)
    assert join_outputs([q, other]) is None  # another order
    assert join_outputs([q, act_order_layer(32)]) is None  # sorted and as stored
