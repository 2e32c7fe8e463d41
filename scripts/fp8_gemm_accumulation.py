"""W8A8 GEMMs for a 2048-token prefill at Llama-3-8B's block shapes, one CUDA GPU.

    python scripts/fp8_gemm_accumulation.py [--rounding]

FP8 (E4M3) through torch._scaled_mm (row-wise scales) and every tile of ptq's GEMM, summed with an fp32 promotion
per K tile and without (PTQ_FP8_FAST_ACCUM); int8 (torch._int_mm + scaling, ptq's tiles) and bf16 beside. Per
product: the median time of CUDA-graph replays (triton.testing.do_bench_cudagraph), TFLOPS, and the relative error
(Frobenius) against the exact product of the codes and their scales. The activations are random with 16 outlier
channels, the weights random; both rounded as the layers round them (per token, per output channel).
``--rounding`` (any machine): what rounding x and W to E4M3 and to int8 does to the same products, against the
unrounded product, for scale beside the summation errors.
"""

import argparse

import torch

from ptq.bench.infer import cuda_or_exit
from ptq.quant import kernels
from ptq.quant.linear import Fp8Linear, Int8Linear, fp8_rows, int8_rows

M = 2048
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LAYERS = {torch.float8_e4m3fn: (Fp8Linear, fp8_rows), torch.int8: (Int8Linear, int8_rows)}
# FP8 tiles timed beside kernels.W8A8_GEMM_CANDIDATES
EXTRA = [(128, 256, 64, 8, 8, 4), (128, 128, 128, 8, 4, 4), (256, 128, 64, 8, 8, 4), (64, 256, 128, 8, 4, 4),
         (128, 256, 128, 8, 8, 4), (128, 128, 256, 8, 8, 3)]  # fmt: skip


def bench(fn, *args):
    import triton

    try:
        return triton.testing.do_bench_cudagraph(lambda: fn(*args), rep=30, return_mode="median") * 1e3
    except Exception as e:  # noqa: BLE001 (a tile that does not compile or launch for this shape)
        return f"fail {type(e).__name__}"


def rel(got, exact):
    return ((got.double() - exact).norm() / exact.norm()).item()


def rounded_weight(w, dtype):
    """W's codes [N, K] and per-output-channel scales [N], as the W8A8 layer of that kind stores them."""
    layer = LAYERS[dtype][0].from_weight(w, None)
    return layer.weight, layer.weight_scale.reshape(-1)


def random_operands(rows, n, k, device):
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
    x[:, :16] *= 20  # a few outlier channels, as real activations have
    return x, torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02


def rounding_errors(n, k, rows=256):
    """Relative error of the product when x (per token) and W (per output channel) are rounded to each format."""
    x, w = random_operands(rows, n, k, "cpu")
    exact = x.double() @ w.double().t()
    errors = {}
    for dtype, (_, rows_of) in LAYERS.items():
        qx, sx = rows_of(x)  # per token, as the layers round activations
        qw, sw = rounded_weight(w, dtype)
        product = (qx.double() * sx.double()) @ (qw.double() * sw.double()[:, None]).t()
        errors[str(dtype).removeprefix("torch.")] = rel(product, exact)
    return errors


def time_shape(n, k):
    x, w = random_operands(M, n, k, "cuda")
    line = {"bf16": bench(torch.matmul, x, w.t())}
    for act, dtype in ((kernels.ACT_FP8, torch.float8_e4m3fn), (kernels.ACT_INT8, torch.int8)):
        qx, sx = kernels.quantize_rows(x, act)
        qw, sw = rounded_weight(w, dtype)
        exact = (qx.double() @ qw.double().t()) * sx.double() * sw.double()[None, :]
        tag = "fp8" if dtype == torch.float8_e4m3fn else "int8"
        configs = [kernels.LIBRARY] + kernels.W8A8_GEMM_CANDIDATES + (EXTRA if tag == "fp8" else [])
        for fast in (False, True) if tag == "fp8" else (False,):
            for c in configs:
                label = f"{tag}{'-fast' if fast else ''} {'lib' if c == kernels.LIBRARY else c}"
                args = (c, qx, sx, qw, sw, torch.bfloat16, fast)
                try:
                    y = kernels._launch_w8a8_gemm(*args)
                except Exception as e:  # noqa: BLE001
                    line[label] = f"fail {type(e).__name__}"
                    continue
                line[label] = (bench(kernels._launch_w8a8_gemm, *args), rel(y, exact))
    return line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounding", action="store_true", help="only the formats' rounding errors (CPU)")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.rounding:
        for name, (n, k) in SHAPES.items():
            errors = ", ".join(f"{fmt} {err:.2e}" for fmt, err in rounding_errors(n, k).items())
            print(f"{name} {n}x{k}: rounding x and W to {errors}")
        return
    cuda_or_exit("scripts/fp8_gemm_accumulation.py")
    totals = {}
    for name, (n, k) in SHAPES.items():
        flops = 2 * M * n * k
        print(f"== {name} {M}x{n}x{k}")
        for label, v in time_shape(n, k).items():
            t = v[0] if isinstance(v, tuple) else v
            if isinstance(t, str):
                print(f"  {label:45s} {t}")
                continue
            err = f"  err {v[1]:.2e}" if isinstance(v, tuple) else ""
            print(f"  {label:45s} {t:8.1f} us {flops / t / 1e6:7.0f} TFLOPS{err}")
            totals.setdefault(label.split(" ")[0], {}).setdefault(name, []).append(t)
    print("== best per kind, summed over a block's four products (us)")
    for kind, per in totals.items():
        print(f"  {kind:10s} {sum(min(v) for v in per.values()):8.1f}", {s: round(min(v), 1) for s, v in per.items()})


if __name__ == "__main__":
    main()
