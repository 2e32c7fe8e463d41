"""Mixture-of-experts models: every expert calibrated and quantized, in the model's own fused layout."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

import ptq
from ptq.models import arch_for, get_blocks, get_submodule
from ptq.moe import ExpertStack, MoEPolicy
from tests.conftest import MOE_ARCHS, tiny_moe

CALIB = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
TOKENS = CALIB.numel()


def moe_blocks(model):
    experts = arch_for(model.config.model_type).experts
    for index, block in enumerate(get_blocks(model)):
        fused = get_submodule(block, experts.path)
        if fused is not None:
            yield index, block, fused, experts


def expert_matrices(fused, layout: str, e: int) -> dict[str, torch.Tensor]:
    """Expert ``e``'s gate, up and down weights as [out, in], read from the fused parameters."""
    if layout == "gate_up":
        half = fused.gate_up_proj.shape[1] // 2
        return {"gate_proj": fused.gate_up_proj[e, :half], "up_proj": fused.gate_up_proj[e, half:],
                "down_proj": fused.down_proj[e]}  # fmt: skip
    return {"gate_proj": fused.gate_up_proj[e][:, ::2].t(), "up_proj": fused.gate_up_proj[e][:, 1::2].t(),
            "down_proj": fused.down_proj[e].t()}  # fmt: skip


