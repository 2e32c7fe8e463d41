"""QuaRot: orthogonal transforms, a rotated model that computes what the original did, and W4A4 that works."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import ptq
from ptq.lazy import load_skeleton
from ptq.quant.activations import input_quantizer_of, input_rotation_of
from ptq.quant.hadamard import Rotation, paley_hadamard, walsh_hadamard
from ptq.recipe import Recipe
from tests.conftest import require_assets
from tests.test_cli import QUICK, ptq_run


@pytest.mark.parametrize("order", [2, 4, 12, 20, 28, 36, 44, 224])
def test_paley_matrices_are_hadamard(order):
    H = paley_hadamard(order)
    if order == 2:
        assert H is None  # no Paley construction; powers of two use the Walsh-Hadamard transform
        return
    assert bool((H.abs() == 1).all()) and torch.equal(H @ H.T, order * torch.eye(order, dtype=torch.float64))


def test_fast_walsh_hadamard_equals_sylvester_matrix():
    H = torch.ones(1, 1)
    for _ in range(6):
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    x = torch.randn(3, 64)
    torch.testing.assert_close(walsh_hadamard(x), x @ H / 8, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("n", "small", "kind"),
    [(64, None, "hadamard"), (576, 36, "hadamard"), (1536, 12, "hadamard"), (14336, 28, "hadamard"),
     (172, 43, "hadamard x random orthogonal"), (11008, 43, "hadamard x random orthogonal")],
)  # fmt: skip
def test_rotations_of_model_sizes_are_orthogonal_and_fast_equals_explicit(n, small, kind):
    rotation = Rotation.build(n, seed=7)
    assert rotation.to_dict() == {"size": n, "kind": kind, "small_factor": small}
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(0))
    if n <= 1536:
        Q = rotation.matrix()
        torch.testing.assert_close(Q @ Q.T, torch.eye(n), rtol=0, atol=1e-5)
        torch.testing.assert_close(rotation.apply(x), x @ Q, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rotation.apply(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)
    assert not torch.equal(Rotation.build(n, seed=8).apply(x), rotation.apply(x))  # the seed matters


def rms_models():
    """Tiny Llama and Qwen2 (q/k/v biases), tied and untied, with non-trivial norm scales; the MLP is
    172 wide (stories260K's), which needs the Hadamard x random orthogonal construction."""
    for kind in ("llama", "qwen2"):
        for tie in (False, True):
            torch.manual_seed(0)
            sizes = dict(hidden_size=96, intermediate_size=172, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tie)  # fmt: skip
            model = (LlamaForCausalLM(LlamaConfig(**sizes)) if kind == "llama"
                     else Qwen2ForCausalLM(Qwen2Config(**sizes))).eval()  # fmt: skip
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.data = torch.rand_like(p) + 0.5
            yield f"{kind}-{'tied' if tie else 'untied'}", model


IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", ["llama-untied", "llama-tied", "qwen2-untied", "qwen2-tied"])
def test_rotated_unquantized_model_computes_the_same_logits(case):
    model = dict(rms_models())[case]
    with torch.no_grad():
        want = model(IDS).logits
    report = ptq.quantize(model, method="quarot", bits=16, device="cpu")
    with torch.no_grad():
        got = model(IDS).logits
    assert (got - want).abs().max() <= 1e-3
    assert report["model_stage"]["quarot"]["online_mlp"]["size"] == 172
    down = model.model.layers[0].mlp.down_proj
    assert input_rotation_of(down) is not None and input_quantizer_of(down) is None
    assert not torch.equal(model.model.embed_tokens.weight, model.lm_head.weight)  # untied: they differ now
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if "norm" in n)


def test_rotation_spreads_outliers_and_w4a4_improves():
    """A model with an outlier channel in its residual stream: after rotating, int4 per-token activations
    lose much less."""
    model = dict(rms_models())["llama-untied"]
    model.model.embed_tokens.weight.data[:, 5] *= 40  # one outlier feature
    reference = [m for _, m in rms_models()][0]
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        want = reference(IDS).logits
    errors = {}
    for method in ("rtn", "quarot"):
        m = [x for _, x in rms_models()][0]
        m.load_state_dict(model.state_dict())
        ptq.quantize(m, method=method, bits=8, group_size=-1, sym=True, act_bits=4, device="cpu")
        with torch.no_grad():
            errors[method] = ((m(IDS).logits - want).norm() / want.norm()).item()
    assert errors["quarot"] < 0.7 * errors["rtn"], errors


def test_quarot_composes_with_gptq_and_is_refused_where_it_cannot_work():
    model = dict(rms_models())["qwen2-tied"]
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    report = ptq.quantize(model, method="quarot+gptq", bits=4, group_size=-1, sym=True, act_bits=4, calib=calib,
                          device="cpu")  # fmt: skip
    down = model.model.layers[1].mlp.down_proj
    assert input_rotation_of(down) is not None and input_quantizer_of(down) is not None
    assert report["storage"]["quantized_linears"] == 2 * 7
    for method in ("awq+quarot", "quarot+awq", "gptq+quarot", "smoothquant+quarot"):
        with pytest.raises(ValueError):
            Recipe.build(method, act_bits=8, bits=8, group_size=-1, sym=True)
    with pytest.raises(ValueError, match="method=quarot bits=16"):
        Recipe.build("rtn", bits=16)
    assert Recipe.build("quarot", bits=16).weights is None


