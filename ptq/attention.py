"""Decode attention that reads a grouped-query KV cache as it is stored.

With grouped-query attention (Llama-3: 32 query heads, 8 key/value heads) transformers' SDPA path copies every key
and value head ``num_key_value_groups`` times (``repeat_kv``) before each attention call once a mask is present,
as it is on a static cache, and it skips its own packing under torch.compile. For one query token per sequence
the heads that share a key/value head can instead be that head's queries: q [b, H, 1, d] is viewed as
[b, H / G, G, d] and attends to k, v [b, H / G, S, d] with the same mask (it does not depend on the query head).
The scores, softmax and weighted sum are the same numbers per (query head, key); only the copies are gone.

Three ways to compute that packed attention (``use_decode_attention(model, kind)``):

- ``packed``: ``torch.nn.functional.scaled_dot_product_attention`` on the packed query (cuDNN or another SDPA
  backend picks its kernel).
- ``triton`` (faster than cuDNN's kernel for the packed shape in every case timed):
  ``decode_attention``, one Triton launch: a program per (sequence, key/value head, slice of the keys)
  keeps a running softmax over its keys (flash-decoding: m, l and the weighted sum, Dao et al. 2023), and the last
  slice to finish merges the slices' partial results.
- ``fused`` (the default): the same kernel also does what transformers' attention does around it for a new token
  on a static cache (``cached_decode_attention``): it rotates the token's query and key (RoPE) and writes its key
  and value into the cache, which takes three small kernels per block otherwise under torch.compile (rotary and
  key write, value write, the query's rotation) and more in eager steps. It replaces the forward of the attention
  modules whose forward is Llama's (``ROTARY_ATTENTIONS``) for one-token calls on a ``StaticLayer``; every other
  call runs their own forward with ``triton``'s attention.

Every other call (a prompt, a per-head mask, dropout, a model without groups) goes to transformers' SDPA.
"""

from __future__ import annotations

import torch

from ptq.quant import kernels

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

KINDS = ("packed", "triton", "fused")
# Attention classes whose forward is Llama's: q, k, v projections, rotate-half RoPE on q and k from the model's
# (cos, sin), the cache update, attention with ``module.scaling``, o_proj (the ones ``fused`` takes over)
ROTARY_ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention")
# The kernel's tile: keys per loop step, warps per program, programs per multiprocessor the key slices aim at
# (the fastest of five at batches 1 and 16 and 164 keys; scripts/decode_attention_backends.py --tiles)
TILE = (64, 4, 2)


def _packable(module, query, attention_mask, dropout, kwargs) -> bool:
    """One query token, grouped heads, a mask shared by the heads, nothing SDPA's own path must handle."""
    groups = getattr(module, "num_key_value_groups", 1)
    head_mask = attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] != 1
    extras = any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "cache"))
    return (
        query.shape[2] == 1
        and groups > 1
        and not dropout
        and not head_mask
        and not extras
        and not kwargs.get("output_attentions")
    )


def _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)  # fmt: skip


def packed_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):  # fmt: skip
    """transformers' attention-function signature: (output [b, q_len, H, d], None)."""
    if not _packable(module, query, attention_mask, dropout, kwargs):
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    batch, heads, _, dim = query.shape
    packed = query.reshape(batch, key.shape[1], heads // key.shape[1], dim)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def triton_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):  # fmt: skip
    """As ``packed_decode_attention``, computed by ``decode_attention`` where it applies (a boolean mask)."""
    mask = attention_mask
    boolean = mask is None or (
        mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[-1] == key.shape[2] and mask.stride(-1) == 1
    )
    if not (_packable(module, query, attention_mask, dropout, kwargs) and boolean and applies(query, key, value)):
        return packed_decode_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                       **kwargs)  # fmt: skip
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return decode_attention(query, key, value, attention_mask, scale), None


