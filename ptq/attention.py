"""Decode attention that reads a grouped-query KV cache as it is stored.

With grouped-query attention (Llama-3: 32 query heads, 8 key/value heads) transformers' SDPA path copies every key
and value head ``num_key_value_groups`` times (``repeat_kv``) before each attention call once a mask is present,
as it is on a static cache, and it skips its own packing under torch.compile. For one query token per sequence
the heads that share a key/value head can instead be that head's queries: q [b, H, 1, d] is viewed as
[b, H / G, G, d] and attends to k, v [b, H / G, S, d] with the same mask (it does not depend on the query head).
The scores, softmax and weighted sum are the same numbers per (query head, key); only the copies are gone.
Every other call (a prompt, a per-head mask, dropout, a model without groups) goes to transformers' SDPA.

    from ptq.attention import use_packed_decode_attention
    use_packed_decode_attention(model)
"""

from __future__ import annotations

import torch

NAME = "ptq_packed_sdpa"


def packed_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):  # fmt: skip
    """transformers' attention-function signature: (output [b, q_len, H, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    head_mask = attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] != 1
    extras = any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "cache"))
    if query.shape[2] != 1 or groups == 1 or dropout or head_mask or extras or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)  # fmt: skip
    batch, heads, _, dim = query.shape
    packed = query.reshape(batch, heads // groups, groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def use_packed_decode_attention(model) -> None:
    """Makes ``model`` (a transformers model whose attention runs through SDPA) use ``packed_decode_attention``;
    its masks stay SDPA's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if model.config._attn_implementation != "sdpa":
        raise ValueError(
            f"packed decode attention replaces SDPA; this model uses {model.config._attn_implementation!r}: load it "
            "with attn_implementation='sdpa'"
        )
    AttentionInterface.register(NAME, packed_decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
