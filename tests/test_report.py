"""Reports from fixture records: missing metrics, failed runs, differences to full precision."""

import ast
import csv
import json
import subprocess
import sys
from pathlib import Path

from ptq.report import console_table, find_records, main, markdown_table, write_csv

RESULTS = Path(__file__).resolve().parents[1] / "results"

EVAL = {"seqlen": 2048, "max_windows": 24, "ppl": {"wikitext2": {"windows": 24, "source": "a"}, "ptb": {"windows": 24}}}


def record(method, bits, ppl, baseline=None, **extra):
    return {
        "status": "ok",
        "model": "m",
        "method": method,
        "bits": bits,
        "group_size": None if method == "none" else 128,
        "sym": None if method == "none" else False,
        "metrics": {"ppl": ppl},
        "baseline": {"metrics": {"ppl": baseline}} if baseline else None,
        "timings": {"quantize_s": 1.5},
        "memory": {"peak_rss_bytes": 2**30, "peak_gpu_bytes": None},
        "eval": EVAL,
        "env": {"device": "cpu", "cpu_threads": 2},
        "config": {"method_options": {}},
        **extra,
    }


def write_fixtures(root):
    runs = {
        "fp": record("none", 16, {"wikitext2": 20.0, "ptb": 30.0}),
        "rtn": record("rtn", 4, {"wikitext2": 25.0, "ptb": 33.0}, baseline={"wikitext2": 20.0, "ptb": 30.0}),
        "gptq": record("gptq", 4, {"wikitext2": 22.0}),  # no ptb, no baseline: compared with the fp run
    }
    for name, r in runs.items():
        (root / name).mkdir()
        (root / name / "result.json").write_text(json.dumps(r))
    (root / "bad").mkdir()
    (root / "bad" / "error.json").write_text(json.dumps({"status": "failed", "error": "ConfigError: bits=1"}))


def test_markdown_lists_every_run_with_differences_and_failures(tmp_path):
    write_fixtures(tmp_path)
    text = markdown_table(find_records([str(tmp_path)]))
    lines = text.splitlines()
    assert lines[0].startswith(
        "| model | method | bits | group | sym | bits/weight | size MiB | wikitext2 ppl | ptb ppl "
        "| Δ wikitext2 ppl vs fp %"
    )
    body = lines[2:]
    assert [line.split(" | ")[1] for line in body[:3]] == ["none", "rtn", "gptq"]
    assert "| 25.00 | 33.00 | +25.0% | +10.0% |" in body[1]
    assert "| 22.00 | — | +10.0% | — |" in body[2]  # missing ptb stays visible as missing
    assert body[3].startswith("| failed: ConfigError: bits=1")


def test_csv_has_raw_numbers_and_failed_rows(tmp_path):
    write_fixtures(tmp_path)
    main([str(tmp_path), "--out", str(tmp_path / "out")])
    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    gptq = rows[2]
    assert gptq["method"] == "gptq" and gptq["ptb ppl"] == "" and float(gptq["wikitext2 ppl"]) == 22.0
    assert abs(float(gptq["Δ wikitext2 ppl vs fp %"]) - 10.0) < 1e-9
    assert "bits=1" in rows[3]["error"]
    assert (tmp_path / "out" / "report.md").read_text().count("\n") == 6


def quantized(method, bits, ppl, fp_ppl, bits_per_weight, model="opt-125m", experiment=None):
    r = record(method, bits, {"wikitext2": ppl}, baseline={"wikitext2": fp_ppl}, model=model)
    r["quantization"] = {
        "storage": {
            "bits_per_weight": bits_per_weight,
            "model_bytes": int(bits_per_weight * 1000 / 8 + 2000),
            "linear_weights": 1000,
            "other_params": 1000,
        }
    }
    r["config"]["experiment"] = experiment
    return r


GPTQ_TABLE = {
    "name": "gptq-opt",
    "metric": "ppl.wikitext2",
    "published": {"opt-125m": {"fp16": 27.65, "gptq-w4": 31.12}},
}


