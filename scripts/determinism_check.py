"""Run-to-run variation of ptq on one device, and what a resumed run gives there.

For each method, the same command runs twice; the two records' metrics, per-layer statistics and saved
tensors are compared bit for bit. One more run per method has torch's deterministic-algorithms check in
warn-only mode, which names every op torch knows to be nondeterministic on this device. Finally a run
killed (SIGKILL) after block ``--kill-after`` is resumed and compared with the uninterrupted one.

    python scripts/determinism_check.py --out results/determinism/cuda.json -- device=cuda paths.assets=...

Extra ``ptq.run`` settings follow ``--``.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

METHODS = {
    "gptq": ["method=gptq", "bits=4", "sym=true", "group_size=64"],
    "awq": ["method=awq", "bits=4", "group_size=64"],
    "smoothquant": ["method=smoothquant", "scheme=w8a8"],
}

WRAPPER = """
import os, signal, sys, warnings
import torch
mode = os.environ["PTQ_CHECK_MODE"]
if mode == "warn":
    torch.use_deterministic_algorithms(True, warn_only=True)
    warnings.simplefilter("always")
elif mode.startswith("kill:"):
    from ptq.storage import progress
    save, last = progress.Progress.save_block, int(mode[5:])
    def save_then_die(self, index, *args):
        save(self, index, *args)
        if index == last:
            os.kill(os.getpid(), signal.SIGKILL)
    progress.Progress.save_block = save_then_die
sys.argv = ["ptq.run", *sys.argv[1:]]
from ptq.run import main
main()
"""


def run(work: Path, args: list[str], mode: str = "plain") -> subprocess.CompletedProcess:
    script = work / "wrapper.py"
    script.write_text(WRAPPER)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          env={**__import__("os").environ, "PTQ_CHECK_MODE": mode})  # fmt: skip


def compare(a: Path, b: Path) -> dict:
    ra, rb = (json.loads((p / "result.json").read_text()) for p in (a, b))
    layers = [[x["layers"] for x in r["quantization"]["blocks"]] for r in (ra, rb)]
    ta, tb = (load_file(p / "model" / "model.safetensors") for p in (a, b))
    differing = [k for k in ta if not torch.equal(ta[k], tb[k])]
    max_diff = max((float((ta[k].float() - tb[k].float()).abs().max()) for k in differing), default=0.0)
    return {
        "ppl": [ra["metrics"]["ppl"], rb["metrics"]["ppl"]],
        "metrics_identical": ra["metrics"] == rb["metrics"],
        "layer_stats_identical": layers[0] == layers[1],
        "tensors": len(ta),
        "tensors_differing": len(differing),
        "max_abs_difference": max_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/determinism/cuda.json")
    parser.add_argument("--work", default="runs/determinism_check")
    parser.add_argument("--kill-after", type=int, default=9, help="-1: no resume check")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("extra", nargs="*")
    opts = parser.parse_args()
    work = Path(opts.work)
    work.mkdir(parents=True, exist_ok=True)
    common = ["save=true", "eval.baseline=false", "overwrite=true", *opts.extra]
    report = {"command": " ".join(sys.argv), "methods": {}, "nondeterministic_ops": {}}
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in opts.methods.split(","):
        args = METHODS[name]
        folders = [work / f"{name}-{i}" for i in (1, 2)]
        for folder in folders:
            proc = run(work, [*args, *common, f"output_dir={folder}"])
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
        report["methods"][name] = compare(*folders)
        proc = run(work, [*args, *common, "save=false", f"output_dir={work / f'{name}-warn'}"], "warn")
        ops = sorted(set(re.findall(r"UserWarning: (.+?) does not have a deterministic implementation", proc.stderr)))
        report["nondeterministic_ops"][name] = ops
        print(name, report["methods"][name], ops, flush=True)
        report["env"] = json.loads((folders[0] / "result.json").read_text())["env"]
        out.write_text(json.dumps(report, indent=2) + "\n")  # after each method: a cut-off run keeps what it did
    if opts.kill_after >= 0:
        report["resume"] = check_resume(work, common, opts.kill_after)
        out.write_text(json.dumps(report, indent=2) + "\n")


def check_resume(work: Path, common: list[str], kill_after: int) -> dict:
    """GPTQ killed after block ``kill_after`` and resumed, against the first uninterrupted GPTQ run."""
    killed = work / "gptq-killed"
    args = [*METHODS["gptq"], *common, f"output_dir={killed}"]
    proc = run(work, args, f"kill:{kill_after}")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    proc = run(work, [*args, "resume=true"])
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    resumed = compare(work / "gptq-1", killed)
    record = json.loads((killed / "result.json").read_text())
    resumed["resumed_from_block"] = record["quantization"]["resumed_from_block"]
    print("resume", resumed, flush=True)
    return resumed


if __name__ == "__main__":
    main()
