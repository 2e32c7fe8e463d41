"""Data-parallel calibration: two gloo processes on the CPU give the one-process result (ptq/methods/stats.py)."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model

import ptq
from ptq.methods.stats import add_gram, all_gather_shares, gather_rows, reduce_named, row_share, shard_windows

CASES = {
    "rtn": dict(method="rtn", bits=4, group_size=16),
    "gptq": dict(method="gptq", bits=4, group_size=16),
    # one forward for every group's Hessian: the groups' solves are dealt out to the ranks and broadcast
    "gptq_spread": dict(method="gptq", bits=3, group_size=16, options={"gptq": {"true_sequential": False}}),
    "awq": dict(method="awq", bits=3, group_size=16),
    # dealt-out SpQR solves: the outliers travel with the codes
    "spqr_spread": dict(method="spqr", bits=3, group_size=16, options={"spqr": {"true_sequential": False}}),
    # dealt-out AQLM solves: codes, each linear's codebooks and scales travel
    "aqlm_spread": dict(
        method="aqlm",
        bits=2,
        options={"aqlm": {"true_sequential": False, "codebooks": 1, "codebook_bits": 4, "rounds": 1}},
    ),  # fmt: skip
    "smoothquant": dict(
        method="smoothquant", bits=8, group_size=-1, sym=True, act_bits=8, act_granularity="per_tensor"
    ),
}


def calibration() -> torch.Tensor:
    return torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(1))


def evaluation() -> torch.Tensor:
    return torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(2))


def perplexity(model) -> float:
    ids = evaluation()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    return math.exp(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item())


def quantize_cases() -> dict:
    results = {}
    for name, settings in CASES.items():
        model = tiny_model("llama")
        report = ptq.quantize(model, calib=calibration(), device="cpu", batch_size=2, **settings)
        results[name] = {
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "layers": [block["layers"] for block in report["blocks"]],
            "ppl": perplexity(model),
            "world_size": report["world_size"],
        }
    return results


def seam_checks() -> dict:
    """This rank's share of 64 token rows through the statistics seam."""
    rank, x = dist.get_rank(), torch.randn(64, 24, generator=torch.Generator().manual_seed(3))
    mine = x[rank * 32 : (rank + 1) * 32]
    gram = torch.zeros(24, 24)
    add_gram(gram, mine)
    maxima = {"seen": mine.abs().amax(dim=0)} if rank == 0 else {}  # a name only one rank saw
    return {
        "gram": reduce_named({"g": gram}, ["g"], "sum", None)["g"],
        "max": reduce_named(maxima, ["seen", "never"], "max", lambda name: torch.zeros(24)),
        "rows": gather_rows(mine[: 3 + rank]),
        "windows": shard_windows(torch.arange(9)[:, None]).flatten().tolist(),
        "share": row_share(5),
        "shares": all_gather_shares(torch.arange(15.0).view(5, 3)[slice(*row_share(5))], 5),
        "fp8_shares": all_gather_shares(torch.arange(15.0).view(5, 3)[slice(*row_share(5))].to(torch.float8_e4m3fn), 5),
    }


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {"seam": seam_checks(), "cases": quantize_cases()}
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ranks") / "result")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(2)]


@pytest.fixture(scope="module")
def one_process():
    return quantize_cases()


def test_statistics_seam_sums_maxima_and_gathers_over_ranks(two_ranks):
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(3))
    for rank in two_ranks:
        seam = rank["seam"]
        torch.testing.assert_close(seam["gram"], x.T @ x, rtol=1e-5, atol=1e-4)  # fp32, summed in another order
        assert set(seam["max"]) == {"seen"}  # a name no rank saw stays missing
        assert torch.equal(seam["max"]["seen"], x[:32].abs().amax(dim=0))
        assert torch.equal(seam["rows"], torch.cat([x[:3], x[32:36]]))  # rank order, uneven shares
    assert two_ranks[0]["seam"]["windows"] == [0, 1, 2, 3] and two_ranks[1]["seam"]["windows"] == [4, 5, 6, 7, 8]
    assert [rank["seam"]["share"] for rank in two_ranks] == [(0, 3), (3, 5)]  # GPTQ's rows, solved by share
    for rank in two_ranks:
        assert torch.equal(rank["seam"]["shares"], torch.arange(15.0).view(5, 3))
        assert torch.equal(rank["seam"]["fp8_shares"].float(), torch.arange(15.0).view(5, 3))


