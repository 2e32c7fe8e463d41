"""Saved checkpoints, scored three ways: ptq's fake-quant run that wrote the folder, ptq loading the folder
back (``model.path=<folder> method=none``), and transformers' own loader (through compressed-tensors,
its default compressed load) scored with ptq's perplexity on the same windows. One JSON record per case.

    python scripts/export_check.py --out results/export [--device cuda] [--dtype bfloat16] [--max-windows 40]

Extra ``ptq.run`` settings (e.g. ``paths.assets=...``) follow ``--``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

CASES = {
    # the issue's commands; SmolLM2's 576-wide inputs need groups of 64 (compressed-tensors needs whole groups)
    "gptq-w4-sym-g64": ["method=gptq", "bits=4", "sym=true", "group_size=64"],
    "rtn-fp8": ["method=rtn", "scheme=fp8"],
    "rtn-nvfp4a16": ["method=rtn", "scheme=nvfp4a16"],
    "gptq-nvfp4-w4a4": ["method=gptq", "scheme=nvfp4"],
}


def ptq_run(args: list[str]) -> dict:
    out = next(a.split("=", 1)[1] for a in args if a.startswith("output_dir="))
    proc = subprocess.run([sys.executable, "-m", "ptq.run", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ptq.run {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads((Path(out) / "result.json").read_text())


def transformers_perplexity(folder: str, record: dict, device: str, dtype: torch.dtype, assets: str | None) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ptq import data
    from ptq.data import EVAL_SETS
    from ptq.eval.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = data.load_text("wikitext2", EVAL_SETS, Path(assets or record["config"]["assets"] or "../shared/assets"))
    ids = data.tokenize(tokenizer, text.joined)
    windows = data.eval_windows(ids, record["eval"]["seqlen"], record["eval"]["max_windows"])
    assert windows.shape[0] == record["eval"]["ppl"]["wikitext2"]["windows"]
    return perplexity(model, windows, torch.device(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/export")
    parser.add_argument("--work", default="runs/export_check")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("extra", nargs="*", help="more ptq.run settings")
    args = parser.parse_args()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    common = [f"model.dtype={args.dtype}", f"device={device}", "eval.baseline=false", *args.extra]
    if args.max_windows:
        common.append(f"eval.max_windows={args.max_windows}")
    assets = next((a.split("=", 1)[1] for a in args.extra if a.startswith("paths.assets=")), None)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for case in args.cases.split(","):
        work = Path(args.work) / case
        quantized = ptq_run([*CASES[case], "save=true", *common, f"output_dir={work}/q"])
        folder = quantized["saved"]["dir"]
        loaded = ptq_run(["model=custom", f"model.path={folder}", "method=none", *common, f"output_dir={work}/l"])
        start = time.perf_counter()
        theirs = transformers_perplexity(folder, quantized, device, getattr(torch, args.dtype), assets)
        record = {
            "case": case,
            "command": "python -m ptq.run " + " ".join([*CASES[case], "save=true", *common]),
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "dtype": args.dtype,
            "saved": quantized["saved"],
            "ppl": {
                "fake_quant": quantized["metrics"]["ppl"]["wikitext2"],
                "ptq_reload": loaded["metrics"]["ppl"]["wikitext2"],
                "transformers": theirs,
            },
            "windows": quantized["eval"]["ppl"]["wikitext2"]["windows"],
            "loaded_layers": loaded["loaded_layers"],
            "transformers_eval_s": time.perf_counter() - start,
            "env": quantized["env"],
        }
        (Path(args.out) / f"{case}.json").write_text(json.dumps(record, indent=2))
        print(case, record["ppl"], f"{record['saved']['bytes'] / 1e6:.1f} MB", flush=True)


if __name__ == "__main__":
    main()
