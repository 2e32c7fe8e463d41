"""What every view of the run records needs: reading them, labelling and ordering runs, effective bits and
sizes, the full-precision rows and the published numbers of experiment presets."""

from __future__ import annotations

import glob
import json
from pathlib import Path

# Number formats in the order rows sort within the same bits; "int" (and records from before formats were
# recorded, which are integer) first.
FORMAT_ORDER = ["int", "fp8_e4m3", "fp8_e5m2", "mxfp8", "nvfp4", "mxfp4"]
METHOD_ORDER = ["none", "rtn", "gptq", "awq", "awq+gptq", "smoothquant", "smoothquant+gptq"]
TASK_COLUMNS = {  # metric -> column suffix, in this order; lm-eval's word perplexity is not token perplexity
    "acc": "acc",
    "acc_norm": "acc_norm",
    "perplexity": "ppl (lm-eval)",
    "word_perplexity": "word ppl (lm-eval)",
}


def find_records(patterns: list[str]) -> list[dict]:
    paths: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            paths += sorted(p.rglob("result.json")) + sorted(p.rglob("error.json"))
        else:
            paths += [Path(x) for x in sorted(glob.glob(pattern))]
    return [json.loads(p.read_text()) | {"_path": str(p)} for p in paths]


def weight_format(r: dict) -> str | None:
    """The weights' number format; None for full precision. Records from before formats were recorded
    are integer."""
    if r["method"] == "none":
        return None
    return r.get("format") or "int"


def act_format(r: dict) -> str | None:
    """The activations' number format; None when activations are not quantized."""
    if not r.get("act_bits"):
        return None
    return r.get("act_format") or "int"


def format_name(r: dict) -> str:
    """The number formats as labels name them: empty for integer weights and activations, else the
    weights' format, followed by the activations' after a slash when they differ (nvfp4/fp8_e4m3)."""
    weights, acts = weight_format(r) or "int", act_format(r)
    if acts is None or acts == weights:
        return "" if weights == "int" else weights
    return f"{weights}/{acts}"


def bits_label(r: dict):
    """The table's bits column: the bits for integer weights, the format for other weights (nvfp4), and
    with quantized activations both widths and the granularity (w8a8 per-token, nvfp4 w4a4 per-block)."""
    formats = format_name(r)
    if r.get("act_bits"):
        widths = f"w{r['bits']}a{r['act_bits']}{kv_suffix(r)} {r['act_granularity'].replace('_', '-')}"
        return f"{formats} {widths}" if formats else widths
    if r.get("kv_bits"):
        return f"{formats or 'w' + str(r.get('bits'))}{kv_suffix(r)}"
    return formats or r.get("bits")


def kv_suffix(r: dict) -> str:
    """kv4 for a 4-bit integer KV cache, kv-fp8_e4m3 for others; empty when the KV cache is not quantized."""
    if not r.get("kv_bits"):
        return ""
    return f"kv{r['kv_bits']}" if (r.get("kv_format") or "int") == "int" else f"kv-{r['kv_format']}"


def aqlm_codebooks(r: dict) -> str | None:
    """AQLM's configuration as the paper names it (2x8 g8: two codebooks of 2^8 vectors of 8 weights), from the
    record's options or, where they are null, from its bits; None for other methods."""
    if "aqlm" not in (r.get("method") or "").split("+"):
        return None
    from ptq.methods.aqlm import nominal_codebooks

    options = ((r.get("config") or {}).get("method_options") or {}).get("aqlm") or {}
    group = options.get("group", 8)
    books, bits = options.get("codebooks"), options.get("codebook_bits")
    if books is None or bits is None:
        books, bits = nominal_codebooks(r["bits"], group)
    tuned = options.get("finetune_epochs") or 0
    return f"{books}x{bits} g{group}" + (f" ft{tuned}" if tuned else "")


def group_label(r: dict):
    if aqlm_codebooks(r):  # AQLM's groups are its codebooks' vectors (method_label names them)
        return "-"
    group = r.get("group_size")
    return "-" if group is None else "channel" if group == -1 else "tensor" if group == 0 else group


def method_label(r: dict) -> str:
    method = r.get("method")
    if aqlm_codebooks(r):
        method += f" {aqlm_codebooks(r)}"
    options = (r.get("config") or {}).get("method_options") or {}
    spqr = options.get("spqr")
    if spqr:  # the outlier threshold decides how many weights stay in 16 bits
        method += f" τ={spqr.get('outlier_threshold')}"
    smooth = options.get("smoothquant")
    if smooth:  # the migration strength is what distinguishes SmoothQuant runs
        method += f" α={smooth['alpha']}" + (f" ({smooth['scope']})" if smooth.get("scope", "norms") != "norms" else "")
    gptq = options.get("gptq")
    if gptq and gptq.get("act_order") is False:  # the reference's column order (ptq's default before formats)
        method += " (ref. order)"
    elif gptq and gptq.get("static_groups") is False:  # act-order with g_idx permuted
        method += " (act-order, dynamic groups)"
    return method


def label(r: dict) -> tuple:
    """(model, method, bits, group, sym) as the table shows them."""
    sym = "-" if r.get("sym") is None or aqlm_codebooks(r) else ("sym" if r["sym"] else "asym")
    return r.get("model"), method_label(r), bits_label(r), group_label(r), sym


def _format_rank(name: str | None) -> int:
    name = name or "int"
    return FORMAT_ORDER.index(name) if name in FORMAT_ORDER else len(FORMAT_ORDER)