def test_every_rank_ends_with_the_same_model(two_ranks):
    for name in CASES:
        first, second = (rank["cases"][name] for rank in two_ranks)
        assert first["world_size"] == 2
        for key, value in first["state"].items():
            assert torch.equal(value, second["state"][key]), f"{name}: {key} differs between the ranks"


@pytest.mark.parametrize("name", ["rtn", "smoothquant"])
def test_round_to_nearest_and_smoothquant_are_identical_to_one_process(two_ranks, one_process, name):
    # RTN needs no statistics; SmoothQuant's are maxima, which do not depend on the order they are taken in
    distributed = two_ranks[0]["cases"][name]
    for key, value in one_process[name]["state"].items():
        assert torch.equal(value, distributed["state"][key]), f"{name}: {key}"


@pytest.mark.parametrize("name", ["gptq", "gptq_spread", "spqr_spread"])
def test_gptq_losses_match_one_process(two_ranks, one_process, name):
    distributed, single = two_ranks[0]["cases"][name], one_process[name]
    for block_2, block_1 in zip(distributed["layers"], single["layers"], strict=True):
        for layer, stats in block_1.items():
            assert block_2[layer]["tokens"] == stats["tokens"]
            assert block_2[layer]["loss"] == pytest.approx(stats["loss"], rel=1e-4), f"{name} {layer}"


@pytest.mark.parametrize("name", list(CASES))
def test_perplexity_matches_one_process(two_ranks, one_process, name):
    assert two_ranks[0]["cases"][name]["ppl"] == pytest.approx(one_process[name]["ppl"], rel=2e-3)
    assert one_process[name]["world_size"] == 1


def test_torchrun_command_line_matches_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m ptq.run``: the ranks calibrate together, rank 0 alone evaluates and writes
    the record, and the perplexity is the one-process run's."""
    import json
    import subprocess
    import sys

    from conftest import ASSETS, REPO_ROOT, require_assets

    require_assets("models/stories260K", "data/wikitext-2-raw-v1/test.jsonl")
    common = ["model=stories260k", "method=gptq", "calib.nsamples=8", "calib.seqlen=64", "eval.max_windows=4",
              "device=cpu", f"paths.assets={ASSETS}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}  # this checkout, in every rank
    runs = {
        "one": [sys.executable, "-m", "ptq.run"],
        "two": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "ptq.run"],
    }
    records = {}
    for name, command in runs.items():
        done = subprocess.run([*command, *common, f"output_dir={tmp_path / name}", f"cache.dir={tmp_path / 'cache'}"],
                              cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        records[name] = json.loads((tmp_path / name / "result.json").read_text())
    assert records["two"]["quantization"]["world_size"] == 2 and records["one"]["quantization"]["world_size"] == 1
    one, two = (records[n]["metrics"]["ppl"]["wikitext2"] for n in ("one", "two"))
    assert two == pytest.approx(one, rel=2e-3)
    assert len(list(tmp_path.rglob("result.json"))) == 2 and not list(tmp_path.rglob("error.json"))


def test_sweep_jobs_take_one_gpu_each(monkeypatch):
    from ptq.run import job_device

    assert [job_device("auto", n, 2) for n in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert (
        job_device("auto", 3, 1) == "auto"
        and job_device("cpu", 1, 2) == "cpu"
        and job_device("auto", None, 2) == "auto"
    )
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's ranks choose their GPU by LOCAL_RANK instead
    assert job_device("auto", 1, 2) == "auto"


@pytest.mark.parametrize("launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                                      ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]])  # fmt: skip
def test_sweeps_run_through_hydras_launchers(tmp_path, launcher):
    """A method sweep through Hydra's joblib launcher (jobs side by side) and submitit's local executor (what SLURM
    runs, on this machine): every job writes its record."""
    import json
    import subprocess
    import sys

    from conftest import ASSETS, REPO_ROOT, require_assets

    require_assets("models/stories260K", "data/wikitext-2-raw-v1/test.jsonl")
    done = subprocess.run(
        [sys.executable, "-m", "ptq.run", "-m", "model=stories260k", "method=rtn,gptq", "calib.nsamples=8",
         "calib.seqlen=64", "eval.max_windows=4", "device=cpu", f"paths.assets={ASSETS}", *launcher,
         f"hydra.sweep.dir={tmp_path / 'sweep'}", f"cache.dir={tmp_path / 'cache'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/result.json"))]
    assert sorted(r["method"] for r in records) == ["gptq", "rtn"]
