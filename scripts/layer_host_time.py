"""Host time per call of the W8A8 layers on CUDA: what an eager prefill or decode pays in Python and in launching
kernels, beside their GPU time (no synchronisation inside the timed loop).

    python scripts/layer_host_time.py [--rows 1,2048] [--after-compile] [--python-profile]

``--after-compile`` measures again after a torch.compile'd W8A8 layer has run and been captured in a CUDA graph in
the same process (``ptq.bench.infer --compile`` does that before the next format's eager prefill).
``--python-profile`` prints cProfile's costliest functions over the int8 layer's calls at the last of ``--rows``
(after the compile too, with ``--after-compile``), to show which Python frames the host time is in.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from ptq.bench.infer import cuda_or_exit
from ptq.quant import kernels
from ptq.quant.linear import Fp8Linear, Int8Linear


def host_microseconds(call, calls: int) -> float:
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    host = (time.perf_counter() - start) / calls
    torch.cuda.synchronize()
    return host * 1e6


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,2048")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--after-compile", action="store_true", help="measure again after a compiled, graphed layer")
    p.add_argument("--python-profile", action="store_true", help="cProfile the int8 layer's calls")
    args = p.parse_args(argv)
    device = cuda_or_exit("scripts/layer_host_time.py")
    x1 = torch.randn(1, 4096, device=device, dtype=torch.bfloat16)
    capability = host_microseconds(lambda: torch.cuda.get_device_capability(device), 2000)
    print(f"torch.cuda.get_device_capability: {capability:.1f} us")
    print(f"kernels.available(x, fp8=True): {host_microseconds(lambda: kernels.available(x1, fp8=True), 2000):.1f} us")
    weight = torch.randn(6144, 4096, device=device, dtype=torch.bfloat16) * 0.02  # Llama-3-8B's q, k, v joined
    layers = [cls.from_weight(weight, None) for cls in (Int8Linear, Fp8Linear)]
    report(layers, args, device, "")
    if args.after_compile:
        compiled = torch.compile(torch.nn.Sequential(layers[0]), dynamic=False)
        for _ in range(3):
            compiled(x1)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            compiled(x1)
        graph.replay()
        torch.cuda.synchronize()
        report(layers, args, device, " after a compiled, graphed layer")


def report(layers, args, device, when: str) -> None:
    for layer in layers:
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, 4096, device=device, dtype=torch.bfloat16)
            host = host_microseconds(lambda layer=layer, x=x: layer(x), args.calls)
            print(f"{type(layer).__name__} {rows} rows: {host:.1f} us of host time per call{when}")
    if args.python_profile:
        x = torch.randn(int(args.rows.split(",")[-1]), 4096, device=device, dtype=torch.bfloat16)
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [layers[0](x) for _ in range(args.calls)])
        torch.cuda.synchronize()
        print(f"cProfile, {args.calls} calls of {type(layers[0]).__name__}{when}:")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