def use_decode_attention(model, kind: str = "fused") -> None:
    """Makes ``model`` (a transformers model whose attention runs through SDPA) attend for one query token
    without copying its grouped-query cache, by ``kind`` (``KINDS``; ``triton`` falls back to ``packed`` where its
    kernel does not apply, ``fused`` to ``triton``); its masks stay SDPA's. A later call switches the kind."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if kind not in KINDS:
        raise ValueError(f"decode attention {kind!r} is unknown; choose one of {', '.join(KINDS)}")
    if model.config._attn_implementation not in ("sdpa", *(f"ptq_{k}_decode" for k in KINDS)):
        raise ValueError(
            f"decode attention replaces SDPA; this model uses {model.config._attn_implementation!r}: load it "
            "with attn_implementation='sdpa'"
        )
    name = f"ptq_{kind}_decode"
    AttentionInterface.register(name, packed_decode_attention if kind == "packed" else triton_decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    model.set_attn_implementation(name)
    for module in model.modules():
        if getattr(vars(module).get("forward"), "fused_decode", False):
            del module.forward  # an earlier call's, back to the class's
        if kind == "fused" and type(module).__name__ in ROTARY_ATTENTIONS and "forward" not in vars(module):
            module.forward = _fused_forward(module, module.forward)


def _static_layer(cache, index: int):
    """Layer ``index`` of ``cache`` where it is a full-length ``StaticLayer`` holding tokens already, else None."""
    from transformers.cache_utils import StaticLayer

    layers = getattr(cache, "layers", None)
    layer = layers[index] if layers is not None and index < len(layers) else None
    return layer if type(layer) is StaticLayer and layer.is_initialized else None


def _fused_forward(module, original):
    """``module``'s forward (a ``ROTARY_ATTENTIONS`` class) with one-token calls on a static cache computed by
    ``cached_decode_attention``; ``original`` otherwise."""

    def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        layer = _static_layer(past_key_values, module.layer_idx)
        mask = attention_mask
        boolean = mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1
                                   and mask.shape[2] == 1 and mask.stride(-1) == 1)  # fmt: skip
        if (layer is None or hidden_states.shape[1] != 1 or module.training or position_embeddings is None
                or not boolean or kwargs.get("output_attentions")):  # fmt: skip
            return original(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        batch = hidden_states.shape[0]
        q, k, v = module.q_proj(hidden_states), module.k_proj(hidden_states), module.v_proj(hidden_states)
        cos, sin = position_embeddings
        if not cached_applies(q, k, v, cos, sin, layer.keys, layer.values, module.head_dim):
            return original(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        out = cached_decode_attention(q, k, v, cos, sin, layer.keys, layer.values, layer.cumulative_length, mask,
                                      module.scaling)  # fmt: skip
        layer.cumulative_length.add_(1)  # as StaticLayer.update does
        return module.o_proj(out.reshape(batch, 1, -1)), None

    forward.fused_decode = True
    return forward


def applies(query, key, value) -> bool:
    """Whether ``decode_attention`` computes this call: Triton present, a power-of-two head size, keys and values
    alike, the head dimension contiguous."""
    dim = query.shape[-1]
    usable = triton is not None and (query.is_cuda or kernels.INTERPRET) and kernels.ENABLED
    contiguous = all(t.stride(-1) == 1 for t in (query, key, value))
    return usable and contiguous and dim & (dim - 1) == 0 and 16 <= dim <= 256 and key.shape == value.shape


def cached_applies(query, key, value, cos, sin, key_cache, value_cache, dim: int) -> bool:
    """Whether ``cached_decode_attention`` computes this call: ``applies``' conditions on the cache, projections
    with their features contiguous, one (cos, sin) row per sequence or one for all."""
    rows_contiguous = all(t.stride(-1) == 1 and t.shape[1] == 1 for t in (query, key, value, cos, sin))
    rotation = cos.shape == sin.shape and cos.stride() == sin.stride() and cos.shape[0] in (1, query.shape[0])
    heads = key_cache.shape[1]
    shapes = key.shape[-1] == value.shape[-1] == heads * dim and query.shape[-1] % (heads * dim) == 0
    return (
        rows_contiguous and shapes and rotation and cos.shape[-1] == dim and key_cache.shape[-1] == dim
        and applies(query.view(query.shape[0], -1, 1, dim), key_cache, value_cache)
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _rotated(x_ptr, partner_ptr, cos, sin, sign, mask):
        """x cos + rotate_half(x) sin (transformers' apply_rotary_pos_emb) in fp32, rounded to x's dtype."""
        x = tl.load(x_ptr, mask=mask, other=0.0)
        turned = sign * tl.load(partner_ptr, mask=mask, other=0.0).to(tl.float32)
        return (x.to(tl.float32) * cos + turned * sin).to(x.dtype)

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, keep_ptr, o_ptr, ws_ptr, stats_ptr, cnt_ptr, keys, split_keys,
                                 scale, stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh,
                                 stride_vs, stride_mb, new_k_ptr, new_v_ptr, cos_ptr, sin_ptr, length_ptr, stride_nkb,
                                 stride_nvb, stride_rb, KV_HEADS: tl.constexpr, GROUPS: tl.constexpr,
                                 ROWS: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr,
                                 CACHED: tl.constexpr):  # fmt: skip
        """Program (sequence b, key/value head h, slice): the GROUPS query heads of h (ROWS >= GROUPS rows, the
        rest zero) over keys [slice * split_keys, ...). The output o [b, 1, H, DIM] is contiguous.

        CACHED: q is the new token's projection, not yet rotated; the cache holds ``length`` tokens before it and
        ``keys`` in all. The program rotates q and the token's key, the slice that holds position ``length`` writes
        the key and value there, and every slice takes them from registers rather than from the cache it may not see
        written yet."""
        pid = tl.program_id(0)
        part = tl.program_id(1)
        b = pid // KV_HEADS
        h = pid % KV_HEADS
        rows = tl.arange(0, ROWS)
        d = tl.arange(0, DIM)
        real = rows < GROUPS
        q_rows = q_ptr + b * stride_qb + (h * GROUPS + rows)[:, None] * stride_qh
        if CACHED:
            position = tl.load(length_ptr).to(tl.int32)
            partner = (d + DIM // 2) % DIM  # rotate_half: (-x2, x1)
            sign = tl.where(d < DIM // 2, -1.0, 1.0)
            cos = tl.load(cos_ptr + b * stride_rb + d).to(tl.float32)
            sin = tl.load(sin_ptr + b * stride_rb + d).to(tl.float32)
            q = _rotated(q_rows + d[None, :], q_rows + partner[None, :], cos[None, :], sin[None, :], sign[None, :],
                         real[:, None])  # fmt: skip
            k_row = new_k_ptr + b * stride_nkb + h * DIM
            new_k = _rotated(k_row + d, k_row + partner, cos, sin, sign, d < DIM)
            new_v = tl.load(new_v_ptr + b * stride_nvb + h * DIM + d)
            if part * split_keys <= position and position < (part + 1) * split_keys:
                tl.store(k_ptr + b * stride_kb + h * stride_kh + position * stride_ks + d, new_k)
                tl.store(v_ptr + b * stride_vb + h * stride_vh + position * stride_vs + d, new_v)
        else:
            q = tl.load(q_rows + d[None, :], mask=real[:, None], other=0.0)
        m = tl.full([ROWS], float("-inf"), tl.float32)  # the running maximum score per row,
        total = tl.zeros([ROWS], dtype=tl.float32)  # the sum of exp(score - m),
        acc = tl.zeros([ROWS, DIM], dtype=tl.float32)  # and of exp(score - m) v
        start = part * split_keys
        stop = tl.minimum(start + split_keys, keys)
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh
        first = start
        while first < stop:  # a while loop: its bounds are run-time numbers (no compile per cache length)
            s = first + tl.arange(0, BLOCK)
            seen = s < stop
            if MASKED:
                seen = seen & (tl.load(keep_ptr + b * stride_mb + s, mask=seen, other=0) != 0)
            k = tl.load(k_base + s[:, None] * stride_ks + d[None, :], mask=seen[:, None], other=0.0)
            if CACHED:  # keys past the new one are loaded (their load need not wait for the length) but not seen
                k = tl.where((s == position)[:, None], new_k[None, :], k)
                seen = seen & (s <= position)
            # fp32 inputs (CPU tests, fp32 models) multiply as fp32, not TF32; bf16/fp16 ones are exact either way
            scores = tl.where(seen[None, :], tl.dot(q, tl.trans(k), input_precision="ieee") * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: nothing to shift
            p = tl.exp(scores - shift[:, None])
            rescale = tl.exp(m - shift)
            v = tl.load(v_base + s[:, None] * stride_vs + d[None, :], mask=seen[:, None], other=0.0)
            if CACHED:
                v = tl.where((s == position)[:, None], new_v[None, :], v)
            total = total * rescale + tl.sum(p, axis=1)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m = m_new
            first += BLOCK
        out = o_ptr + (b * KV_HEADS * GROUPS + h * GROUPS + rows)[:, None] * DIM + d[None, :]
        splits = tl.num_programs(1)
        if splits == 1:
            tl.store(out, (acc / total[:, None]).to(o_ptr.dtype.element_ty), mask=real[:, None])
        else:  # each slice's (m, total, acc) to the workspace; the last to arrive merges them
            mine = (pid * splits + part) * ROWS + rows
            tl.store(ws_ptr + mine[:, None] * DIM + d[None, :], acc)
            tl.store(stats_ptr + 2 * mine, m)
            tl.store(stats_ptr + 2 * mine + 1, total)
            tl.debug_barrier()  # every thread's partial is written before the count
            arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
            if arrived == splits - 1:
                first_row = pid * splits * ROWS + rows
                m_all = tl.full([ROWS], float("-inf"), tl.float32)
                t = 0
                while t < splits:
                    m_all = tl.maximum(m_all, tl.load(stats_ptr + 2 * (first_row + t * ROWS), cache_modifier=".cg"))
                    t += 1
                shift = tl.where(m_all == float("-inf"), 0.0, m_all)
                merged = tl.zeros([ROWS, DIM], dtype=tl.float32)
                merged_total = tl.zeros([ROWS], dtype=tl.float32)
                t = 0
                while t < splits:
                    row = first_row + t * ROWS
                    weight = tl.exp(tl.load(stats_ptr + 2 * row, cache_modifier=".cg") - shift)
                    merged_total += weight * tl.load(stats_ptr + 2 * row + 1, cache_modifier=".cg")
                    part_acc = tl.load(ws_ptr + row[:, None] * DIM + d[None, :], cache_modifier=".cg")
                    merged += weight[:, None] * part_acc
                    t += 1
                tl.store(out, (merged / merged_total[:, None]).to(o_ptr.dtype.element_ty), mask=real[:, None])
                tl.atomic_xchg(cnt_ptr + pid, 0)


def _splits(device: torch.device, programs: int, keys: int, block: int, per_sm: int) -> tuple[int, int]:
    """Key slices per (sequence, key/value head), about ``per_sm`` programs per multiprocessor, and the keys of
    each (whole blocks; the last slice may hold fewer)."""
    blocks = triton.cdiv(keys, block)
    wanted = max(1, min(blocks, triton.cdiv(per_sm * kernels.multiprocessors(device), programs)))
    split_keys = triton.cdiv(blocks, wanted) * block
    return triton.cdiv(keys, split_keys), split_keys


def _decode_attention(query, key, value, mask, scale: float, tile: tuple = TILE,
                      new_token: tuple = ()) -> torch.Tensor:  # fmt: skip
    """One query token per sequence: query [b, H, 1, d] against key, value [b, H / G, S, d] (a static or dynamic
    cache, as stored), ``mask`` boolean [b, 1, 1, S] or [1, 1, 1, S] (True: attend) or None -> output [b, 1, H, d]
    in the query's dtype. Scores and softmax in fp32; the probabilities are rounded to the values' dtype for their
    product, as flash attention does. ``new_token``: ``_cached_decode_attention``'s (the kernel's CACHED mode)."""
    block, warps, per_sm = tile
    batch, heads, _, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    rows = max(16, triton.next_power_of_2(groups))  # tl.dot's smallest M
    programs = batch * kv_heads
    splits, split_keys = _splits(query.device, programs, keys, block, per_sm)
    out = torch.empty(batch, 1, heads, dim, dtype=query.dtype, device=query.device)
    workspace = torch.empty(programs * splits * rows, dim if splits > 1 else 1, dtype=torch.float32,
                            device=query.device)  # fmt: skip
    stats = torch.empty(programs * splits * rows, 2 if splits > 1 else 1, dtype=torch.float32, device=query.device)
    keep = out if mask is None else mask.view(torch.uint8)
    _decode_attention_kernel[(programs, splits)](
        query, key, value, keep, out, workspace, stats, kernels.tile_counters(query.device, programs), keys,
        split_keys, scale, query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), 0 if mask is None or len(mask) == 1 else mask.stride(0),
        *(new_token or (out,) * 5 + (0,) * 3), KV_HEADS=kv_heads, GROUPS=groups, ROWS=rows, DIM=dim, BLOCK=block,
        MASKED=mask is not None, CACHED=bool(new_token), num_warps=warps,
    )  # fmt: skip
    return out


def _cached_decode_attention(query, key, value, cos, sin, key_cache, value_cache, length, mask, scale: float,
                             tile: tuple = TILE) -> torch.Tensor:  # fmt: skip
    """A new token per sequence: its projections query [b, 1, H * d], key and value [b, 1, H / G * d] (not yet
    rotated), RoPE's cos and sin [b, 1, d]; the static cache key_cache, value_cache [b, H / G, S, d] holding
    ``length`` tokens (a 0-d int64 tensor, as transformers' ``StaticLayer.cumulative_length``), ``mask`` as
    ``decode_attention``'s. Writes the rotated key and the value at position ``length`` and returns the attention
    of the rotated query over the cache's ``length + 1`` tokens [b, 1, H, d]; the caller advances ``length``."""
    batch, dim = query.shape[0], key_cache.shape[-1]
    q = query.view(batch, -1, 1, dim)
    one_for_all = cos.shape[0] == 1  # transformers' rotary embedding gives one row for a batch at one position
    new_token = (key, value, cos, sin, length, key.stride(0), value.stride(0), 0 if one_for_all else cos.stride(0))
    return _decode_attention(q, key_cache, value_cache, mask, scale, tile, new_token)


@torch.library.custom_op("ptq::decode_attention", mutates_args=())
def _decode_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                         scale: float) -> torch.Tensor:  # fmt: skip
    return _decode_attention(query, key, value, mask, scale)


