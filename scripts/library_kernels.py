"""ptq's quantized-linear kernels against a library's, linear by linear, on one GPU.

    python scripts/library_kernels.py [--rows 1,16,2048] [--out library.json]

The library is GemLite (``pip install gemlite``: Triton kernels for low-bit products, the W4A16 kernel
torchao and SGLang call): its grouped 4-bit weights (W ~ (W_q - z) s, group 128, bf16) against ptq's W4A16
(GPTQ layout, asymmetric, group 128), and its dynamic int8 / FP8 W8A8 (per-channel weights, per-token
activations) against ptq's. Every layer is timed as ``ptq.bench.kernels`` times them: copies enough to cycle
through four times the L2 cache, called in one CUDA graph, median of five replays. The weights are random;
GemLite's W4A16 layer holds ptq's codes, scales and zero points (scales and zero points in bf16, as it stores
them), its W8A8 layers quantize the same bf16 weight themselves (per channel), and each output is compared with
ptq's (largest difference relative to ptq's largest output).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from ptq.bench.infer import cuda_or_exit
from ptq.bench.kernels import L2_FLUSH_BYTES, block_linear_shapes, graphed_seconds, timed_layer
from ptq.bench.quant import command_line
from ptq.checkpoint import module_bytes
from ptq.results import environment


def gemlite_w4(layer) -> torch.nn.Module:
    """GemLite's grouped 4-bit layer holding ``layer``'s (a ptq ``QuantLinear``, GPTQ layout) numbers."""
    import gemlite

    qw = layer.quantized_weight()  # codes [out, in] uint8, scale / zero [out, groups]
    out_features, in_features = qw.qweight.shape
    glayer = gemlite.GemLiteLinear(4, group_size=qw.spec.group_size, in_features=in_features,
                                   out_features=out_features, input_dtype=gemlite.DType.BF16,
                                   output_dtype=gemlite.DType.BF16)  # fmt: skip
    glayer.pack(qw.qweight.to(torch.uint8), qw.scale.to(torch.bfloat16), qw.zero.to(torch.bfloat16), None)
    return glayer


def gemlite_w8a8(weight: torch.Tensor, fp8: bool) -> torch.nn.Module:
    from gemlite.helper import A8W8_FP8_dynamic, A8W8_INT8_dynamic

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    maker = A8W8_FP8_dynamic if fp8 else A8W8_INT8_dynamic
    return maker(device=str(weight.device), dtype=torch.bfloat16).from_linear(linear)


PAIRS = {  # name: (ptq format, the library layer made from ptq's layer and the weight)
    "w4a16": ("w4a16", lambda layer, weight: gemlite_w4(layer)),
    "w8a8": ("w8a8", lambda layer, weight: gemlite_w8a8(weight, fp8=False)),
    "fp8": ("fp8", lambda layer, weight: gemlite_w8a8(weight, fp8=True)),
}


def timed(layers: list, x: torch.Tensor) -> float:
    return graphed_seconds([lambda layer=layer: layer(x) for layer in layers])


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default=",".join(PAIRS))
    p.add_argument("--rows", default="1,16,2048")
    p.add_argument("--linears", default="qkv,o,gate_up,down", help="of the joined Llama-3-8B block")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = cuda_or_exit("scripts/library_kernels.py")
    try:
        import gemlite
    except ImportError:
        sys.exit("scripts/library_kernels.py: GemLite is not installed (pip install gemlite)")
    config = f"{gemlite.__path__[0]}/configs/h100.json"  # its tuned configs: picked by name, and an H200 is not an H100
    gemlite.GemLiteLinear.load_config(config)
    rows = [int(r) for r in args.rows.split(",")]
    shapes = block_linear_shapes("llama-3-8b", joined=True)
    results = []
    for name in args.linears.split(","):
        out_features, in_features = shapes[name]
        torch.manual_seed(0)
        weight = torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16) * 0.02
        copies = max(1, math.ceil(L2_FLUSH_BYTES / (weight.numel() * weight.element_size())))
        dense_layers = [timed_layer("bf16", weight.clone()) for _ in range(copies)]
        for fmt in args.formats.split(","):
            ptq_fmt, make_library = PAIRS[fmt]
            ours = timed_layer(ptq_fmt, weight)
            theirs = make_library(ours, weight)
            n = max(1, math.ceil(L2_FLUSH_BYTES / module_bytes(ours)))
            our_layers = [ours] + [timed_layer(ptq_fmt, weight) for _ in range(n - 1)]
            their_layers = [theirs] + [make_library(layer, weight) for layer in our_layers[1:]]
            for m in rows:
                x = torch.randn(m, in_features, device=device, dtype=torch.bfloat16)
                y_ours, y_theirs = ours(x), theirs(x)
                error = ((y_ours.float() - y_theirs.float()).abs().max() / y_ours.float().abs().max()).item()
                row = {"linear": name, "format": fmt, "rows": m, "bf16_s": timed(dense_layers, x),
                       "ptq_s": timed(our_layers, x), "gemlite_s": timed(their_layers, x),
                       "relative_difference": error}  # fmt: skip
                results.append(row)
                print(f"{name:8s} {fmt:6s} rows {m:5d}  bf16 {row['bf16_s'] * 1e6:8.1f} us  ptq "
                      f"{row['ptq_s'] * 1e6:8.1f} us  gemlite {row['gemlite_s'] * 1e6:8.1f} us  "
                      f"(outputs differ by {error:.1e})", flush=True)  # fmt: skip
            del our_layers, their_layers, ours, theirs
            torch.cuda.empty_cache()
    if args.out:
        record = {
            "command": command_line("python scripts/library_kernels.py", argv),
            "gemlite": getattr(gemlite, "__version__", None),
            "env": environment(device),
            "results": results,
        }
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
