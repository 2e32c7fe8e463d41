"""Every one-token candidate tile of ptq's kernels on the Llama-3-8B linears, timed (GPU only).

    python scripts/one_token_candidates.py [--formats int4,int8,fp8,nvfp4,mxfp4] [--linears q,k,gate,down]
    python scripts/one_token_candidates.py --rows 16     # the few-token (tensor-core) candidates instead
    python scripts/one_token_candidates.py --rows 16 --formats int4 --linears qkv,o,gate_up,down  # joined shapes
    ncu --clock-control none --kernel-name regex:skinny --launch-skip 3 --launch-count 1 --section SpeedOfLight \
        python scripts/one_token_candidates.py --rows 16 --formats int4 --linears gate --only 128,128,2,4,4,nibble
                                                         # --only: run that one tile a few times, untimed (ncu)
    python scripts/one_token_candidates.py --rows 16 --formats int4 --extra "64,128,16,4,3,nibble,swap;..."
                                                         # --extra: time tiles not (yet) in the tuner's table

For each format and linear: copies of the layer that hold more than the L2 cache, one CUDA graph that calls
each candidate on all of them (``triton.testing.do_bench_cudagraph``, median), the time per call, the
bandwidth of reading the layer's bytes in that time, and the relative error against the layer's own output
(the dequantize-then-matmul reference for weight-only formats; W8A8 layers compute the same product). The
fastest five per linear are printed, with bf16 (cuBLAS) for reference. What the tuner then picks per shape
is what ``python -m ptq.bench.kernels`` times. Last, per format over the linears timed (two or more): the best
times fitted as a fixed part per call plus the bytes at a marginal bandwidth (``launch_fit``), the part of a small
product that no faster loop removes.
"""

import argparse

import torch
import triton

from ptq.bench.infer import make_layer
from ptq.quant import kernels

# qkv and gate_up: joined, as ptq.fuse joins them
SHAPES = {"q": (4096, 4096), "k": (1024, 4096), "gate": (14336, 4096), "down": (4096, 14336), "qkv": (6144, 4096)}
SHAPES["gate_up"] = (28672, 4096)
BYTES_PER_WEIGHT = {"int4": 0.5, "int8": 1.0, "fp8": 1.0, "nvfp4": 0.5625, "mxfp4": 0.53125}
BENCH_FORMAT = {"int4": "w4a16", "int8": "w8a8", "fp8": "fp8", "nvfp4": "nvfp4", "mxfp4": "mxfp4"}  # ptq.bench.infer's
L2_FLUSH_BYTES = 150e6


def seconds_per_call(calls) -> float:
    """Median seconds of one call when all ``calls`` replay from one CUDA graph."""
    total = triton.testing.do_bench_cudagraph(lambda: [call() for call in calls], rep=50, return_mode="median")
    return total * 1e-3 / len(calls)


