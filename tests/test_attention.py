import pytest
import torch
from transformers import StaticCache

from ptq import attention
from tests.conftest import tiny_model


def greedy_logits(model, ids, steps=3):
    """The prompt's last logits and ``steps`` greedy decode steps' on a static cache (one query per step)."""
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 2)
    out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(ids.shape[1]), use_cache=True)
    logits = [out.logits[:, -1]]
    for i in range(steps):
        token = out.logits[:, -1:].argmax(-1)
        out = model(input_ids=token, past_key_values=cache, cache_position=torch.tensor([ids.shape[1] + i]),
                    use_cache=True)  # fmt: skip
        logits.append(out.logits[:, -1])
    return torch.stack(logits)


@torch.no_grad()
def test_packed_decode_matches_transformers_attention(monkeypatch):
    model = tiny_model("llama")  # 4 query heads on 2 key/value heads
    ids = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(0))
    model.set_attn_implementation("eager")
    want = greedy_logits(model, ids)
    model.set_attn_implementation("sdpa")
    attention.use_packed_decode_attention(model)
    queries = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        queries.append((q.shape[1], q.shape[2], k.shape[1]))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    got = greedy_logits(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the prompt through transformers' SDPA (4 heads of 9 queries), each decode step packed: 2 heads of 2 queries
    assert [q[:2] for q in queries[:2]] == [(4, 9)] * 2 and queries[2:] == [(2, 2, 2)] * 6


def test_packed_decode_attention_needs_sdpa():
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        attention.use_packed_decode_attention(model)