@_decode_attention_op.register_fake
def _(query, key, value, mask, scale):
    return query.new_empty(query.shape[0], 1, query.shape[1], query.shape[3])


# one query token per sequence (see _decode_attention); a custom operator under torch.compile
decode_attention = kernels.eager_or_operator(_decode_attention, _decode_attention_op)


# The length is read, not advanced: a kernel that advanced it was wrong under torch.compile, where transformers'
# positions come from the first layer's length and inductor recomputed the rotary angles after the operator had
# changed it, for the next layer
@torch.library.custom_op("ptq::cached_decode_attention", mutates_args=("key_cache", "value_cache"))
def _cached_decode_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                                sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                length: torch.Tensor, mask: torch.Tensor | None,
                                scale: float) -> torch.Tensor:  # fmt: skip
    return _cached_decode_attention(query, key, value, cos, sin, key_cache, value_cache, length, mask, scale)


@_cached_decode_attention_op.register_fake
def _(query, key, value, cos, sin, key_cache, value_cache, length, mask, scale):
    dim = key_cache.shape[-1]
    return query.new_empty(query.shape[0], 1, query.shape[-1] // dim, dim)


# a new token on a static cache: rotation, cache write and attention (see _cached_decode_attention)
cached_decode_attention = kernels.eager_or_operator(_cached_decode_attention, _cached_decode_attention_op)
