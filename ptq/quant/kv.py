"""KV-cache quantization: keys and values fake-quantized per head and token as attention reads them.

transformers computes attention through a registered function (``AttentionInterface``), which receives the
keys after RoPE and the values, [batch, kv_heads, tokens, head_dim], whether they come from this forward or
from the cache. ptq registers ``ptq_kv``: it quantizes each (head, token) row of keys and values with the KV
spec (``WeightSpec`` over rows of head_dim: int asymmetric per row as QuaRot, or any float format), then calls
the attention the model used before. Each row's scale depends only on that row, so quantizing the rows when
attention reads them equals quantizing them once as they enter the cache, for perplexity and generation
alike. With ``rotation`` (QuaRot), queries and keys are first multiplied by a Hadamard matrix per head:
q k^T is unchanged, and the keys lose their outlier channels before they are rounded (QuaRot Sec. 4.2).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ptq.quant.hadamard import Rotation
from ptq.quant.spec import WeightSpec
from ptq.quant.weight import fake_quantize_weight

IMPLEMENTATION = "ptq_kv"


class KVQuantizer:
    def __init__(self, spec: WeightSpec, rotation: Rotation | None = None) -> None:
        self.spec = spec
        self.rotation = rotation

    def quantize(self, states: torch.Tensor) -> torch.Tensor:
        rows = states.reshape(-1, states.shape[-1])
        return fake_quantize_weight(rows, self.spec).reshape(states.shape).to(states.dtype)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        if self.rotation is not None:
            query, key = self.rotation.apply(query), self.rotation.apply(key)
        return query, self.quantize(key), self.quantize(value)


def _quantized_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    quantizer = getattr(module, "_ptq_kv", None)
    if quantizer is not None:
        query, key, value = quantizer(query, key, value)
    original = module.config._ptq_attention
    if original in ALL_ATTENTION_FUNCTIONS:
        attend = ALL_ATTENTION_FUNCTIONS[original]
    else:  # "eager" is the modeling file's own function, not a registered one
        attend = sys.modules[type(module).__module__].eager_attention_forward
    return attend(module, query, key, value, attention_mask, **kwargs)


def use_quantized_attention(model: nn.Module) -> None:
    """Route the model's attention through ``ptq_kv``; layers without a quantizer (``attach_kv_quantizer``)
    compute as before, with the implementation the model used (remembered in its config)."""
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, _quantized_attention)
    if model.config._attn_implementation != IMPLEMENTATION:
        model.config._ptq_attention = model.config._attn_implementation
        model.config._attn_implementation = IMPLEMENTATION


def attach_kv_quantizer(attention: nn.Module, quantizer: KVQuantizer) -> None:
    attention._ptq_kv = quantizer
