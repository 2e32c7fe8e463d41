"""One decode step's attention on a static cache, per SDPA backend, copied GQA against packed (GPU only).

    python scripts/decode_attention_backends.py --batches 1,16 --contexts 164,2048 --tiles 64,4,2:32,4,4:128,8,2

Llama-3-8B's heads (32 query, 8 key/value, dimension 128), bf16, a boolean mask that lets the query see the first
``context - 4`` keys of the cache. ``copied``: transformers' static-cache path (``repeat_kv``, then SDPA over 32
heads); ``packed``: ``ptq.attention``'s (the 4 query heads of a key/value head as its 4 queries); ``triton``: ptq's
decode kernel (``ptq.attention.decode_attention``, after the SDPA rows of "default"; one row per ``--tiles`` entry:
keys per step, warps, programs per multiprocessor). Microseconds per
call replayed from a CUDA graph (triton's ``do_bench_cudagraph``), and each result's distance to the math backend's.
"""

import argparse
import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa
from triton.testing import do_bench_cudagraph

from ptq.attention import TILE, _decode_attention

HEADS, KV_HEADS, DIM = 32, 8, 128
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH, "default": None}  # fmt: skip


def copied(q, k, v, mask):
    groups = HEADS // KV_HEADS
    k = k[:, :, None].expand(-1, -1, groups, -1, -1).reshape(k.shape[0], HEADS, -1, DIM)
    v = v[:, :, None].expand(-1, -1, groups, -1, -1).reshape(v.shape[0], HEADS, -1, DIM)
    return sdpa(q, k, v, attn_mask=mask)


def packed(q, k, v, mask):
    out = sdpa(q.reshape(q.shape[0], KV_HEADS, HEADS // KV_HEADS, DIM), k, v, attn_mask=mask)
    return out.reshape(q.shape[0], HEADS, 1, DIM)


def triton(q, k, v, mask, tile=TILE):
    return _decode_attention(q, k, v, mask, DIM**-0.5, tile).transpose(1, 2)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,16")
    p.add_argument("--contexts", default="164,2048")
    p.add_argument("--tiles", default=":".join(",".join(map(str, t)) for t in [TILE, (32, 4, 4), (128, 8, 2)]))
    args = p.parse_args()
    tiles = [tuple(map(int, t.split(","))) for t in args.tiles.split(":")]
    torch.manual_seed(0)
    for batch in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            q = torch.randn(batch, HEADS, 1, DIM, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(batch, KV_HEADS, context, DIM, device="cuda", dtype=torch.bfloat16) for _ in "kv")
            mask = (torch.arange(context, device="cuda") < context - 4).expand(batch, 1, 1, context)
            with sdpa_kernel(SDPBackend.MATH):
                want = copied(q.float(), k.float(), v.float(), mask)
            for name, backend in BACKENDS.items():
                ways = [(copied, ()), (packed, ())] + ([(triton, (t,)) for t in tiles] if backend is None else [])
                for way, extra in ways:
                    label = f"{way.__name__} {','.join(map(str, *extra))}" if extra else way.__name__
                    try:
                        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                            out = way(q, k, v, mask, *extra)
                            us = do_bench_cudagraph(lambda w=way, a=(q, k, v, mask, *extra): w(*a), rep=30) * 1e3
                        err = (out.float() - want).abs().max().item()
                        print(f"batch {batch:2d} context {context:5d} {name:9s} {label:15s} {us:7.1f} us  "
                              f"max error {err:.1e}", flush=True)  # fmt: skip
                    except RuntimeError as e:
                        print(f"batch {batch:2d} context {context:5d} {name:9s} {label:15s} not run: "
                              f"{str(e).splitlines()[0][:120]}")  # fmt: skip


if __name__ == "__main__":
    with torch.no_grad():
        main()
