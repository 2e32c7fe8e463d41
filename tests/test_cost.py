"""The cost report (ptq/bench/cost.py): memory, concurrency and price per million tokens from a bench record."""

from __future__ import annotations

import json

import pytest

from ptq.bench import cost
from ptq.bench.quant import SHAPES

GIB = 2**30


def infer_record() -> dict:
    """A ptq.bench.infer record as the GPU run writes it (two formats, decode at batch 1 and 16)."""

    def fmt(name, weight_gb, peak_gb, b1, b16):
        return {"format": name, "weight_bytes": int(weight_gb * 1e9), "prefill_peak_gpu_bytes": int(peak_gb * 1e9),
                "peak_gpu_bytes": int(peak_gb * 1e9) + 10**9, "decode_b1_tokens_per_s": b1,
                "decode_b1_eager_tokens_per_s": b1 / 3, "decode_b16_tokens_per_s": b16}  # fmt: skip

    return {"shape": "llama-3-8b", "layers": None, "gpu_memory_bytes": 80 * GIB,
            "formats": [fmt("bf16", 16.0, 17.0, 130.0, 1500.0), fmt("w4a16", 5.8, 6.8, 180.0, 1100.0)]}  # fmt: skip


def test_kv_cache_bytes_per_token_of_llama3_8b():
    # K and V, 32 layers, 8 KV heads of 128, bf16
    assert cost.kv_bytes_per_token(SHAPES["llama-3-8b"]) == 2 * 32 * 8 * 128 * 2


