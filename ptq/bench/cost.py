"""What a precision costs to serve, from a ``ptq.bench.infer`` record and a GPU's hourly price.

Per format: weight memory (GB and share of bf16), how many sequences of ``context`` tokens fit in the KV cache beside
the weights, the measured decode tokens/s at each batch, and the cost per million output tokens at each:

    sequences   = floor((utilization * GPU memory - weights - activations) / (KV bytes per token * context))
    KV bytes    = 2 (K and V) * layers * KV heads * head dim * 2 (bf16) per token
    cost / 1M   = price per hour / 3600 / (tokens/s) * 1e6

``activations`` is what the prefill of the benchmark needed beyond what was allocated before it (older
records: its peak minus the weights);
``utilization`` is the share of GPU memory a serving engine may take (vLLM's default, 0.9).

    python -m ptq.bench.cost results/bench/infer_....json [more records] --price-per-gpu-hour 3.50
        [--decode compiled] [--quality DIR ...] [--out DIR]

Several records (runs of the same shape on the same GPU, e.g. a format measured in a later run) are priced as one
table, each row as its own run measured it. ``RECORD:fmt,fmt`` takes only those formats of a record, so the latest
run of each format can be priced together (each format once).

``--quality``: records of ``ptq.run`` on a (small) model with the same formats; the plot puts each format's cost per
million tokens against that model's perplexity, labeled as measured on a different model than the speed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

KV_ELEMENT_BYTES = 2  # the benchmark's KV cache is bf16 in every format
UTILIZATION = 0.9


def kv_bytes_per_token(shape: dict) -> int:
    heads = shape.get("num_key_value_heads") or shape["num_attention_heads"]
    head_dim = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    return 2 * shape["num_hidden_layers"] * heads * head_dim * KV_ELEMENT_BYTES


def concurrent_sequences(gpu_bytes: int, weight_bytes: int, activation_bytes: int, kv_per_token: int, context: int,
                         utilization: float = UTILIZATION) -> int:  # fmt: skip
    """Sequences of ``context`` tokens whose KV cache fits beside the weights and the activations."""
    free = utilization * gpu_bytes - weight_bytes - activation_bytes
    return max(0, math.floor(free / (kv_per_token * context)))


def cost_per_million(price_per_hour: float, tokens_per_s: float | None) -> float | None:
    return None if not tokens_per_s else price_per_hour / 3600 / tokens_per_s * 1e6


# which measured decode prices the tokens: the step's kernels replayed from a CUDA graph, or the torch.compile'd step
DECODE_MODES = {"graph": "CUDA-graph step", "compiled": "torch.compiled step"}


def decode_rates(row: dict, mode: str = "graph") -> dict[int, float]:
    """{batch: tokens/s} of a format's measured decode in ``mode`` (``decode_b{batch}_tokens_per_s`` for the
    CUDA-graph numbers, ``decode_b{batch}_compiled_tokens_per_s`` for the compiled step's)."""
    suffix = "_compiled_tokens_per_s" if mode == "compiled" else "_tokens_per_s"
    rates = {}
    for key, value in row.items():
        batch = key.removeprefix("decode_b").removesuffix(suffix)
        if key.startswith("decode_b") and key.endswith(suffix) and batch.isdigit():
            rates[int(batch)] = value
    return dict(sorted(rates.items()))