def test_baselines_become_one_full_precision_row_and_published_numbers_are_compared():
    records = [
        quantized("gptq", 4, 31.5, 27.7, 4.16, experiment=GPTQ_TABLE),
        quantized("rtn", 4, 37.0, 27.7, 4.16, experiment=GPTQ_TABLE),  # nothing published for it here
        quantized("rtn", 3, 900.0, 27.7, 3.16, experiment=GPTQ_TABLE),
    ]
    from ptq.report.table import table_rows

    header, rows, failed = table_rows(records)
    col = {h: i for i, h in enumerate(header)}
    assert [r[col["method"]] for r in rows] == ["none", "rtn", "gptq", "rtn"]  # one fp row, from the baselines
    fp, rtn4, gptq4 = rows[0], rows[1], rows[2]
    assert fp[col["wikitext2 ppl"]] == 27.7 and fp[col["bits/weight"]] == 16.0
    assert fp[col["size MiB"]] * 2**20 == 2 * 2000  # every parameter in 16 bits
    assert fp[col["published"]] == 27.65
    assert abs(fp[col["Δ vs published %"]] - 100 * (27.7 / 27.65 - 1)) < 1e-9
    assert gptq4[col["published"]] == 31.12 and abs(gptq4[col["Δ vs published %"]] - 100 * (31.5 / 31.12 - 1)) < 1e-9
    assert rtn4[col["published"]] is None and rtn4[col["Δ vs published %"]] is None
    assert gptq4[col["bits/weight"]] == 4.16 and not failed


