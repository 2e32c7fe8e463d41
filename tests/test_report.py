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
        "| model | method | bits | group | sym | wikitext2 ppl | ptb ppl | Δ wikitext2 ppl vs fp %"
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