def cost_rows(record: dict, price_per_hour: float, context: int, gpu_bytes: int | None = None,
              utilization: float = UTILIZATION, mode: str = "graph") -> list[dict]:  # fmt: skip
    """One row per format of an infer record: memory, concurrency, measured tokens/s and cost per batch."""
    if not any(decode_rates(r, mode) for r in record["formats"]):
        raise SystemExit(f"the record has no {mode} decode rates: run ptq.bench.infer with --compile, or pass "
                         f"--decode graph")  # fmt: skip
    from ptq.bench.quant import SHAPES

    gpu_bytes = gpu_bytes or record.get("gpu_memory_bytes")
    if not gpu_bytes:
        raise SystemExit("the record does not say how much memory the GPU has: pass --gpu-memory-gib")
    shape = dict(SHAPES[record["shape"]])
    if record.get("layers"):
        shape["num_hidden_layers"] = record["layers"]
    kv = kv_bytes_per_token(shape)
    bf16 = next((r for r in record["formats"] if r["format"] == "bf16"), None)
    rows = []
    for r in record["formats"]:
        if "prefill_activation_bytes" in r:
            activations = r["prefill_activation_bytes"]
        else:  # older records: the peak (of the prefill, or of the whole run) less the weights
            peak = r.get("prefill_peak_gpu_bytes", r["peak_gpu_bytes"])
            activations = max(0, peak - r["weight_bytes"])
        rates = decode_rates(r, mode)
        rows.append({
            "format": r["format"],
            "weight_gb": r["weight_bytes"] / 1e9,
            "weight_vs_bf16": r["weight_bytes"] / bf16["weight_bytes"] if bf16 else None,
            "sequences": concurrent_sequences(gpu_bytes, r["weight_bytes"], activations, kv, context, utilization),
            "tokens_per_s": rates,
            "cost_per_million": {b: cost_per_million(price_per_hour, t) for b, t in rates.items()},
        })  # fmt: skip
    return rows