def test_plots_are_written_with_labeled_axes(tmp_path):
    from ptq.report import write_plots

    records = [
        quantized(m, b, ppl, 27.7, bpw)
        for m, b, ppl, bpw in [
            ("rtn", 4, 37.0, 4.16),
            ("rtn", 3, 900.0, 3.16),
            ("gptq", 4, 31.5, 4.16),
            ("gptq", 3, 50.0, 3.16),
        ]
    ]
    records[0]["metrics"]["tasks"] = {"piqa": {"acc": 0.6}}
    records[2]["metrics"]["tasks"] = {"piqa": {"acc": 0.62}}
    records.append({"status": "failed", "error": "x", "_path": "p"})
    paths = write_plots(records, tmp_path)
    assert sorted(p.name for p in paths) == ["quality_vs_bits.png", "quality_vs_memory.png", "tasks_vs_bits.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_plot_labels_and_legend():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ptq.report.plots import BITS, _panel

    records = [quantized("rtn", 4, 37.0, 27.7, 4.16), quantized("gptq", 4, 31.5, 27.7, 4.16)]
    from ptq.report.records import successful_with_full_precision

    fig, ax = plt.subplots()
    assert _panel(
        ax, successful_with_full_precision(records), ("ppl", "wikitext2"), lambda r: 4.16, BITS, "ppl", "t", True
    )
    assert ax.get_xlabel() == BITS and ax.get_ylabel() == "ppl"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["gptq g128", "rtn g128", "full precision (27.7)"]
    plt.close(fig)


def float_record(fmt, bits, group_size, act_format=None, act_bits=None, act_granularity=None, method="rtn"):
    r = quantized(method, bits, 30.0, 27.7, bits + 0.5)
    r |= {"format": fmt, "act_format": act_format, "act_bits": act_bits, "act_granularity": act_granularity}
    r |= {"group_size": group_size, "sym": True, "eval": {"seqlen": 2048, "ppl": {"wikitext2": {"windows": 24}}}}
    r["timings"] |= {"eval_s": 2.0, "total_s": 4.0}
    return r


def test_number_formats_are_named_in_every_table(tmp_path):
    records = [
        float_record("nvfp4", 4, 16, "nvfp4", 4, "per_block"),
        float_record("nvfp4", 4, 16),
        float_record("fp8_e4m3", 8, -1, "fp8_e4m3", 8, "per_token"),
        float_record("int", 4, 0, "fp8_e4m3", 8, "per_token"),
    ]
    lines = markdown_table(records).splitlines()[2:]
    assert [line.split(" | ")[2:4] for line in lines] == [
        ["16", "-"],
        ["fp8_e4m3 w8a8 per-token", "channel"],
        ["int/fp8_e4m3 w4a8 per-token", "tensor"],
        ["nvfp4", "16"],
        ["nvfp4 w4a4 per-block", "16"],
    ]
    write_csv(records, tmp_path / "report.csv")
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert [r["bits"] for r in rows] == [
        "16",
        "fp8_e4m3 w8a8 per-token",
        "int/fp8_e4m3 w4a8 per-token",
        "nvfp4",
        "nvfp4 w4a4 per-block",
    ]
    assert [r["group"] for r in rows] == ["-", "channel", "tensor", "16", "16"]
    assert console_table(records[0]).splitlines()[2].startswith("rtn nvfp4 w4a4 (per_block) g16 sym ")
    assert console_table(records[1]).splitlines()[2].startswith("rtn nvfp4 g16 sym ")
    assert console_table(records[2]).splitlines()[2].startswith("rtn fp8_e4m3 w8a8 (per_token) per-channel sym ")


def test_float_formats_sort_after_int_at_the_same_bits_and_have_their_own_published_key():
    from ptq.report.records import published_key, successful_with_full_precision

    records = [
        float_record("mxfp4", 4, 32),
        float_record("nvfp4", 4, 16),
        float_record("int", 4, 128),
        float_record("int", 3, 128),
        float_record("fp8_e4m3", 8, -1),
    ]
    ordered = successful_with_full_precision(records)
    assert [(r["bits"], r.get("format")) for r in ordered] == [
        (16, None), (8, "fp8_e4m3"), (4, "int"), (4, "nvfp4"), (4, "mxfp4"), (3, "int")
    ]  # fmt: skip
    assert [published_key(r) for r in ordered] == [
        "fp16", "rtn-fp8_e4m3", "rtn-w4", "rtn-nvfp4", "rtn-mxfp4", "rtn-w3"
    ]  # fmt: skip
    assert published_key(float_record("nvfp4", 4, 16, "nvfp4", 4, "per_block")) == "rtn-nvfp4-w4a4"
    assert published_key(record("smoothquant", 8, {}, act_bits=8, act_granularity="per_token")) == "smoothquant-w8a8"


OLD_RTN_W4 = RESULTS / "offline" / "6_smollm2-135m-instruct_rtn_w4_g128_False" / "result.json"
OLD_RTN_W8A8 = RESULTS / "smollm2-135m-instruct-w8a8" / "rtn_w8a8_per_token" / "result.json"
HEADER = (
    "| model | method | bits | group | sym | bits/weight | size MiB | wikitext2 ppl | Δ wikitext2 ppl vs fp % "
    "| quantize s | device | peak RSS GiB | peak GPU GiB |"
)
CSV_HEADER = (
    "model,method,bits,group,sym,bits/weight,size MiB,wikitext2 ppl,Δ wikitext2 ppl vs fp %,quantize s,device,"
    "peak RSS GiB,peak GPU GiB,status,error"
)


def test_records_without_number_formats_render_as_before(tmp_path):
    """Expected texts: the output of ptq.report and ptq.run.format_table before number formats existed."""
    old = find_records([str(OLD_RTN_W4)])
    assert "format" not in old[0] and "act_format" not in old[0]
    assert markdown_table(old).splitlines() == [
        HEADER,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| smollm2-135m-instruct | none | 16 | - | - | 16.00 | 256.6 | 20.71 | +0.0% | — | CPU ×2 | — | — |",
        "| smollm2-135m-instruct | rtn | 4 | 128 | asym | 4.21 | 107.4 | 27.78 | +34.1% | 4.7 | CPU ×2 | 2.37 | — |",
    ]
    write_csv(old, tmp_path / "report.csv")
    assert (tmp_path / "report.csv").read_text().splitlines() == [
        CSV_HEADER,
        "smollm2-135m-instruct,none,16,-,-,16.0,256.5670166015625,20.710734393826744,0.0,,CPU ×2,,,ok,",
        "smollm2-135m-instruct,rtn,4,128,asym,4.214409722222222,107.4056396484375,27.783175635121992,"
        "34.14867433867208,4.746326242002397,CPU ×2,2.3743438720703125,,ok,",
    ]
    assert console_table(old[0]).splitlines() == [
        "                             wikitext2 ppl",
        "full precision                      20.711",
        "rtn w4 g128 asym                    27.783",
        "ppl: GPTQ-protocol token perplexity (2048-token windows); quantize 4.7 s, eval 104.0 s, total 246.3 s; "
        "peak RSS 2.37 GiB",
    ]

    old = find_records([str(OLD_RTN_W8A8)])
    assert "format" not in old[0] and old[0]["act_bits"] == 8
    assert markdown_table(old).splitlines()[2] == (
        "| smollm2-135m-instruct | rtn | w8a8 per-token | channel | sym | — | — | 21.79 | — | 0.2 | CPU ×2 | 2.35 | — |"
    )
    assert console_table(old[0]).splitlines()[1] == "rtn w8a8 (per_token) per-channel sym        21.789"


def imported_report_modules(module: str) -> set[str]:
    """The ptq.report modules that ``module``'s source imports anywhere (inside functions too); "ptq.report"
    itself when it imports from the package, whose __init__ imports every module."""
    source = Path(__file__).resolve().parents[1] / "ptq" / "report" / f"{module}.py"
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom):  # relative: from . import x, from .x import y
            names |= {f"ptq.report.{node.module or alias.name}" for alias in node.names}
    return {name for name in names if name == "ptq.report" or name.startswith("ptq.report.")}


