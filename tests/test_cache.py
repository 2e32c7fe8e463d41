"""The on-disk cache: keyed by everything a value depends on, atomic, and used by sweeps."""

import json

import torch

from ptq.cache import Cache, digest
from tests.conftest import require_assets
from tests.test_cli import QUICK, ptq_run


def test_a_value_is_computed_once_per_key_and_again_when_a_dependency_changes(tmp_path):
    cache = Cache(tmp_path)
    calls = []

    def compute(n):
        calls.append(n)
        return {"ids": torch.arange(n), "offsets": [1, 2]}

    first = cache.tensors("calibration", {"seed": 0, "n": 3}, lambda: compute(3))
    again = cache.tensors("calibration", {"n": 3, "seed": 0}, lambda: compute(3))  # order of keys is irrelevant
    other = cache.tensors("calibration", {"seed": 1, "n": 3}, lambda: compute(3))
    assert calls == [3, 3]
    assert torch.equal(first["ids"], again["ids"]) and again["offsets"] == [1, 2]
    assert torch.equal(other["ids"], first["ids"])
    assert len(cache.hits) == 1 and cache.hits[0].startswith("calibration/")
    deps_files = list(tmp_path.rglob("*.deps.json"))
    assert len(deps_files) == 2 and {"seed", "n"} <= set(json.loads(deps_files[0].read_text()))


def test_damaged_entries_are_recomputed_and_a_disabled_cache_writes_nothing(tmp_path):
    cache = Cache(tmp_path)
    cache.json("fp_metrics", {"a": 1}, lambda: {"ppl": 1.0})
    (entry,) = [p for p in tmp_path.rglob("*.json") if not p.name.endswith(".deps.json")]
    entry.write_text("{not json")
    assert cache.json("fp_metrics", {"a": 1}, lambda: {"ppl": 2.0}) == {"ppl": 2.0}
    off = Cache(tmp_path / "off", enabled=False)
    assert off.json("fp_metrics", {"a": 1}, lambda: {"ppl": 3.0}) == {"ppl": 3.0}
    assert not (tmp_path / "off").exists()


def test_digest_sees_tensor_contents_dtype_and_shape():
    x = torch.arange(6)
    assert digest(x) == digest(torch.arange(6))
    assert digest(x) != digest(x.reshape(2, 3))
    assert digest(x) != digest(x.to(torch.int32))
    y = x.clone()
    y[5] = 7
    assert digest(x) != digest(y)


def test_a_sweep_evaluates_full_precision_once_and_tokenizes_once(tmp_path):
    require_assets("models/stories260K", "data/wikitext-2-raw-v1/test.jsonl")
    cache_dir = tmp_path / "cache"
    proc = ptq_run(
        "-m", *QUICK, "method=none,rtn,gptq", "bits=4", f"cache.dir={cache_dir}",
        f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    records = {r["method"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/result.json"))}
    none, rtn, gptq = records["none"], records["rtn"], records["gptq"]
    kinds = {name: sorted(h.split("/")[0] for h in r["cache"]["hits"]) for name, r in records.items()}
    assert kinds == {
        "none": [],  # the first job computes everything it needs
        "rtn": ["eval_tokens", "fp_metrics"],
        "gptq": ["eval_tokens", "fp_metrics"],  # calibration windows: first use
    }
    assert rtn["baseline"]["metrics"] == none["metrics"] == gptq["baseline"]["metrics"]
    assert rtn["timings"]["baseline_eval_s"] < none["timings"]["eval_s"]
    assert str(cache_dir) == rtn["cache"]["dir"]
    # A second GPTQ run with other bits reuses the calibration windows, and gets the same ones.
    proc = ptq_run(*QUICK, "method=gptq", "bits=3", f"cache.dir={cache_dir}", f"output_dir={tmp_path}/g3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    g3 = json.loads((tmp_path / "g3" / "result.json").read_text())
    assert "calibration" in {h.split("/")[0] for h in g3["cache"]["hits"]}
    assert g3["calibration"]["offsets"] == gptq["calibration"]["offsets"]
    # Other windows, other key: nothing is looked up by name alone.
    proc = ptq_run(*QUICK, "method=none", "eval.max_windows=3", f"cache.dir={cache_dir}", f"output_dir={tmp_path}/w3",
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    w3 = json.loads((tmp_path / "w3" / "result.json").read_text())
    assert [h.split("/")[0] for h in w3["cache"]["hits"]] == ["eval_tokens"]
    assert w3["metrics"] != none["metrics"]