def sort_key(r: dict) -> tuple:
    rank = METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else len(METHOD_ORDER)
    return (
        r["model"],
        -(r["bits"] or 0),
        _format_rank(weight_format(r)),
        -(r.get("act_bits") or 16),
        _format_rank(act_format(r)),
        str(group_label(r)),
        str(bits_label(r)),
        rank,
        method_label(r),
    )


def metric_columns(all_metrics: list[dict]) -> list[tuple[str, tuple[str, ...]]]:
    """(header, path into a record's metrics) for every number found in any of ``all_metrics``:
    GPTQ-protocol perplexities first, then each lm-eval task's scores."""
    cols: dict[tuple[str, ...], str] = {}
    for metrics in all_metrics:
        for name in metrics.get("ppl", {}):
            cols.setdefault(("ppl", name), f"{name} ppl")
    for metrics in all_metrics:
        for task, scores in (metrics.get("tasks") or {}).items():
            for metric, column in TASK_COLUMNS.items():
                if scores.get(metric) is not None:
                    cols.setdefault(("tasks", task, metric), f"{task} {column}")
    return [(header, path) for path, header in cols.items()]


def metric_value(metrics: dict, path: tuple[str, ...]):
    for key in path:
        metrics = (metrics or {}).get(key)
    return metrics


def storage(r: dict) -> dict:
    return ((r.get("quantization") or {}).get("storage")) or {}


def bits_per_weight(r: dict) -> float | None:
    """Effective bits per weight of the quantized linears as stored (scales, zero points, g_idx
    included); 16 for full precision. None for records from before ptq recorded storage."""
    if r["method"] == "none":
        return 16.0
    return storage(r).get("bits_per_weight")


def model_mib(r: dict) -> float | None:
    b = storage(r).get("model_bytes")
    return b / 2**20 if b else None


def windows(r: dict) -> tuple:
    """What a perplexity was measured on: window length and the number of windows per data set."""
    ev = r.get("eval") or {}
    return ev.get("seqlen"), {name: info.get("windows") for name, info in (ev.get("ppl") or {}).items()}


def full_precision_ppl(r: dict, ok: list[dict]) -> dict:
    """The full-precision perplexities to compare ``r`` with: its own baseline, else a method=none record
    of the same model scored on the same windows."""
    base = ((r.get("baseline") or {}).get("metrics") or {}).get("ppl")
    if base:
        return base
    for other in ok:
        if other["method"] == "none" and other["model"] == r["model"] and windows(other) == windows(r):
            return other["metrics"].get("ppl", {})
    return {}


def _full_precision_rows(ok: list[dict]) -> list[dict]:
    """A full-precision row for each (model, windows) that only appears as other runs' baselines."""
    have = {(r["model"], json.dumps(windows(r))) for r in ok if r["method"] == "none"}
    rows = []
    for r in ok:
        key = (r["model"], json.dumps(windows(r)))
        base = (r.get("baseline") or {}).get("metrics")
        if r["method"] == "none" or not base or key in have:
            continue
        have.add(key)
        st = storage(r)
        params = (st.get("linear_weights") or 0) + (st.get("other_params") or 0)
        fp_storage = {"model_bytes": 2 * params} if params else {}
        rows.append(
            {
                "status": "ok", "model": r["model"], "method": "none", "bits": 16, "group_size": None,
                "sym": None, "format": None, "act_format": None, "metrics": base, "eval": r.get("eval"),
                "env": r.get("env"), "timings": {}, "memory": {},
                "config": {"experiment": (r.get("config") or {}).get("experiment")},
                "quantization": {"storage": fp_storage}, "_path": f"baseline of {r.get('_path')}",
            }
        )  # fmt: skip
    return rows


def successful_with_full_precision(records: list[dict]) -> list[dict]:
    """The successful records, sorted, plus a full-precision row taken from the baselines where no
    method=none run exists for that model and those evaluation windows; identical method=none records
    appear once."""
    ok, seen = [], set()
    for r in records:
        if r.get("status") != "ok":
            continue
        if r["method"] == "none":  # a sweep's method=none jobs differ only in settings they ignore (bits=3,4)
            key = (r["model"], json.dumps(windows(r)), json.dumps(r.get("metrics"), sort_keys=True))
            if key in seen:
                continue
            seen.add(key)
        ok.append(r)
    return sorted(ok + _full_precision_rows(ok), key=sort_key)


def published_key(r: dict) -> str:
    """How experiment presets name a configuration: fp16; <method>-w<bits>[a<act_bits>] for integer
    formats; <method>-<format> for other formats, with -w<bits>a<act_bits> added when activations are
    quantized (rtn-nvfp4, rtn-nvfp4-w4a4, rtn-nvfp4/fp8_e4m3-w4a8)."""
    if r["method"] == "none":
        return "fp16"
    formats = format_name(r)
    if not formats:
        return f"{r['method']}-w{r['bits']}" + (f"a{r['act_bits']}" if r.get("act_bits") else "") + kv_suffix(r)
    widths = f"-w{r['bits']}a{r['act_bits']}" if r.get("act_bits") else ""
    return f"{r['method']}-{formats}{widths}{kv_suffix(r)}"


def published_value(r: dict) -> tuple[str, float] | None:
    """(metric path, published number) for a record run under an experiment preset that has one."""
    exp = (r.get("config") or {}).get("experiment") or {}
    value = ((exp.get("published") or {}).get(r["model"]) or {}).get(published_key(r))
    return (exp["metric"], value) if value is not None else None
