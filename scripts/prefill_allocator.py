"""Where a prefill's cudaMalloc / cudaFree calls come from (GPU only): each one that the caching allocator makes
during a timed prefill, with its size and the Python frames that asked for it.

    python scripts/prefill_allocator.py [--formats w8a8,fp8] [--layers 4] [--prefill 2048]

``ptq.bench.infer`` records the counts (``prefill_allocator_calls``); a cudaFree waits for the GPU, so a
prefill that makes them runs with the host and the GPU in series. This names the callers.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from ptq.bench.infer import convert_and_join, cuda_or_exit
from ptq.bench.quant import build_model


def frames_of(event: dict, depth: int = 6) -> str:
    """The innermost frames of ptq (and the one that called into torch) that led to ``event``."""
    frames = [f for f in event.get("frames", []) if "/ptq/" in f["filename"] or "transformers" in f["filename"]]
    return " <- ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']}:{f['name']}" for f in frames[:depth])


def timed(prefill, fmt: str, note: str) -> None:
    """One prefill: the host's time to issue it, its wall time, and the cudaMalloc / cudaFree calls it made."""
    stats = torch.cuda.memory_stats()
    start = time.perf_counter()
    prefill()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    after = torch.cuda.memory_stats()
    counts = {k: after.get(k, 0) - stats.get(k, 0) for k in ("num_device_alloc", "num_device_free")}
    print(f"{fmt}: prefill host {host * 1e3:.1f} ms, wall {wall * 1e3:.1f} ms{note}, {counts}")


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="w8a8")
    p.add_argument("--shape", default="llama-3-8b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prefill", type=int, default=2048)
    args = p.parse_args(argv)
    device = cuda_or_exit("scripts/prefill_allocator.py")
    for fmt in args.formats.split(","):
        torch.manual_seed(0)
        model = build_model(args.shape, args.layers, torch.bfloat16, device)
        convert_and_join(model, fmt)
        ids = torch.randint(0, model.config.vocab_size, (1, args.prefill), device=device)

        def prefill(model=model, ids=ids):
            return model(input_ids=ids, use_cache=False, logits_to_keep=1)

        prefill()  # kernels compiled and tuned
        torch.cuda.synchronize()
        for _ in range(2):
            timed(prefill, fmt, "")
        torch.cuda.memory._record_memory_history(max_entries=200_000)
        timed(prefill, fmt, " (history recording on)")
        trace = torch.cuda.memory._snapshot()["device_traces"][device.index or 0]
        torch.cuda.memory._record_memory_history(enabled=None)
        callers = collections.Counter()
        for event in trace:
            if event["action"] in ("segment_alloc", "segment_free", "segment_map", "segment_unmap"):
                callers[(event["action"], event["size"], frames_of(event))] += 1
        for (action, size, where), count in callers.most_common(20):
            print(f"  {count:4d} x {action} {size / 2**20:8.1f} MiB  {where}")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
