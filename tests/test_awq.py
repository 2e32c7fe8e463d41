import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import ptq
from ptq.methods import build_steps
from ptq.methods.awq import AWQ, apply_clip, search_clip
from ptq.methods.scaling import fold_scales, resolve_groups
from ptq.models import ModelLoadError, ScaleGroup, get_blocks, get_weight, scale_groups
from ptq.pipeline import run_blocks
from ptq.quant import WeightSpec, fake_quantize_weight
from tests.conftest import tiny_model


def block_outputs(model, ids):
    """The output of every decoder block for ``ids``."""
    outputs = []
    hooks = [
        block.register_forward_hook(
            lambda _m, _a, out: outputs.append((out[0] if isinstance(out, tuple) else out).clone())
        )
        for block in get_blocks(model)
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return outputs


def assert_same_blocks(before, after):
    for a, b in zip(before, after, strict=True):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()


SCALED_ARCHS = ["llama", "llama-mha", "opt", "gpt_neox"]


def scaled_model(kind):
    if kind == "llama-mha":  # no grouped-query attention: the v -> o group applies too
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
        )
        return LlamaForCausalLM(config).eval()
    return tiny_model(kind)


def randomize_norms(model):
    """Random norm weights/biases, so that folding into them is not a special case of ones and zeros."""
    g = torch.Generator().manual_seed(1)
    for module in model.modules():
        if "Norm" in type(module).__name__:
            module.weight.data = torch.rand(module.weight.shape, generator=g) + 0.5
            if getattr(module, "bias", None) is not None:
                module.bias.data = torch.randn(module.bias.shape, generator=g) * 0.1


@pytest.mark.parametrize("kind", SCALED_ARCHS)
def test_folding_random_scales_preserves_every_block(kind):
    model = scaled_model(kind)
    randomize_norms(model)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    before = block_outputs(model, ids)
    g = torch.Generator().manual_seed(2)
    folded = 0
    for block in get_blocks(model):
        for group in resolve_groups(block, scale_groups(model.config)):
            fold_scales(block, group, torch.rand(group.channels, generator=g) * 3.75 + 0.25)
            folded += 1
    expected = {"llama": 3, "llama-mha": 4, "opt": 4, "gpt_neox": 3}[kind] * 2
    assert folded == expected
    assert_same_blocks(before, block_outputs(model, ids))


@pytest.mark.parametrize("kind", SCALED_ARCHS)
def test_awq_scales_without_rounding_preserve_every_block(kind):
    model = scaled_model(kind)
    randomize_norms(model)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(3))
    before = block_outputs(model, ids)
    step = AWQ(WeightSpec("int", 3, 16), clip=False)
    step.round_weights = False
    step.prepare(model.config)
    report = run_blocks(model, [step], calib, torch.device("cpu"), offload=False, batch_size=2)
    alphas = [s["awq_alpha"] for b in report["blocks"] for s in b["layers"].values()]
    assert any(a > 0 for a in alphas), "the search never moved away from alpha=0: the test would prove nothing"
    assert_same_blocks(before, block_outputs(model, ids))


class NormLinear(nn.Module):
    def __init__(self, channels, rows):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.fc = nn.Linear(channels, rows, bias=False)


def lone_linear_group(weight):
    block = NormLinear(weight.shape[1], weight.shape[0])
    block.fc.weight.data = weight.clone()
    (group,) = resolve_groups(block, (ScaleGroup("norm", ("fc",), "fc"),))
    return block, group


def outlier_inputs(tokens, channels, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g)
    x[:, torch.randperm(channels, generator=g)[:4]] *= 30  # planted outlier channels
    return x


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_beats_rtn_on_planted_outlier_channels(bits):
    spec = WeightSpec("int", bits, 32)
    x = outlier_inputs(512, 128, seed=0)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    reference = x @ weight.t()
    rtn_error = (x @ fake_quantize_weight(weight, spec).t() - reference).pow(2).sum()

    block, group = lone_linear_group(weight)
    scales, alpha, _ = AWQ(spec).search_scale(group, [((x,), {})])
    fold_scales(block, group, scales)
    awq_weight = fake_quantize_weight(block.fc.weight.data, spec)
    awq_error = (((x / scales) @ awq_weight.t()) - reference).pow(2).sum()
    assert alpha > 0
    assert awq_error < 0.7 * rtn_error