def test_rotations_survive_offload_and_lazy_loading(tmp_path):
    model = dict(rms_models())["llama-untied"]
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    with torch.no_grad():
        want = model(IDS).logits
    lazy = load_skeleton(str(tmp_path), torch.float32)
    ptq.quantize(lazy.model, method="quarot", bits=16, device="cpu", offload=True, lazy=lazy)
    with torch.no_grad():
        got = lazy.model(IDS).logits
    assert (got - want).abs().max() <= 1e-3
    lazy = load_skeleton(str(tmp_path), torch.float32)
    ptq.quantize(lazy.model, method="quarot", bits=8, group_size=-1, sym=True, device="cpu", offload=True, lazy=lazy)
    down = lazy.model.model.layers[0].mlp.down_proj
    assert type(down).__name__ != "Linear" and input_rotation_of(down) is not None  # packed, still rotated
    with torch.no_grad():
        assert ((lazy.model(IDS).logits - want).norm() / want.norm()) < 0.05


def test_stories260k_rotated_keeps_its_perplexity_and_w4a4_gets_better(tmp_path):
    require_assets("models/stories260K", "data/wikitext-2-raw-v1/test.jsonl")
    ppl = {}
    runs = {"fp": ["method=none"], "rot": ["method=quarot", "bits=16"], "rtn": ["method=rtn", "scheme=w4a4"],
            "quarot": ["method=quarot", "scheme=w4a4"], "kv4": ["method=quarot", "scheme=w4a4kv4"]}  # fmt: skip
    for name, args in runs.items():
        proc = ptq_run(*QUICK, *args, f"output_dir={tmp_path}/{name}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        record = json.loads((tmp_path / name / "result.json").read_text())
        ppl[name] = record["metrics"]["ppl"]["wikitext2"]
    assert abs(ppl["rot"] / ppl["fp"] - 1) < 1e-4, ppl
    assert ppl["quarot"] < ppl["rtn"] and ppl["quarot"] < ppl["kv4"] < ppl["rtn"], ppl
    assert (record["kv_format"], record["kv_bits"]) == ("int", 4)
    assert record["quantization"]["model_stage"]["kv"]["rotated_queries_and_keys"] is True
    proc = ptq_run(*QUICK, "method=quarot", "save=true", f"output_dir={tmp_path}/s", cwd=tmp_path)
    assert proc.returncode == 2 and "online Hadamard" in proc.stderr


def test_stories260k_rotated_computes_the_same_logits():
    from transformers import AutoModelForCausalLM

    path = require_assets("models/stories260K") / "models" / "stories260K"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
    report = ptq.quantize(model, method="quarot", bits=16, device="cpu")
    with torch.no_grad():
        assert (model(ids).logits - want).abs().max() <= 1e-3
    assert report["model_stage"]["quarot"]["online_mlp"] == {
        "size": 172, "kind": "hadamard x random orthogonal", "small_factor": 43
    }  # fmt: skip


def test_kv_quantization_rounds_each_head_and_token_and_the_cache_agrees():
    """Keys and values are rounded per (head, token) row as attention reads them, so an incremental
    decode through the cache gives the logits of a full forward; rotating q and k leaves q k^T as it was."""
    from ptq.quant.kv import KVQuantizer
    from ptq.quant.spec import WeightSpec

    q, k = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16)
    H = Rotation.build(16).matrix()
    torch.testing.assert_close((q @ H) @ (k @ H).transpose(-1, -2), q @ k.transpose(-1, -2), rtol=1e-4, atol=1e-4)
    rotated_q, rotated_k, _ = KVQuantizer(WeightSpec("int", 8, -1, False), Rotation.build(16))(q, k, k)
    torch.testing.assert_close(rotated_q, q @ H, rtol=1e-5, atol=1e-5)  # queries rotated, not rounded
    plain_q, plain_k, _ = KVQuantizer(WeightSpec("int", 8, -1, False))(q, k, k)
    assert torch.equal(plain_q, q) and not torch.equal(plain_k, k)
    rows = k.reshape(-1, 16)
    step = (rows.amax(1, keepdim=True).clamp(min=0) - rows.amin(1, keepdim=True).clamp(max=0)) / 255
    assert ((plain_k.reshape(-1, 16) - rows).abs() <= step / 2 + 1e-6).all()  # within half a step, per row
    assert ((rotated_k.reshape(-1, 16) - (k @ H).reshape(-1, 16)).abs() > 0).any()

    model = dict(rms_models())["llama-untied"]
    ptq.quantize(model, method="rtn", bits=8, group_size=-1, kv_bits=4, device="cpu")
    with torch.no_grad():
        full = model(IDS, use_cache=False).logits[:, -1]
        cache = model(IDS[:, :-1], use_cache=True).past_key_values
        step_logits = model(IDS[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step_logits, full, rtol=1e-4, atol=1e-4)
    assert model.config._attn_implementation == "ptq_kv"


def test_kv_cache_settings_are_validated():
    assert Recipe.build("rtn", kv_bits=4).kv == ptq.WeightSpec("int", 4, -1, False)
    with pytest.raises(ValueError, match="KV-cache quantization needs a method"):
        Recipe.build("none", kv_bits=4)
    with pytest.raises(ValueError):
        Recipe.build("rtn", kv_bits=1)
    from tests.conftest import tiny_model

    with pytest.raises(ValueError, match="attention module"):
        ptq.quantize(tiny_model("opt"), method="rtn", kv_bits=4, device="cpu")