@pytest.mark.parametrize("kind", MOE_ARCHS)
def test_unfused_experts_compute_what_the_fused_module_computes(kind):
    model = tiny_moe(kind)
    _, _, fused, experts = next(moe_blocks(model))
    hidden = torch.randn(40, model.config.hidden_size)
    top_k_index = torch.stack([torch.randperm(4)[:2] for _ in range(40)])
    top_k_weights = torch.rand(40, 2)
    expected = fused(hidden, top_k_index, top_k_weights)
    for calibrate_all in (False, True):  # sending every token through every expert leaves the output alone
        stack = ExpertStack(fused, experts.layout, calibrate_all)
        torch.testing.assert_close(stack(hidden, top_k_index, top_k_weights), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", MOE_ARCHS)
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_every_expert_is_quantized_on_the_grid_in_the_fused_parameters(kind, method):
    model = tiny_moe(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = {}
    report = ptq.quantize(model, method=method, bits=4, group_size=8, calib=CALIB, device="cpu",
                          on_quantized=lambda name, q: quantized.__setitem__(name, q))  # fmt: skip
    for index, _block, fused, experts in moe_blocks(model):
        prefix = f"model.layers.{index}.{experts.path}"
        for e in range(4):
            for name, weight in expert_matrices(fused, experts.layout, e).items():
                q = quantized[f"{prefix}.{e}.{name}"]
                assert torch.equal(weight, q.dequantize().to(weight.dtype)), (e, name)  # what the model runs
            saved = SimpleNamespace(**{p: before[f"{prefix}.{p}"] for p in ("gate_up_proj", "down_proj")})
            original = expert_matrices(saved, experts.layout, e)
            assert all(not torch.equal(original[n], w) for n, w in expert_matrices(fused, experts.layout, e).items())
        router = f"model.layers.{index}.{experts.router}.weight"
        assert torch.equal(model.state_dict()[router], before[router])  # routers are never quantized
        summary = report["blocks"][index]["moe"]
        assert summary["experts"] == 4 and summary["fallback"] == []
        if method == "gptq":  # top-2 of 4 experts: every token counted twice over the experts
            assert sum(summary["tokens"]) == 2 * TOKENS and min(summary["tokens"]) > 0
        else:
            assert summary["tokens"] == [None] * 4  # RTN reads no calibration data
    assert isinstance(get_submodule(get_blocks(model)[-1], experts.path), type(fused))  # the model's own module


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_calibrate_all_experts_counts_every_token_for_every_expert(kind):
    model = tiny_moe(kind)
    report = ptq.quantize(model, method="gptq", bits=4, group_size=8, calib=CALIB, device="cpu",
                          experts=MoEPolicy(calibrate_all_experts=True))  # fmt: skip
    for index, *_ in moe_blocks(model):
        assert report["blocks"][index]["moe"]["tokens"] == [TOKENS] * 4


def _never_route_to(model, expert: int) -> None:
    """Make every router send its tokens elsewhere (expert 0 instead of ``expert``)."""
    for _, block, _, experts in moe_blocks(model):
        router = get_submodule(block, experts.router)

        def reroute(_module, _args, output):
            logits, scores, indices = output
            return logits, scores, torch.where(indices == expert, torch.zeros_like(indices), indices)

        router.register_forward_hook(reroute)


@pytest.mark.parametrize("kind", ["qwen3_moe", "deepseek_v3"])
def test_an_expert_without_tokens_is_rounded_to_nearest_and_named(kind):
    model = tiny_moe(kind)
    _never_route_to(model, 3)
    quantized = {}
    report = ptq.quantize(model, method="gptq", bits=4, group_size=8, calib=CALIB, device="cpu",
                          on_quantized=lambda name, q: quantized.__setitem__(name, q))  # fmt: skip
    for index, _block, fused, experts in moe_blocks(model):
        summary = report["blocks"][index]["moe"]
        assert summary["tokens"][3] == 0 and summary["fallback"] == [f"{experts.path}.3"]
        stats = report["blocks"][index]["layers"][f"{experts.path}.3.gate_proj"]
        assert stats["fallback"] == "rtn" and "loss" not in stats
        for name, weight in expert_matrices(fused, experts.layout, 3).items():
            assert torch.isfinite(weight).all()
            q = quantized[f"model.layers.{index}.{experts.path}.3.{name}"]
            assert torch.equal(weight, q.dequantize().to(weight.dtype))


def test_min_tokens_sends_rarely_chosen_experts_to_the_fallback():
    model = tiny_moe("mixtral")
    report = ptq.quantize(model, method="gptq", bits=4, group_size=8, calib=CALIB, device="cpu",
                          experts=MoEPolicy(min_tokens=10 * TOKENS))  # fmt: skip
    summary = report["blocks"][1]["moe"]
    assert summary["fallback"] == [f"mlp.experts.{e}" for e in range(4)]


def test_moe_policy_settings_are_checked():
    with pytest.raises(ValueError, match="moe.min_tokens=0 must be a whole number of at least 1"):
        MoEPolicy(min_tokens=0)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_tiny_moe_folder_runs_from_the_command_line(tmp_path, kind, method):
    from tests.conftest import require_assets
    from tests.test_cli import ptq_run

    assets = require_assets("models/stories260K", "data/wikitext-2-raw-v1/test.jsonl")
    folder = tmp_path / kind
    tiny_moe(kind, vocab_size=512).save_pretrained(folder)
    for name in ("tokenizer.model", "tokenizer_config.json"):  # stories260K's 512-token tokenizer
        shutil.copy(assets / "models" / "stories260K" / name, folder / name)
    out = tmp_path / "run"
    common = ["eval.max_windows=2", "eval.seqlen=64"]
    proc = ptq_run("model=custom", f"model.path={folder}", f"method={method}", "bits=4", "group_size=8", "sym=true",
                   "calib.nsamples=4", "calib.seqlen=64", "save=true", f"output_dir={out}", *common,
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "result.json").read_text())
    summary = record["quantization"]["blocks"][-1]["moe"]
    assert summary["experts"] == 4 and len(summary["tokens"]) == 4
    assert record["metrics"]["ppl"]["wikitext2"] < 2 * record["baseline"]["metrics"]["ppl"]["wikitext2"]
    storage = record["quantization"]["storage"]  # the experts are counted once, as packed linears
    assert storage["quantized_linears"] >= 2 * 4 * 3  # the experts' linears of the MoE blocks, at least
    assert storage["model_bytes"] < record["saved"]["bytes"] * 1.1  # not the fused experts counted again
    # The saved folder, read back (transformers decompresses the experts into the fused layout).
    proc = ptq_run("model=custom", f"model.path={out / 'model'}", "method=none", f"output_dir={tmp_path / 'back'}",
                   *common, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    reloaded = json.loads((tmp_path / "back" / "result.json").read_text())["metrics"]["ppl"]["wikitext2"]
    assert reloaded == pytest.approx(record["metrics"]["ppl"]["wikitext2"], rel=5e-3)


@pytest.mark.parametrize("kind", MOE_ARCHS)
def test_moe_scaling_groups_keep_the_blocks_function(kind):
    """Folding any positive scales into a MoE block's groups (norm -> router, experts' and shared gate/up;
    each expert's up -> down) leaves its output as it was: the router is scaled with the experts."""
    from ptq import moe
    from ptq.methods.scaling import fold_scales, resolve_groups
    from ptq.models import block_scale_groups

    model = tiny_moe(kind)
    index, block, _, experts = next(moe_blocks(model))
    arch = arch_for(kind)
    moe.unfuse(block, experts, MoEPolicy())
    hidden = torch.randn(2, 12, model.config.hidden_size)
    position_ids = torch.arange(12)[None].expand(2, -1)
    embeddings = model.model.rotary_emb(hidden, position_ids)
    expected = block(hidden, position_embeddings=embeddings, attention_mask=None)
    groups = resolve_groups(block, block_scale_groups(arch, block), index)
    moe_groups = [g for g in groups if g.group.linears[0].startswith(experts.block + ".")]
    assert moe_groups[0].group.also_scaled[0] == experts.router
    assert len(moe_groups) == (1 + 4 + bool(experts.shared) if experts.layout == "gate_up" else 1)
    for group in moe_groups:
        fold_scales(block, group, torch.rand(group.channels) + 0.5)
    out = block(hidden, position_embeddings=embeddings, attention_mask=None)
    first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
    torch.testing.assert_close(first(out), first(expected), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_activation_quantized_moe_blocks_keep_their_experts_split_with_quantizers(kind):
    """SmoothQuant W8A8 (static per-tensor activations): the quantizers sit on every expert's linears, so
    MoE blocks keep their ExpertStack; each expert gets its own calibrated input scale."""
    from ptq.quant.activations import input_quantizer_of

    model = tiny_moe(kind)
    common = {"bits": 8, "group_size": -1, "sym": True, "calib": CALIB, "device": "cpu"}
    report = ptq.quantize(model, method="smoothquant", act_bits=8, act_granularity="per_tensor", **common)
    for index, block in enumerate(get_blocks(model)):
        experts = arch_for(kind).experts
        stack = get_submodule(block, experts.path)
        if report["blocks"][index]["moe"] is None:
            continue
        assert isinstance(stack, ExpertStack)
        for e, expert in enumerate(stack):
            for name in ("gate_proj", "up_proj", "down_proj"):
                quantizer = input_quantizer_of(getattr(expert, name))
                assert quantizer is not None and quantizer.scale is not None, (e, name)
        scales = [report["blocks"][index]["layers"][f"{experts.path}.{e}.down_proj"]["act_scale"] for e in range(4)]
        assert len(set(scales)) == 4  # calibrated per expert, on the tokens each was sent
    assert torch.isfinite(model(CALIB[:2]).logits).all()


@pytest.mark.parametrize("kind", MOE_ARCHS)
@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_scaling_methods_quantize_every_expert(kind, method):
    model = tiny_moe(kind)
    quantized = {}
    report = ptq.quantize(model, method=method, bits=4, group_size=8, calib=CALIB, device="cpu",
                          on_quantized=lambda name, q: quantized.__setitem__(name, q))  # fmt: skip
    for index, _block, fused, experts in moe_blocks(model):
        for e in range(4):
            for name, weight in expert_matrices(fused, experts.layout, e).items():
                q = quantized[f"model.layers.{index}.{experts.path}.{e}.{name}"]
                assert torch.equal(weight, q.dequantize().to(weight.dtype))
        layers = report["blocks"][index]["layers"]
        assert "awq_alpha" in layers[f"{experts.path}.0.gate_proj"]  # the norm -> experts group was scaled
        if experts.layout == "gate_up":  # each expert's up -> down group saw its tokens
            assert sum(report["blocks"][index]["moe"]["tokens"]) == 2 * TOKENS


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_saved_moe_checkpoints_load_in_transformers(tmp_path, kind):
    """Experts are written one by one, under the names the model's Hub checkpoints use (Mixtral: w1/w3/w2
    under block_sparse_moe); transformers reads them back into its fused layout with the same logits."""
    from transformers import AutoModelForCausalLM

    from ptq.recipe import Recipe
    from ptq.storage.compressed_tensors import CompressedStore

    model = tiny_moe(kind)
    recipe = Recipe.build(method="gptq", bits=4, group_size=8, sym=True)
    store = CompressedStore(model, recipe, tmp_path / "model")
    ptq.quantize(model, recipe, calib=CALIB, device="cpu", on_quantized=store.add, on_block_done=store.block_done)
    store.save(model, None)
    config = json.loads((tmp_path / "model" / "config.json").read_text())["quantization_config"]
    router = "model.layers.1.block_sparse_moe.gate" if kind == "mixtral" else "model.layers.1.mlp.gate"
    assert router in config["ignore"]  # routers stay in full precision
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    for name, param in model.named_parameters():
        if "experts" in name and param.dim() == 3:
            assert torch.equal(dict(loaded.named_parameters())[name], param), name
    torch.testing.assert_close(loaded(CALIB[:2]).logits, model(CALIB[:2]).logits)


def test_gpt_oss_experts_are_not_saved_yet(tmp_path):
    from ptq.recipe import Recipe
    from ptq.storage.compressed_tensors import CompressedStore, SaveError

    with pytest.raises(SaveError, match="cannot write gpt_oss's experts yet"):
        CompressedStore(tiny_moe("gpt_oss"), Recipe.build(method="rtn", bits=4, group_size=8), tmp_path / "m")


W8A8_STATIC = {"method": "smoothquant", "bits": 8, "group_size": -1, "sym": True, "act_bits": 8,
               "act_granularity": "per_tensor"}  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "settings"),
    [("qwen3_moe", {"method": "gptq", "bits": 4, "group_size": 8}),
     ("deepseek_v3", {"method": "gptq", "bits": 4, "group_size": 8}), ("mixtral", W8A8_STATIC)],
)  # fmt: skip
def test_an_interrupted_moe_run_resumes_to_the_same_weights(tmp_path, kind, settings):
    from ptq.api import prepare_steps, run_steps
    from ptq.recipe import Recipe
    from ptq.storage.progress import Progress
    from tests.test_resume import Interrupted, _interrupt_after

    recipe = Recipe.build(**settings)
    reference = tiny_moe(kind)
    expected = run_steps(reference, prepare_steps(recipe, reference.config), CALIB, "cpu")
    interrupted = tiny_moe(kind)
    progress = Progress(tmp_path, {"kind": kind})
    progress.start(resume=False)
    _interrupt_after(progress, 0)
    with pytest.raises(Interrupted):
        run_steps(interrupted, prepare_steps(recipe, interrupted.config), CALIB, "cpu", progress=progress)
    resumed = tiny_moe(kind)
    progress = Progress(tmp_path, {"kind": kind})
    assert progress.start(resume=True) == 1
    report = run_steps(resumed, prepare_steps(recipe, resumed.config), CALIB, "cpu", progress=progress)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert [b["moe"] for b in report["blocks"]] == [b["moe"] for b in expected["blocks"]]
    assert torch.equal(resumed(CALIB[:2]).logits, reference(CALIB[:2]).logits)  # quantizers restored too
    assert report["storage"] == expected["storage"]


def test_moe_checkpoints_in_the_gptq_layout_are_refused_before_work(tmp_path):
    from tests.conftest import require_assets
    from tests.test_cli import ptq_run

    assets = require_assets("models/stories260K")
    folder = tmp_path / "mixtral"
    tiny_moe("mixtral", vocab_size=512).save_pretrained(folder)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(assets / "models" / "stories260K" / name, folder / name)
    proc = ptq_run("model=custom", f"model.path={folder}", "method=rtn", "save=true", "save_format=gptq",
                   f"output_dir={tmp_path / 'run'}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "save_format=gptq: ptq writes mixtral (mixture-of-experts)" in proc.stderr


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_awq_captures_every_experts_inputs_in_one_pass_with_the_same_result(kind, monkeypatch):
    from ptq.methods.awq import AWQ

    one_pass = tiny_moe(kind)
    ptq.quantize(one_pass, method="awq", bits=4, group_size=8, calib=CALIB, device="cpu")
    monkeypatch.setattr(AWQ, "_lone_run", lambda self, groups: [None])  # one capture per expert, as before
    per_expert = tiny_moe(kind)
    ptq.quantize(per_expert, method="awq", bits=4, group_size=8, calib=CALIB, device="cpu")
    expected = per_expert.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in one_pass.state_dict().items())
