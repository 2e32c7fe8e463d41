"""Reports from fixture records: missing metrics, failed runs, differences to full precision."""

import csv
import json

from ptq.report import find_records, main, markdown_table

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
    from ptq.report import table

    header, rows, failed = table(records)
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
    from ptq.plots import write_plots

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

    from ptq.plots import BITS, _panel

    records = [quantized("rtn", 4, 37.0, 27.7, 4.16), quantized("gptq", 4, 31.5, 27.7, 4.16)]
    from ptq.report import successful_with_full_precision

    fig, ax = plt.subplots()
    assert _panel(
        ax, successful_with_full_precision(records), ("ppl", "wikitext2"), lambda r: 4.16, BITS, "ppl", "t", True
    )
    assert ax.get_xlabel() == BITS and ax.get_ylabel() == "ppl"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["gptq g128", "rtn g128", "full precision (27.7)"]
    plt.close(fig)