def test_gram_loss_equals_running_the_module(monkeypatch):
    spec = WeightSpec("int", 3, 32)
    x = outlier_inputs(256, 64, seed=4)
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    _, group = lone_linear_group(weight)
    _, _, gram_losses = AWQ(spec, n_grid=8).search_scale(group, [((x[:100],), {}), ((x[100:],), {})])
    monkeypatch.setattr(AWQ, "_compares_one_linear", staticmethod(lambda group: False))
    _, _, run_losses = AWQ(spec, n_grid=8).search_scale(group, [((x[:100],), {}), ((x[100:],), {})])
    torch.testing.assert_close(gram_losses, run_losses, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    ("alpha", "n_grid", "expected_index"), [(0.5, 20, 10), (0.5, 4, 2), (0.25, 4, 1), (0.25, 20, 5)]
)
def test_alpha_grid_finds_the_exact_best(alpha, n_grid, expected_index):
    """Weights built so that W diag(s_alpha) lies exactly on the 4-bit grid: the loss is zero at
    that alpha only, so the search must pick it, on any grid that contains it."""
    channels = 8
    mean_abs = torch.tensor([1.0, 2.0, 4.0, 8.0, 0.5, 3.0, 6.0, 1.5])
    g = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (64, channels), generator=g) * 2 - 1
    x = signs * mean_abs  # |x| is exactly mean_abs in every token
    codes = torch.stack([torch.randperm(16, generator=g)[:channels] for _ in range(16)]).float()
    codes[:, 0], codes[:, 1] = 0, 15  # every row spans the whole grid
    weight = codes * 0.01 / mean_abs.pow(alpha)
    _, group = lone_linear_group(weight)
    _, found, losses = AWQ(WeightSpec("int", 4, -1), n_grid=n_grid).search_scale(group, [((x,), {})])
    assert losses.shape == (n_grid,)
    assert int(torch.argmin(losses)) == expected_index
    assert found == expected_index / n_grid
    assert losses[expected_index] < 1e-6 * losses.max()


@pytest.mark.parametrize(("n_grid", "max_shrink", "expected_ratio"), [(20, 0.5, 0.55), (10, 0.3, 0.8)])
def test_clip_grid_finds_the_exact_best(n_grid, max_shrink, expected_ratio):
    """Two +-10 outliers sit on input channels that are always zero; the other weights lie exactly on
    the grid that clipping to ``expected_ratio`` produces, so that candidate has zero error."""
    spec = WeightSpec("int", 4, 16)
    scale = 20 * expected_ratio / 15
    g = torch.Generator().manual_seed(0)
    weight = torch.randint(-3, 4, (8, 32), generator=g).float() * scale
    weight[:, [0, 16]] = 10.0
    weight[:, [1, 17]] = -10.0
    x = torch.randn(256, 32, generator=g)
    x[:, [0, 1, 16, 17]] = 0
    max_val, ratio = search_clip(weight, x, spec, n_grid, max_shrink)
    torch.testing.assert_close(ratio, torch.full((8, 2), expected_ratio))
    torch.testing.assert_close(max_val, torch.full((8, 2), 10 * expected_ratio))
    clipped = apply_clip(weight, max_val, spec)
    assert clipped.abs().max() == pytest.approx(10 * expected_ratio)
    torch.testing.assert_close(fake_quantize_weight(clipped, spec)[:, 2:16], weight[:, 2:16], atol=1e-5, rtol=0)


def test_clip_search_never_loses_to_no_clipping():
    spec = WeightSpec("int", 3, 16)
    weight = torch.randn(16, 48, generator=torch.Generator().manual_seed(0))
    x = outlier_inputs(128, 48, seed=1)
    max_val, _ = search_clip(weight, x, spec)

    def err(w):
        return (x @ fake_quantize_weight(w, spec).t() - x @ weight.t()).pow(2).sum()

    assert err(apply_clip(weight, max_val, spec)) <= err(weight)


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_quantizes_every_linear_onto_its_grid(method):
    model = tiny_model("llama")
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(3))
    report = ptq.quantize(model, method=method, bits=3, group_size=16, calib=calib, device="cpu", batch_size=2)
    for block in get_blocks(model):
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
            groups = get_weight(block.get_submodule(name)).reshape(-1, 16)
            assert max(len(torch.unique(g)) for g in groups) <= 2**3  # each group holds at most 8 levels
    layers = report["blocks"][0]["layers"]
    assert "awq_alpha" in layers["self_attn.q_proj"] and "awq_clip_mean_ratio" in layers["mlp.down_proj"]
    assert "awq_clip_mean_ratio" not in layers["self_attn.q_proj"]  # q/k are not clipped
    assert ("loss" in layers["mlp.down_proj"]) == (method == "awq+gptq")


