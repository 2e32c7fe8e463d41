"""``python -m ptq.bench.kernels``: each quantized linear's kernel against bf16, one linear at a time.

For the linears of one block of a real shape (default Llama-3-8B: q, k, v, o, gate, up, down; random
weights), every format's layer (``ptq.bench.infer.make_layer``) is timed at each row count (tokens):
one CUDA graph calls as many copies of the layer as hold several times the L2 cache (so that each call
reads its weight from memory, as a decode step does), replayed; the time per call is the median of five
timed replays over the copies. A graph, because at one token a layer's kernel takes microseconds and
launching it from Python takes as long: events around eager calls would time the launcher. Beside each
time: the bytes the layer holds over the time, as a fraction of the device-to-device copy bandwidth
measured in the same run (reading the weight once is the memory-bound limit). The block's totals weigh
each linear once, as a decode step runs them. Act-order layers (``w4a16-actorder``) are timed as inference runs
them: inputs in group order (``QuantLinear.sort_groups``), x gathered per call.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch

from ptq.bench.infer import FORMATS, copy_bandwidth, cuda_or_exit, kernel_settings, make_layer, parse_formats
from ptq.bench.quant import SHAPES, command_line
from ptq.checkpoint import module_bytes
from ptq.quant import kernels
from ptq.quant.linear import QuantLinear
from ptq.results import environment


def timed_layer(fmt: str, weight: torch.Tensor) -> torch.nn.Module:
    """``make_layer``'s layer as inference runs it (act-order: inputs stored in group order)."""
    layer = make_layer(fmt, weight)
    if isinstance(layer, QuantLinear):
        layer.sort_groups()
    return layer


def block_linear_shapes(shape: str, joined: bool = False) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of one block's linears; ``joined``: q, k, v and gate, up as the single
    products ``ptq.fuse`` makes of them."""
    s = SHAPES[shape]
    hidden, inter = s["hidden_size"], s["intermediate_size"]
    head = hidden // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * head
    if joined:
        return {"qkv": (hidden + 2 * kv, hidden), "o": (hidden, hidden), "gate_up": (2 * inter, hidden),
                "down": (hidden, inter)}  # fmt: skip
    return {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
            "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}  # fmt: skip


# Formats whose layers ptq.fuse cannot join (tinygemm: repacked weights). NVFP4 joins: the linears that read one
# input share one global scale (ptq's methods, and ptq.bench.infer's conversion, store them so)
UNJOINED = ("w4a16-tinygemm",)


L2_FLUSH_BYTES = 4 * 60 * 2**20  # the copies one timing cycles through: four times an H100/H200's L2


def graphed_seconds(calls: list, repeat: int = 5) -> float:
    """Seconds per call of ``calls`` (zero-argument functions), all captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / len(calls))
    return statistics.median(times)


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--rows", default="1,16,64,2048")
    p.add_argument(
        "--joined",
        action="store_true",
        help="q, k, v and gate, up as one product each, as ptq.fuse joins them (not tinygemm)",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    formats = parse_formats(args.formats)
    device = cuda_or_exit("ptq.bench.kernels")
    bandwidth = copy_bandwidth(device)
    rows = [int(r) for r in args.rows.split(",")]
    record = {"shape": args.shape, "rows": rows, "joined": args.joined, "copy_bytes_per_s": bandwidth,
              "env": environment(device), "kernel_settings": kernel_settings(),
              "command": command_line("python -m ptq.bench.kernels", argv), "formats": []}  # fmt: skip
    for fmt in formats:
        linears = block_linear_shapes(args.shape, args.joined and fmt not in UNJOINED)
        entry = {"format": fmt, "linears": {}}
        for name, (out_features, in_features) in linears.items():
            torch.manual_seed(0)
            weight = torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16) * 0.02
            first = timed_layer(fmt, weight)
            held = module_bytes(first)
            copies = [first] + [timed_layer(fmt, weight.roll(c, 0)) for c in range(1, math.ceil(L2_FLUSH_BYTES / held))]
            times, tiles = {}, {}
            for m in rows:
                x = torch.randn(m, in_features, device=device, dtype=torch.bfloat16)
                known = kernels.tuned_tiles()
                first(x)  # tunes the tile for this shape before the capture
                tiles[m] = [list(map(str, tile)) for key, tile in kernels.tuned_tiles().items() if key not in known]
                calls = [lambda layer=layer, x=x: layer(x) for layer in (copies if m <= 64 else copies[:2])]
                times[m] = graphed_seconds(calls)
            fractions = {m: held / t / bandwidth for m, t in times.items()}
            # tiles: what the tuner chose at the first call of each row count (none where a shape was tuned before)
            entry["linears"][name] = {"bytes": held, "seconds": times, "bandwidth_fraction": fractions, "tiles": tiles}
            del copies, first, weight
        entry["block_seconds"] = {m: sum(v["seconds"][m] for v in entry["linears"].values()) for m in rows}
        entry["block_bytes"] = sum(v["bytes"] for v in entry["linears"].values())
        record["formats"].append(entry)
        print(fmt, {m: f"{t * 1e6:.0f} us" for m, t in entry["block_seconds"].items()}, flush=True)
        add_speedups(record)
        if args.out:  # after every format, so that a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(record, f, indent=2)
    for entry in record["formats"]:
        if "block_speedup_vs_bf16" in entry:
            print(entry["format"], {m: f"{s:.2f}x" for m, s in entry["block_speedup_vs_bf16"].items()})


def add_speedups(record: dict) -> None:
    """Each format's block time against bf16's, where bf16 was measured."""
    base = next((f for f in record["formats"] if f["format"] == "bf16"), None)
    for entry in record["formats"] if base is not None else []:
        seconds = entry["block_seconds"]
        entry["block_speedup_vs_bf16"] = {m: base["block_seconds"][m] / t for m, t in seconds.items()}


if __name__ == "__main__":
    main()