def cost_table(rows: list[dict], context: int, price_per_hour: float, mode: str = "graph") -> str:
    batches = sorted({b for r in rows for b in r["tokens_per_s"]})
    head = ["format", "weights GB", "vs bf16", f"sequences of {context} tok"]
    head += [f"tok/s b{b}" for b in batches] + [f"$/1M tok b{b}" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        share = "—" if r["weight_vs_bf16"] is None else f"{100 * r['weight_vs_bf16']:.0f}%"
        cells = [r["format"], f"{r['weight_gb']:.2f}", share, str(r["sequences"])]
        cells += [f"{r['tokens_per_s'][b]:,.0f}" if b in r["tokens_per_s"] else "—" for b in batches]
        cells += [f"{r['cost_per_million'][b]:.2f}" if r["cost_per_million"].get(b) else "—" for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f"\nPrice: ${price_per_hour:.2f} per GPU-hour; cost per million output tokens at each measured batch "
        f"(decode: the {DECODE_MODES[mode]})."
    )
    return "\n".join(lines)


# Which ptq.run records measure the quality of each inference format (weights, activations as the kernels run them).
QUALITY_SCHEMES = {
    "bf16": lambda r: r["method"] == "none",
    "w8a8": lambda r: (r.get("format") or "int") == "int" and r["bits"] == 8 and r.get("act_bits") == 8
    and (r.get("act_format") or "int") == "int" and r.get("act_granularity") == "per_token",
    "fp8": lambda r: r.get("format") == "fp8_e4m3" and r.get("act_format") == "fp8_e4m3"
    and r.get("act_granularity") == "per_token",
    "w4a16": lambda r: (r.get("format") or "int") == "int" and r["bits"] == 4 and r.get("group_size") == 128
    and not r.get("act_bits"),
    # the FP4 kernels are weight-only: records that also quantize the activations measure another scheme
    "nvfp4": lambda r: r.get("format") == "nvfp4" and not r.get("act_bits"),
    "mxfp4": lambda r: r.get("format") == "mxfp4" and not r.get("act_bits"),
}  # fmt: skip


def best_quality(records: list[dict], fmt: str, metric: str = "wikitext2") -> dict | None:
    """The record with the lowest perplexity among those that run ``fmt``'s scheme (any method)."""
    match = QUALITY_SCHEMES.get(fmt)
    scored = [r for r in records if match and r.get("status") == "ok" and match(r)
              and (r.get("metrics") or {}).get("ppl", {}).get(metric) is not None]  # fmt: skip
    return min(scored, key=lambda r: r["metrics"]["ppl"][metric], default=None)


def plot_cost_vs_quality(rows: list[dict], records: list[dict], batch: int, path: Path, mode: str = "graph") -> bool:
    """Cost per million tokens at ``batch`` (x) against perplexity (y) per format; False if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for r in rows:
        quality, cost = best_quality(records, r["format"]), r["cost_per_million"].get(batch)
        if quality is not None and cost:
            points.append((cost, quality["metrics"]["ppl"]["wikitext2"], r["format"], quality["method"],
                           quality["model"]))  # fmt: skip
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for cost, ppl, fmt, method, _ in points:
        ax.scatter(cost, ppl)
        ax.annotate(f"{fmt} ({method})", (cost, ppl), textcoords="offset points", xytext=(4, 4), fontsize=8)
    models = sorted({p[4] for p in points})
    ax.set_xlabel(f"$ per million output tokens\n(decode batch {batch}, {DECODE_MODES[mode]}, measured speed)")
    ax.set_ylabel(f"WikiText-2 perplexity of {', '.join(models)}")
    ax.set_title("cost vs quality (quality measured on a different model than the speed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(record: dict, price_per_hour: float, context: int, gpu_bytes: int | None = None,
           quality: list[dict] | None = None, out: Path | None = None, mode: str = "graph") -> dict:  # fmt: skip
    rows = cost_rows(record, price_per_hour, context, gpu_bytes, mode=mode)
    text = cost_table(rows, context, price_per_hour, mode)
    print(text)
    result = {"price_per_gpu_hour": price_per_hour, "context": context, "decode": mode, "rows": rows}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "cost.md").write_text(text + "\n")
        (out / "cost.json").write_text(json.dumps(result, indent=1))
        if quality:
            batch = max(b for r in rows for b in r["tokens_per_s"])
            plot_cost_vs_quality(rows, quality, batch, out / "cost_vs_quality.png", mode)
    return result


def merge_records(records: list[dict]) -> dict:
    """One infer record from several runs of the same shape on the same GPU (e.g. a format measured in a
    later run): their formats side by side, each row as its run measured it."""
    first = records[0]
    for other in records[1:]:
        for key in ("shape", "layers", "gpu_memory_bytes"):
            if other.get(key) != first.get(key):
                raise SystemExit(f"the records differ in {key} ({first.get(key)} and {other.get(key)}): "
                                 f"price records of one shape on one GPU together")  # fmt: skip
    names = [r["format"] for record in records for r in record["formats"]]
    if len(set(names)) < len(names):
        raise SystemExit(f"a format appears in more than one record ({', '.join(names)}): pass each once")
    return {**first, "formats": [r for record in records for r in record["formats"]],
            "commands": [record.get("command") for record in records]}  # fmt: skip


def read_record(argument: str) -> dict:
    """An infer record from ``PATH`` or ``PATH:fmt,fmt`` (only those formats, in that order)."""
    path, _, wanted = argument.partition(".json:")
    path = path if not wanted else path + ".json"
    if not Path(path).is_file():
        raise SystemExit(f"no ptq.bench.infer record at {path}")
    record = json.loads(Path(path).read_text())
    if wanted:
        by_name = {r["format"]: r for r in record["formats"]}
        missing = [name for name in wanted.split(",") if name not in by_name]
        if missing:
            raise SystemExit(f"{path} has no format {', '.join(missing)} (it has {', '.join(by_name)})")
        record = {**record, "formats": [by_name[name] for name in wanted.split(",")]}
    return record


def load_records(paths: list[str]) -> list[dict]:
    files = []
    for p in map(Path, paths):
        files += sorted(p.rglob("result.json")) if p.is_dir() else [p]
    return [json.loads(f.read_text()) for f in files]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("record", nargs="+", help="ptq.bench.infer JSON records (several: of one shape and GPU); "
                   "RECORD:fmt,fmt takes only those formats of it")  # fmt: skip
    p.add_argument("--price-per-gpu-hour", type=float, required=True)
    p.add_argument("--context", type=int, default=2048, help="tokens of KV cache each sequence holds")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="when the record does not say")
    p.add_argument("--quality", nargs="*", default=[], help="ptq.run records (files or folders) for the plot")
    p.add_argument(
        "--decode",
        default="graph",
        choices=DECODE_MODES,
        help="which decode rates price the tokens (compiled: records of ptq.bench.infer --compile)",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.price_per_gpu_hour <= 0 or args.context < 1:
        raise SystemExit("--price-per-gpu-hour must be positive and --context at least 1")
    record = merge_records([read_record(argument) for argument in args.record])
    gpu = int(args.gpu_memory_gib * 2**30) if args.gpu_memory_gib else None
    report(record, args.price_per_gpu_hour, args.context, gpu, load_records(args.quality),
           Path(args.out) if args.out else None, args.decode)  # fmt: skip


if __name__ == "__main__":
    main()