def test_awq_is_deterministic():
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(3))
    results = []
    for _ in range(2):
        model = tiny_model("opt")
        ptq.quantize(model, method="awq", bits=4, group_size=16, calib=calib, device="cpu", batch_size=2)
        results.append([p.clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_architecture_without_scaling_groups_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="no scaling groups.*supported: .*gpt_neox, gpt_oss, llama"):
        ptq.quantize(tiny_model("gpt2"), method="awq", calib=torch.zeros(2, 8, dtype=torch.long), device="cpu")


def test_post_norm_opt_is_a_clear_error():
    model = tiny_model("opt")
    model.config.do_layer_norm_before = False
    with pytest.raises(ModelLoadError, match="do_layer_norm_before"):
        scale_groups(model.config)


def test_only_transforms_may_precede_the_last_step():
    steps = build_steps("awq+gptq", WeightSpec("int", 4, 128))
    assert [s.round_weights for s in steps] == [False, True]
    assert build_steps("awq", WeightSpec("int", 4, 128))[0].round_weights
    with pytest.raises(ValueError, match="'gptq' rounds the weights, so it can only be the last step"):
        build_steps("gptq+awq", WeightSpec("int", 4, 128))


@pytest.mark.parametrize("option", [{"n_grid": 0}, {"clip_max_shrink": 1.0}, {"clip_tokens": -5}])
def test_bad_awq_options(option):
    with pytest.raises(ValueError, match="awq\\."):
        build_steps("awq", WeightSpec("int", 4, 128), {"awq": option})


@pytest.mark.parametrize(("search_tokens", "chunks"), [(None, 2), (64, 2), (32, 1), (40, 1), (1, 1)])
def test_scale_search_reads_at_most_search_tokens(monkeypatch, search_tokens, chunks):
    seen = []
    original = AWQ.search_scale

    def spy(self, group, calls):
        seen.append(len(calls))
        return original(self, group, calls)

    monkeypatch.setattr(AWQ, "search_scale", spy)
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(3))  # 2 chunks of 2 x 16 tokens
    options = {"awq": {"search_tokens": search_tokens}}
    ptq.quantize(
        tiny_model("llama"),
        method="awq",
        bits=4,
        group_size=16,
        calib=calib,
        device="cpu",
        batch_size=2,
        options=options,
    )
    assert seen and set(seen) == {chunks}


@pytest.mark.parametrize(("search_tokens", "sampled"), [(None, [0, 1]), (64, [0, 1]), (32, [0])])
def test_clip_samples_the_tokens_the_scale_search_read(monkeypatch, search_tokens, sampled):
    """The clip sample is spread over the first ``search_tokens`` tokens: only those chunks are run."""
    seen = []
    original = search_clip

    def spy(weight, x, *args):
        seen.append(x.clone())
        return original(weight, x, *args)

    monkeypatch.setattr("ptq.methods.awq.search_clip", spy)
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(3))  # 2 chunks of 2 x 16 tokens
    model = tiny_model("llama")
    ptq.quantize(
        model, method="awq", bits=4, group_size=16, calib=calib, device="cpu", batch_size=2,
        options={"awq": {"search_tokens": search_tokens, "clip_tokens": 8}},
    )  # fmt: skip
    # Block 0's first clipped linear is v_proj; it reads the normed embeddings (the norm now holds the
    # folded scales, as it did during the clip search): every 4th of the tokens read, 8 in all.
    with torch.no_grad():
        normed = get_blocks(model)[0].input_layernorm(model.model.embed_tokens(calib[: 2 * len(sampled)]))
    tokens_read = normed.shape[0] * normed.shape[1]
    want = normed.reshape(tokens_read, -1)[:: tokens_read // 8][:8]
    torch.testing.assert_close(seen[0], want)


@pytest.mark.parametrize("batch_elements", [1, 500, 2**26])
def test_clip_search_result_does_not_depend_on_the_row_batches(batch_elements):
    spec = WeightSpec("int", 3, 16)
    weight = torch.randn(24, 48, generator=torch.Generator().manual_seed(0))
    x = outlier_inputs(64, 48, seed=1)
    want = search_clip(weight, x, spec, 20, 0.5, 2**30)
    got = search_clip(weight, x, spec, 20, 0.5, batch_elements)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
