"""ptq.attention: the packed decode attention on the CPU; its Triton kernel on CUDA, or here in Triton's interpreter
in a child process (the interpreter is chosen when the kernel is defined)."""

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from ptq import attention
from tests.conftest import run_interpreted, tiny_model

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRETED
needs_kernel = pytest.mark.skipif(
    not (ON_GPU or INTERPRETED), reason="without CUDA: run by test_attention_kernel_in_triton_interpreter"
)


def greedy_logits(model, ids, steps=3):
    """The prompt's last logits and ``steps`` greedy decode steps' on a static cache (one query per step)."""
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 2)
    positions = torch.arange(ids.shape[1] + steps, device=ids.device)
    out = model(input_ids=ids, past_key_values=cache, cache_position=positions[: ids.shape[1]], use_cache=True)
    logits = [out.logits[:, -1]]
    for i in range(steps):
        token = out.logits[:, -1:].argmax(-1)
        out = model(input_ids=token, past_key_values=cache, cache_position=positions[ids.shape[1] + i :][:1],
                    use_cache=True)  # fmt: skip
        logits.append(out.logits[:, -1])
    return torch.stack(logits)


@pytest.mark.parametrize("kind", ["packed", pytest.param("triton", marks=needs_kernel),
                                  pytest.param("fused", marks=needs_kernel)])  # fmt: skip
