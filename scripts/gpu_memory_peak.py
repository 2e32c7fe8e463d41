"""What is alive on the GPU at the peak of a quantization run: ``python scripts/gpu_memory_peak.py
--method gptq --offload --layers 2``. Records the CUDA allocator's history, finds the moment of
highest allocated memory, and prints the live allocations there with the code that made them."""

from __future__ import annotations

import argparse
from collections import Counter

import torch

import ptq
from ptq.bench.quant import build_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="gptq")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--offload", action="store_true")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    model = build_model("llama-3-8b", args.layers, torch.bfloat16, torch.device("cuda"))
    if args.offload:
        model.to("cpu")
    calib = torch.randint(0, model.config.vocab_size, (128, 2048))
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    ptq.quantize(model, method=args.method, calib=calib, device="cuda", offload=args.offload,
                 batch_size=args.batch_size)  # fmt: skip
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live: dict[int, tuple[int, str]] = {}
    current = peak = 0
    peak_live: dict = {}
    for event in snapshot["device_traces"][0]:
        if event["action"] == "alloc":
            frames = [f for f in event.get("frames", []) if "/ptq/" in f["filename"] or "transformers" in f["filename"]]
            where = " < ".join(f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in frames[:3])
            live[event["addr"]] = (event["size"], where)
            current += event["size"]
            if current > peak:
                peak, peak_live = current, dict(live)
        elif event["action"] in ("free_requested", "free_completed") and event["addr"] in live:
            if event["action"] == "free_requested":
                current -= live.pop(event["addr"])[0]
    print(f"peak allocated {peak / 2**30:.2f} GiB; live allocations by origin:")
    by_origin = Counter()
    for size, where in peak_live.values():
        by_origin[where] += size
    for where, size in by_origin.most_common(15):
        print(f"{size / 2**20:9.1f} MiB  {where}")


if __name__ == "__main__":
    main()
