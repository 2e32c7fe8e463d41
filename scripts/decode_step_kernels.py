"""The kernels of one compiled decode step at batch 1, per format, with their GPU time (GPU only).

    python scripts/decode_step_kernels.py --formats bf16,fp8,w4a16 --layers 8 --attention sdpa,packed,triton

Builds ``ptq.bench.infer``'s random-weight model of the shape (``--layers`` of its blocks), converts and joins
its linears as the benchmark does, compiles the step on a static cache (``static_decode_step``) and records one
step with torch.profiler after two untimed ones (``kernel_launches``), with each ``--attention``
(``sdpa``: transformers' own; ``packed``, ``triton``: ``ptq.attention``'s). Prints, per format, every kernel name with
its count and summed time, and the step's time split into the linears, attention and the rest: what a graphed
step would cost without the host, and which part of it is not the weights' reading.
"""

import argparse

import torch

from ptq.attention import use_decode_attention
from ptq.bench.infer import convert_and_join, kernel_kind, kernel_launches, parse_formats, static_decode_step
from ptq.bench.quant import SHAPES, build_model


@torch.no_grad()
def step_kernels(fmt: str, shape: str, layers: int, prompt: int, attention: str) -> dict[str, list]:
    torch.manual_seed(0)
    model = build_model(shape, layers, torch.bfloat16, "cuda")
    if attention != "sdpa":
        use_decode_attention(model, attention)
    model.config.use_cache = True
    convert_and_join(model, fmt)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device="cuda")
    step = static_decode_step(model, ids, steps=4, compiled=True)
    step()  # the compile; kernel_launches runs one more untimed step
    kernels = {name: [count, seconds * 1e6] for name, (count, seconds) in kernel_launches(step).items()}
    del model, step
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return kernels


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="bf16,fp8")
    p.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--attention", default="sdpa", help="comma-separated: sdpa, packed, triton")
    args = p.parse_args()
    for fmt, attention in [(f, a) for f in parse_formats(args.formats) for a in args.attention.split(",")]:
        kernels = step_kernels(fmt, args.shape, args.layers, args.prompt, attention)
        split = {"linear": 0.0, "attention": 0.0, "other": 0.0}
        for name, (_, us) in kernels.items():
            split[kernel_kind(name)] += us
        total = sum(split.values())
        launches = sum(c for c, _ in kernels.values())
        print(f"{fmt}, {attention} attention: {len(kernels)} kernel names, {launches} launches, {total:.1f} us "
              f"per step; " + ", ".join(f"{k} {v:.1f} us" for k, v in split.items()), flush=True)  # fmt: skip
        for name, (count, us) in sorted(kernels.items(), key=lambda item: -item[1][1]):
            print(f"  {us:8.1f} us {count:4d}x  {kernel_kind(name):9s} {name[:150]}")


if __name__ == "__main__":
    main()