@torch.no_grad()
def test_decode_attention_matches_transformers_attention(monkeypatch, kind):
    torch.manual_seed(0)  # 4 query heads on 2 key/value heads, of 16 (the kernel takes powers of two)
    config = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip
    device = "cuda" if ON_GPU and kind != "packed" else "cpu"
    model = LlamaForCausalLM(config).eval().to(device)
    ids = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(0)).to(device)
    model.set_attn_implementation("eager")
    want = greedy_logits(model, ids)
    model.set_attn_implementation("sdpa")
    attention.use_decode_attention(model, kind)
    calls = []
    if kind == "packed":  # every SDPA call: (heads, queries, key/value heads)
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def spy(q, k, v, **kwargs):
            calls.append((q.shape[1], q.shape[2], k.shape[1]))
            return sdpa(q, k, v, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    else:  # every kernel call
        name = "decode_attention" if kind == "triton" else "cached_decode_attention"
        kernel = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a: calls.append(a[0].shape) or kernel(*a))
    got = greedy_logits(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if kind == "packed":  # the prompt through transformers' SDPA (4 heads of 9 queries), each step packed
        assert [c[:2] for c in calls[:2]] == [(4, 9)] * 2 and calls[2:] == [(2, 2, 2)] * 6
    elif kind == "triton":  # the decode steps only (2 blocks x 3 steps)
        assert calls == [torch.Size([3, 4, 1, 16])] * 6
    else:  # the decode steps' projections, not yet rotated
        assert calls == [torch.Size([3, 1, 64])] * 6


@needs_kernel
@pytest.mark.parametrize("kind,operator", [("triton", "decode_attention"), ("fused", "cached_decode_attention")])
@torch.no_grad()
def test_triton_decode_attention_is_one_operator_under_torch_compile(kind, operator):
    """The compiled decode step (what ``ptq.bench.infer --compile`` captures) calls the kernel as a custom operator
    (``ptq::decode_attention``, or ``ptq::cached_decode_attention`` which writes the cache) in one graph, and gives
    the eager step's logits."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip
    device = "cuda" if ON_GPU else "cpu"
    model = LlamaForCausalLM(config).eval().to(device)
    attention.use_decode_attention(model, kind)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0)).to(device)

    def step(forward):  # a fresh cache each time: transformers' static caches count the tokens written to them
        cache = StaticCache(config=model.config, max_cache_len=12)
        model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(7, device=device), use_cache=True)
        return forward(input_ids=ids[:, -1:], past_key_values=cache, cache_position=torch.tensor([7], device=device),
                       use_cache=True).logits  # fmt: skip

    explained = []
    step(lambda **kwargs: explained.append(torch._dynamo.explain(model)(**kwargs)) or model(**kwargs))
    assert explained[0].graph_break_count == 0, explained[0].break_reasons
    graphs = explained[0].graphs
    ops = {str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"}
    assert f"ptq.{operator}.default" in ops, sorted(ops)
    torch.testing.assert_close(step(torch.compile(model, fullgraph=True, dynamic=False)), step(model), rtol=1e-4,
                               atol=1e-4)  # fmt: skip
    torch._dynamo.reset()


def test_decode_attention_needs_sdpa_and_a_known_kind():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="decode attention 'flash' is unknown"):
        attention.use_decode_attention(model, "flash")
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        attention.use_decode_attention(model, "packed")


def test_llama_attention_forward_is_taken_over_then_given_back():
    model = tiny_model("llama")
    attention.use_decode_attention(model, "fused")
    modules = [m for m in model.modules() if type(m).__name__ == "LlamaAttention"]
    assert modules and all(getattr(vars(m).get("forward"), "fused_decode", False) for m in modules)
    attention.use_decode_attention(model, "triton")
    assert not any("forward" in vars(m) for m in modules)


@needs_kernel
@pytest.mark.parametrize("batch,kv_heads,groups,keys,dim", [(1, 2, 4, 7, 32), (3, 2, 4, 130, 32), (1, 2, 4, 300, 16),
                                                            (2, 1, 8, 200, 64), (2, 2, 3, 70, 32)])  # fmt: skip
def test_decode_attention_kernel_over_odd_shapes(batch, kv_heads, groups, keys, dim):
    """Against SDPA on copied heads: key counts that are not whole blocks, several slices merged (the grid splits
    the keys to fill the GPU, or the interpreter's 4 stand-in multiprocessors), masked keys, a group count that is
    not a power of two; with a mask per sequence, none, and one for all."""
    device, dtype = ("cuda", torch.bfloat16) if ON_GPU else ("cpu", torch.float32)
    g = torch.Generator().manual_seed(keys)
    q = torch.randn(batch, kv_heads * groups, 1, dim, generator=g).to(device, dtype)
    k, v = (torch.randn(batch, kv_heads, keys, dim, generator=g).to(device, dtype) for _ in "kv")
    keep = torch.rand(batch, 1, 1, keys, generator=g) < 0.8
    keep[..., 0] = True
    keep = keep.to(device)
    tolerance = 2e-2 if ON_GPU else 1e-5  # bf16 probabilities on the GPU
    # the second call also checks that the first reset the slices' counters; the last: one mask for every sequence
    for mask in (keep, None, keep[:1]):
        want = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(groups, 1), v.float().repeat_interleave(groups, 1), attn_mask=mask
        )
        got = attention.decode_attention(q, k, v, mask, dim**-0.5)
        assert got.shape == (batch, 1, kv_heads * groups, dim) and got.dtype == dtype
        torch.testing.assert_close(got.float(), want.transpose(1, 2), rtol=tolerance, atol=tolerance)


@needs_kernel
@pytest.mark.parametrize("batch,kv_heads,groups,held,dim", [(1, 2, 4, 0, 32), (3, 2, 4, 129, 32), (2, 1, 8, 250, 64),
                                                            (2, 2, 3, 69, 32)])  # fmt: skip
@torch.no_grad()
def test_cached_decode_attention_rotates_writes_and_attends(batch, kv_heads, groups, held, dim):
    """Against transformers' rotary embedding, an index_copy into the cache and SDPA on copied heads: an empty
    cache, the new key in a later slice than the first, a group count that is not a power of two, a padding mask,
    RoPE's rows one for the batch (as transformers gives them) or one per sequence;
    the projections as slices of one joined product (as ``ptq.fuse`` gives them); the length is the caller's."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    device, dtype = ("cuda", torch.bfloat16) if ON_GPU else ("cpu", torch.float32)
    g = torch.Generator().manual_seed(held)
    heads, size = kv_heads * groups, held + 7
    joined = torch.randn(batch, 1, (heads + 2 * kv_heads) * dim, generator=g).to(device, dtype)
    q, k, v = joined.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    angle = torch.rand(1 if batch % 2 else batch, 1, dim // 2, generator=g) * 6  # one row for all, or one each
    cos, sin = (f(torch.cat([angle, angle], -1)).to(device, dtype) for f in (torch.cos, torch.sin))
    key_cache, value_cache = (torch.randn(batch, kv_heads, size, dim, generator=g).to(device, dtype) for _ in "kv")
    keep = torch.rand(batch, 1, 1, size, generator=g) < 0.8
    keep[..., held] = True
    keep = keep.to(device)
    for mask in (keep, None):
        rq, rk = apply_rotary_pos_emb(q.view(batch, 1, heads, dim).transpose(1, 2),
                                      k.view(batch, 1, kv_heads, dim).transpose(1, 2), cos, sin)  # fmt: skip
        want_keys, want_values = key_cache.clone(), value_cache.clone()
        want_keys[:, :, held] = rk[:, :, 0]
        want_values[:, :, held] = v.view(batch, kv_heads, dim)
        seen = torch.arange(size, device=device) <= held
        seen = seen if mask is None else seen & mask
        want = torch.nn.functional.scaled_dot_product_attention(
            rq.float(), want_keys.float().repeat_interleave(groups, 1),
            want_values.float().repeat_interleave(groups, 1), attn_mask=seen.expand(batch, 1, 1, size),
        )  # fmt: skip
        length = torch.tensor(held, device=device)
        got = attention.cached_decode_attention(q, k, v, cos, sin, key_cache, value_cache, length, mask, dim**-0.5)
        assert got.shape == (batch, 1, heads, dim) and int(length) == held
        tolerance = 2e-2 if ON_GPU else 1e-5
        torch.testing.assert_close(key_cache, want_keys, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(value_cache, want_values, rtol=0, atol=0)
        torch.testing.assert_close(got.float(), want.transpose(1, 2), rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(ON_GPU or INTERPRETED, reason="the interpreter's run of this file (CPU machines only)")
def test_attention_kernel_in_triton_interpreter():
    pytest.importorskip("triton")
    done = run_interpreted(
        "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "kernel_over or triton or fused or cached"
    )
    assert "13 passed" in done.stdout, done.stdout[-500:]