def test_report_modules_import_no_cycle():
    assert imported_report_modules("records") == set()
    for view in ("plots", "table", "console"):
        assert imported_report_modules(view) == {"ptq.report.records"}, view
    assert imported_report_modules("cli") == {
        "ptq.report.hurts", "ptq.report.plots", "ptq.report.records", "ptq.report.table"
    }  # fmt: skip
    assert imported_report_modules("hurts") == {"ptq.report.console", "ptq.report.plots"}
    for module in ("ptq.report.plots", "ptq.report.table", "ptq.report"):  # each imports first in a fresh process
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)


def test_plot_legend_has_a_line_per_number_format():
    from ptq.report.plots import line_name

    assert line_name(quantized("rtn", 4, 37.0, 27.7, 4.16)) == "rtn g128"
    assert line_name(record("rtn", 8, {}, act_bits=8, act_granularity="per_token") | {"group_size": -1}) == (
        "rtn per-channel per-token"
    )
    assert line_name(float_record("nvfp4", 4, 16)) == "rtn nvfp4 g16"
    assert line_name(float_record("nvfp4", 4, 16, "nvfp4", 4, "per_block")) == "rtn nvfp4 g16 per-block"
    assert line_name(float_record("int", 4, 0, "fp8_e4m3", 8, "per_token")) == "rtn int/fp8_e4m3 per-tensor per-token"


def test_gptq_rows_name_a_non_default_column_order():
    from ptq.report.records import method_label

    def record(**gptq):
        return {"method": "gptq", "config": {"method_options": {"gptq": gptq}}}

    assert method_label(record(act_order=True, static_groups=True)) == "gptq"
    assert method_label(record(act_order=False, static_groups=False)) == "gptq (ref. order)"
    assert method_label(record(act_order=True, static_groups=False)) == "gptq (act-order, dynamic groups)"


def test_a_sweeps_identical_full_precision_runs_are_one_row():
    from ptq.report.records import successful_with_full_precision

    fp = {"wikitext2": 20.0}
    records = [record("none", 16, fp), record("none", 16, fp), record("none", 16, {"wikitext2": 21.0}),
               record("rtn", 4, {"wikitext2": 25.0})]  # fmt: skip
    ordered = successful_with_full_precision(records)
    assert [(r["method"], r["metrics"]["ppl"]["wikitext2"]) for r in ordered].count(("none", 20.0)) == 1
    assert len(ordered) == 3  # a full-precision run with other scores is not a duplicate
