"""The graphed, compiled decode step with and without programmatic dependent launch (GPU, compute capability 9+).

    python scripts/pdl_decode.py --formats bf16,w4a16,fp8 --layers 8 --batches 1 --repeat 5

Builds ``ptq.bench.infer``'s random-weight model of the shape (``--layers`` of its blocks), converts and joins its
linears as the benchmark does, and replays the torch.compile'd step from a CUDA graph (as ``graphed_decode``) under
each setting: neither under PDL; inductor's kernels (``torch._inductor.config.triton.enable_pdl``, i.e.
TORCHINDUCTOR_ENABLE_PDL=1); and ptq's kernels too (``ptq.quant.kernels.PDL``, i.e. PTQ_PDL=1). Prints the step's
microseconds (median of ``--repeat`` runs of ``--steps`` greedy steps), the change against the first setting, and
whether the greedy tokens are the same as under the first setting (they must be: the kernels and tiles are the
same, only when each may start changes).
"""

import argparse
import statistics
import time

import torch

from ptq.bench.infer import convert_and_join, parse_formats, static_decode_step
from ptq.bench.quant import SHAPES, build_model
from ptq.quant import kernels

SETTINGS = {"none": (False, False), "inductor": (True, False), "inductor+ptq": (True, True)}


@torch.no_grad()
def graphed_tokens(model, prompt_ids: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    """``graphed_decode``'s replay, also returning the greedy tokens [batch, steps]."""
    step = static_decode_step(model, prompt_ids, steps, compiled=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
        step.restart()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = step().logits
    tokens = []
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        graph.replay()
        step.token.copy_(logits[:, -1:].argmax(-1))
        step.position.add_(1)
        tokens.append(step.token.clone())
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cat(tokens, dim=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="bf16,w4a16,fp8")
    p.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batches", default="1")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"of {', '.join(SETTINGS)}")
    args = p.parse_args()
    settings = args.settings.split(",")
    for fmt in parse_formats(args.formats):
        torch.manual_seed(0)
        model = build_model(args.shape, args.layers, torch.bfloat16, "cuda")
        model.config.use_cache = True
        convert_and_join(model, fmt)
        for batch in [int(b) for b in args.batches.split(",")]:
            ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt), device="cuda")
            first = None
            for name in settings:
                if fmt == "bf16" and name == "inductor+ptq":
                    continue  # no ptq kernel in the step
                torch._inductor.config.triton.enable_pdl, kernels.PDL = SETTINGS[name]
                torch._dynamo.reset()
                runs = [graphed_tokens(model, ids, args.steps) for _ in range(args.repeat)]
                us = statistics.median(seconds for seconds, _ in runs) / args.steps * 1e6
                tokens = runs[0][1]
                same = all(torch.equal(t, tokens) for _, t in runs)
                if first is None:
                    first = (us, tokens)
                change = f"{100 * (us / first[0] - 1):+.1f}%"
                print(f"{fmt} b{batch} {name:13s} {us:8.1f} us per step ({change}); tokens as the first setting: "
                      f"{torch.equal(tokens, first[1])}, runs agree: {same}", flush=True)  # fmt: skip
        del model
        torch.cuda.empty_cache()
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