def launch_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares of seconds = fixed + bytes / bandwidth over (bytes, seconds) points: (fixed, bandwidth)."""
    mean_b = sum(b for b, _ in points) / len(points)
    mean_t = sum(t for _, t in points) / len(points)
    slope = sum((b - mean_b) * (t - mean_t) for b, t in points) / sum((b - mean_b) ** 2 for b, _ in points)
    return mean_t - slope * mean_b, 1 / slope


def copies(nbytes: float) -> int:
    return max(2, int(L2_FLUSH_BYTES // nbytes))


def launcher(fmt, m, n, k, gemv=True):
    """The kernel arguments of layer ``m`` for ``kernels._launch`` (``gemv``: the one-token kernels)."""
    if fmt == "int4":
        return lambda c, x: kernels._launch(c, x, m.qweight, m.scales, m.qzeros, None, None, n, k,
                                            (m.qweight.stride(0), m.scales.stride(0)), 128, kernels.INT4, 0, False, 0,
                                            gemv)  # fmt: skip
    if fmt in ("int8", "fp8"):
        act = kernels.ACT_INT8 if fmt == "int8" else kernels.ACT_FP8
        return lambda c, x: kernels._launch(c, x, m.weight, m.weight_scale, None, None, None, n, k, (k, 0), 0,
                                            kernels.W8, act, False, 0, gemv)  # fmt: skip
    group, kind = (16, kernels.SCALE_E4M3) if fmt == "nvfp4" else (32, kernels.SCALE_E8M0)
    return lambda c, x: kernels._launch(c, x, m.codes, m.scale, None, None, m.tensor_scale, n, k,
                                        (m.codes.stride(0), m.scale.stride(0)), group, kernels.FP4, 0, False, kind,
                                        gemv)  # fmt: skip


def mma_applies(fmt, config, x, m, n, k) -> bool:
    """Whether MMA tile ``config`` computes layer ``m``'s product (INT4 g128 or NVFP4)."""
    if fmt == "int4":
        return kernels.mma_applies(config, x, m.qweight, m.scales, n, k, 128)
    kind = kernels.SCALE_E4M3 if fmt == "nvfp4" else kernels.SCALE_E8M0
    return fmt in ("nvfp4", "mxfp4") and kernels.mma_applies(config, x, m.codes, m.scale, n, k, 16, kernels.FP4, kind)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="int4,int8,fp8,nvfp4,mxfp4")
    p.add_argument("--linears", default="q,k,gate,down")
    p.add_argument("--rows", type=int, default=1, help="tokens per call; above 1 the few-token candidates")
    p.add_argument("--only", help="one candidate, comma-separated (64,128,2,4,4,nibble): run, not timed (profilers)")
    p.add_argument("--extra", default="", help="tiles to time beside the table's, ';'-separated (trials)")
    args = p.parse_args()
    if args.only:
        return run_only(args)
    gemv = args.rows == 1
    candidates = kernels.GEMV_CANDIDATES if gemv else kernels.CANDIDATES
    x_all, best = {}, {}
    for name in args.linears.split(","):
        n, k = SHAPES[name]
        x = x_all.setdefault(k, torch.randn(args.rows, k, device="cuda", dtype=torch.bfloat16))
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies(2 * n * k))]
        bf16 = seconds_per_call([lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in dense])
        print(f"{name} n={n} k={k} rows={args.rows}: bf16 {bf16 * 1e6:.1f} us ({2 * n * k / bf16 / 1e12:.2f} TB/s)")
        best.setdefault("bf16", []).append((2 * n * k, bf16))
        del dense
        for fmt in args.formats.split(","):
            nbytes = n * k * BYTES_PER_WEIGHT[fmt]
            layers = [make_layer(BENCH_FORMAT[fmt], torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
                      for _ in range(copies(nbytes))]  # fmt: skip
            want = layers[0](x).float()
            kind = {"int4": kernels.INT4, "int8": kernels.W8, "fp8": kernels.W8}.get(fmt, kernels.FP4)
            rows = []
            for config in candidates[kind] + [parse_config(c) for c in args.extra.split(";") if c]:
                if kernels.MMA in config and not mma_applies(fmt, config, x, layers[0], n, k):
                    continue  # an MMA tile needs whole column blocks and splits of whole groups
                runs = [launcher(fmt, m, n, k, gemv) for m in layers]
                try:
                    got = runs[0](config, x).float()
                    t = seconds_per_call([lambda r=r, c=config, x=x: r(c, x) for r in runs])
                except Exception as err:  # a tile that does not compile for this shape
                    print(f"  {fmt} {config}: {type(err).__name__}")
                    continue
                rows.append((t, config, ((got - want).norm() / want.norm()).item()))
            if rows:
                best.setdefault(fmt, []).append((nbytes, min(r[0] for r in rows)))
            ranked = sorted(rows, key=lambda r: r[0])
            shown = ranked[:5] + [next((r for r in ranked if (kernels.MMA in r[1]) != (kernels.MMA in ranked[0][1])),
                                       ranked[0])]  # fmt: skip
            for t, config, err in dict.fromkeys(shown):  # the five fastest, and the fastest of the other kind
                print(f"  {fmt:6s} {t * 1e6:7.1f} us  {nbytes / t / 1e12:5.2f} TB/s  error {err:.1e}  {config}")
            del layers
            torch.cuda.empty_cache()
    for fmt, points in best.items():
        if len({b for b, _ in points}) > 1:
            fixed, bandwidth = launch_fit(points)
            print(f"fit {fmt}: {fixed * 1e6:.1f} us per call + bytes at {bandwidth / 1e12:.2f} TB/s "
                  f"({len(points)} linears, best tile each)")  # fmt: skip


def parse_config(text: str) -> tuple:
    return tuple(int(f) if f.isdigit() else f for f in text.split(","))


def run_only(args, calls: int = 8):
    """Call one candidate tile ``calls`` times on each linear and format, for a profiler to catch."""
    config = parse_config(args.only)
    for name in args.linears.split(","):
        n, k = SHAPES[name]
        x = torch.randn(args.rows, k, device="cuda", dtype=torch.bfloat16)
        for fmt in args.formats.split(","):
            layer = make_layer(BENCH_FORMAT[fmt], torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
            run = launcher(fmt, layer, n, k, args.rows == 1)
            for _ in range(calls):
                run(config, x)
            torch.cuda.synchronize()
            print(f"{name} {fmt} {config}: {calls} calls")


if __name__ == "__main__":
    main()
