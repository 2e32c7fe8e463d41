"""Decode attention that reads a grouped-query KV cache as it is stored.

With grouped-query attention (Llama-3: 32 query heads, 8 key/value heads) transformers' SDPA path copies every key
and value head ``num_key_value_groups`` times (``repeat_kv``) before each attention call once a mask is present,
as it is on a static cache, and it skips its own packing under torch.compile. For one query token per sequence
the heads that share a key/value head can instead be that head's queries: q [b, H, 1, d] is viewed as
[b, H / G, G, d] and attends to k, v [b, H / G, S, d] with the same mask (it does not depend on the query head).
The scores, softmax and weighted sum are the same numbers per (query head, key); only the copies are gone.

Two ways to compute that packed attention (``use_decode_attention(model, kind)``):

- ``packed``: ``torch.nn.functional.scaled_dot_product_attention`` on the packed query (cuDNN or another SDPA
  backend picks its kernel).
- ``triton`` (the default, faster than cuDNN's kernel for the packed shape in every case timed):
  ``decode_attention``, one Triton launch: a program per (sequence, key/value head, slice of the keys)
  keeps a running softmax over its keys (flash-decoding: m, l and the weighted sum, Dao et al. 2023), and the last
  slice to finish merges the slices' partial results.

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

KINDS = ("packed", "triton")
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


def use_decode_attention(model, kind: str = "triton") -> None:
    """Makes ``model`` (a transformers model whose attention runs through SDPA) attend for one query token
    without copying its grouped-query cache, by ``kind`` (``KINDS``; ``triton`` falls back to ``packed`` where its
    kernel does not apply); its masks stay SDPA's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if kind not in KINDS:
        raise ValueError(f"decode attention {kind!r} is unknown; choose one of {', '.join(KINDS)}")
    if model.config._attn_implementation != "sdpa":
        raise ValueError(
            f"decode attention replaces SDPA; this model uses {model.config._attn_implementation!r}: load it "
            "with attn_implementation='sdpa'"
        )
    name = f"ptq_{kind}_decode"
    AttentionInterface.register(name, packed_decode_attention if kind == "packed" else triton_decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    model.set_attn_implementation(name)


def applies(query, key, value) -> bool:
    """Whether ``decode_attention`` computes this call: Triton present, a power-of-two head size, keys and values
    alike, the head dimension contiguous."""
    dim = query.shape[-1]
    usable = triton is not None and (query.is_cuda or kernels.INTERPRET) and kernels.ENABLED
    contiguous = all(t.stride(-1) == 1 for t in (query, key, value))
    return usable and contiguous and dim & (dim - 1) == 0 and 16 <= dim <= 256 and key.shape == value.shape


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, keep_ptr, o_ptr, ws_ptr, stats_ptr, cnt_ptr, keys, split_keys,
                                 scale, stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh,
                                 stride_vs, stride_mb, KV_HEADS: tl.constexpr, GROUPS: tl.constexpr,
                                 ROWS: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr,
                                 MASKED: tl.constexpr):  # fmt: skip
        """Program (sequence b, key/value head h, slice): the GROUPS query heads of h (ROWS >= GROUPS rows, the
        rest zero) over keys [slice * split_keys, ...). The output o [b, 1, H, DIM] is contiguous."""
        pid = tl.program_id(0)
        part = tl.program_id(1)
        b = pid // KV_HEADS
        h = pid % KV_HEADS
        rows = tl.arange(0, ROWS)
        d = tl.arange(0, DIM)
        real = rows < GROUPS
        q_rows = q_ptr + b * stride_qb + (h * GROUPS + rows)[:, None] * stride_qh + d[None, :]
        q = tl.load(q_rows, mask=real[:, None], other=0.0)
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
            # fp32 inputs (CPU tests, fp32 models) multiply as fp32, not TF32; bf16/fp16 ones are exact either way
            scores = tl.where(seen[None, :], tl.dot(q, tl.trans(k), input_precision="ieee") * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: nothing to shift
            p = tl.exp(scores - shift[:, None])
            rescale = tl.exp(m - shift)
            v = tl.load(v_base + s[:, None] * stride_vs + d[None, :], mask=seen[:, None], other=0.0)
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


def _decode_attention(query, key, value, mask, scale: float, tile: tuple = TILE) -> torch.Tensor:
    """One query token per sequence: query [b, H, 1, d] against key, value [b, H / G, S, d] (a static or dynamic
    cache, as stored), ``mask`` boolean [b, 1, 1, S] or [1, 1, 1, S] (True: attend) or None -> output [b, 1, H, d]
    in the query's dtype. Scores and softmax in fp32; the probabilities are rounded to the values' dtype for their
    product, as flash attention does."""
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
        KV_HEADS=kv_heads, GROUPS=groups, ROWS=rows, DIM=dim, BLOCK=block, MASKED=mask is not None, num_warps=warps,
    )  # fmt: skip
    return out


@torch.library.custom_op("ptq::decode_attention", mutates_args=())
def _decode_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                         scale: float) -> torch.Tensor:  # fmt: skip
    return _decode_attention(query, key, value, mask, scale)


@_decode_attention_op.register_fake
def _(query, key, value, mask, scale):
    return query.new_empty(query.shape[0], 1, query.shape[1], query.shape[3])


# one query token per sequence (see _decode_attention); a custom operator under torch.compile
decode_attention = kernels.eager_or_operator(_decode_attention, _decode_attention_op)