def test_concurrency_and_price_arithmetic():
    kv = 2 * 32 * 8 * 128 * 2
    free = 0.9 * 80 * GIB - 16e9 - 1e9
    assert cost.concurrent_sequences(80 * GIB, int(16e9), int(1e9), kv, 2048) == int(free // (kv * 2048))
    assert cost.concurrent_sequences(10 * GIB, int(16e9), 0, kv, 2048) == 0  # the weights alone do not fit
    assert cost.cost_per_million(3.6, 1000.0) == pytest.approx(1.0)  # $3.60/h at 1000 tok/s: $1 per million
    assert cost.cost_per_million(3.6, None) is None


def test_rows_compare_formats_and_smaller_weights_fit_more_sequences():
    rows = {r["format"]: r for r in cost.cost_rows(infer_record(), 3.5, 2048)}
    assert rows["w4a16"]["weight_vs_bf16"] == pytest.approx(5.8 / 16.0)
    assert rows["w4a16"]["sequences"] > rows["bf16"]["sequences"] > 0
    assert rows["bf16"]["tokens_per_s"] == {1: 130.0, 16: 1500.0}  # CUDA-graph rates, not the eager ones
    assert rows["w4a16"]["cost_per_million"][1] < rows["bf16"]["cost_per_million"][1]
    assert rows["w4a16"]["cost_per_million"][16] > rows["bf16"]["cost_per_million"][16]
    table = cost.cost_table(list(rows.values()), 2048, 3.5)
    assert "| w4a16 | 5.80 | 36% |" in table and "$3.50 per GPU-hour" in table


def test_command_line_writes_table_json_and_plot(tmp_path):
    record = tmp_path / "infer.json"
    record.write_text(json.dumps(infer_record()))
    runs = tmp_path / "runs"
    for name, extra, ppl in (("fp", {"method": "none", "bits": 16}, 21.2),
                             ("w4", {"method": "gptq", "bits": 4, "group_size": 128}, 25.3),
                             ("w4rtn", {"method": "rtn", "bits": 4, "group_size": 128}, 28.6)):  # fmt: skip
        (runs / name).mkdir(parents=True)
        record_of_run = {
            "status": "ok",
            "model": "smollm2-135m-instruct",
            **extra,
            "metrics": {"ppl": {"wikitext2": ppl}},
        }
        (runs / name / "result.json").write_text(json.dumps(record_of_run))
    cost.main([str(record), "--price-per-gpu-hour", "2.0", "--quality", str(runs), "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "cost.json").read_text())
    assert saved["price_per_gpu_hour"] == 2.0 and len(saved["rows"]) == 2
    assert (tmp_path / "out" / "cost_vs_quality.png").stat().st_size > 0
    records = cost.load_records([str(runs)])
    assert cost.best_quality(records, "w4a16")["method"] == "gptq"  # the best record of the format's scheme


def test_formats_of_several_records_are_priced_together_once_each(tmp_path):
    """RECORD:fmt,fmt takes only those formats of a record, so that the latest run of each format can share one table;
    a format asked of a record that lacks it, or given twice, is one sentence."""
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps(infer_record()))
    later = infer_record()
    for row in later["formats"]:
        row["decode_b1_tokens_per_s"] *= 2
    second.write_text(json.dumps(later))
    names = [r["format"] for r in infer_record()["formats"]]
    out = tmp_path / "out"
    cost.main([f"{first}:{names[0]}", f"{second}:{names[1]}", "--price-per-gpu-hour", "2.0", "--out", str(out)])
    rows = json.loads((out / "cost.json").read_text())["rows"]
    assert [r["format"] for r in rows] == names[:2]
    want = {names[0]: infer_record()["formats"][0], names[1]: later["formats"][1]}
    for row in rows:
        assert row["tokens_per_s"]["1"] == want[row["format"]]["decode_b1_tokens_per_s"]
    with pytest.raises(SystemExit, match="has no format"):
        cost.main([f"{first}:fp16", "--price-per-gpu-hour", "2.0"])
    with pytest.raises(SystemExit, match="more than one record"):
        cost.main([f"{first}:{names[0]}", f"{second}:{names[0]}", "--price-per-gpu-hour", "2.0"])


def test_fp4_formats_take_weight_only_records_for_their_quality():
    """NVFP4 and MXFP4 run weight-only kernels, so their plot points are the weight-only records of their format, not
    those that round the activations to FP4 as well, nor another format's."""
    base = {"status": "ok", "model": "m", "bits": 4, "group_size": 16}
    records = [{**base, "method": "rtn", "format": "nvfp4", "metrics": {"ppl": {"wikitext2": 26.9}}},
               {**base, "method": "gptq", "format": "nvfp4", "act_bits": 4, "act_format": "nvfp4",
                "metrics": {"ppl": {"wikitext2": 20.0}}},
               {**base, "method": "gptq", "format": "mxfp4", "metrics": {"ppl": {"wikitext2": 25.0}}}]  # fmt: skip
    assert cost.best_quality(records, "nvfp4")["metrics"]["ppl"]["wikitext2"] == 26.9
    assert cost.best_quality(records, "mxfp4")["method"] == "gptq"


def test_missing_gpu_memory_is_a_clear_error():
    record = infer_record()
    del record["gpu_memory_bytes"]
    with pytest.raises(SystemExit, match="--gpu-memory-gib"):
        cost.cost_rows(record, 3.5, 2048)


def test_the_prefills_own_memory_counts_not_what_was_allocated_before_it():
    """Records that measured the prefill's own activation bytes use them; leftovers of an earlier format in
    the same process (counted in the peak) do not shrink the KV cache."""
    record = infer_record()
    clean = {r["format"]: r["sequences"] for r in cost.cost_rows(record, 3.5, 2048)}
    for r in record["formats"]:
        r["prefill_activation_bytes"] = r["prefill_peak_gpu_bytes"] - r["weight_bytes"]
        r["prefill_peak_gpu_bytes"] += 10 * 10**9  # ten GB left by an earlier format
    assert {r["format"]: r["sequences"] for r in cost.cost_rows(record, 3.5, 2048)} == clean


def test_compiled_decode_rates_price_the_tokens_only_when_asked():
    """A record of ptq.bench.infer --compile holds both rates per batch; the report reads one mode, and asking
    for compiled rates a record does not have is one sentence, not a crash."""
    record = infer_record()
    for row, speedup in zip(record["formats"], (1.4, 1.6), strict=True):
        row["decode_b1_compiled_tokens_per_s"] = row["decode_b1_tokens_per_s"] * speedup
    graph = cost.cost_rows(record, 3.5, 2048)
    assert [r["tokens_per_s"] for r in graph] == [{1: 130.0, 16: 1500.0}, {1: 180.0, 16: 1100.0}]
    compiled = cost.cost_rows(record, 3.5, 2048, mode="compiled")
    assert [r["tokens_per_s"] for r in compiled] == [{1: 130.0 * 1.4}, {1: 180.0 * 1.6}]
    assert compiled[1]["cost_per_million"][1] == pytest.approx(3.5 / 3600 / (180.0 * 1.6) * 1e6)
    with pytest.raises(SystemExit, match="no compiled decode rates"):
        cost.cost_rows(infer_record(), 3.5, 2048, mode="compiled")


def test_records_of_separate_runs_are_priced_together_when_shape_and_gpu_agree(tmp_path):
    first, later = infer_record(), infer_record()
    later["formats"] = [dict(later["formats"][1], format="nvfp4")]
    paths = []
    for name, record in (("a.json", first), ("b.json", later)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(record))
    cost.main([str(p) for p in paths] + ["--price-per-gpu-hour", "2.0", "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "cost.json").read_text())
    assert [r["format"] for r in saved["rows"]] == ["bf16", "w4a16", "nvfp4"]
    assert saved["rows"][2]["weight_vs_bf16"] == pytest.approx(5.8 / 16.0)  # against the first run's bf16
    later["gpu_memory_bytes"] = 141 * GIB
    with pytest.raises(SystemExit, match="gpu_memory_bytes"):
        cost.merge_records([first, later])
    with pytest.raises(SystemExit, match="more than one record"):
        cost.merge_records([first, first])
